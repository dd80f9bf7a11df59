#!/usr/bin/env bash
# Extracts llama.cpp's own Hugging Face -> GGUF converter (convert_hf_to_gguf.py, its conversion/ package,
# the gguf-py it was written with, and llama.cpp's LICENSE) from the llama-cpp-python sdist pinned in
# requirements-llamacpp.txt into DEST, so the converter is the one of the llama.cpp that loads its files.
# About 2 MB are kept. Used by `make converter` and by the exporter and quantizer images; the converter
# is run by runtime/tailor_runtime/ml/llama_cpp_convert.py (TAILOR_LLAMA_CPP_CONVERTER=DEST where DEST is
# not the repository's .tools/llama.cpp).
# Usage: tools/llama-cpp-converter.sh DEST [PYTHON]
set -euo pipefail
dest=${1:?usage: $0 DEST [PYTHON]}
python=${2:-python3}
here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^llama-cpp-python==//p' "$here/requirements-llamacpp.txt")
[ -n "$version" ] || { echo "requirements-llamacpp.txt pins no llama-cpp-python version" >&2; exit 1; }
sdist=llama_cpp_python-$version
rm -rf "$dest" && mkdir -p "$dest/.sdist"
"$python" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
  -d "$dest/.sdist" "llama-cpp-python==$version"
tar xzf "$dest/.sdist/$sdist.tar.gz" -C "$dest" --strip-components=3 \
  --exclude='*/gguf-py/tests' --exclude='*/gguf-py/examples' \
  "$sdist/vendor/llama.cpp/convert_hf_to_gguf.py" "$sdist/vendor/llama.cpp/conversion" \
  "$sdist/vendor/llama.cpp/gguf-py" "$sdist/vendor/llama.cpp/LICENSE"
rm -rf "$dest/.sdist"
test -f "$dest/convert_hf_to_gguf.py"
touch "$dest/.stamp"

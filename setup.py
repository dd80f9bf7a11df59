"""Packaging: one distribution, `tailor`, whose extras match the roles (see docs/sdk.md, "Installing").

    pip install .                 # the light client: CLI and SDK (grpcio, protobuf, rich; no torch)
    pip install ".[gateway]"      # the gateway
    pip install ".[web]"          # the HTTP/JSON API and the dashboard (python -m tailor_web)
    pip install ".[quantizer]"    # one worker (trainer, benchmarker, exporter, selector alike)
    pip install ".[all]"          # everything: the local stack (`tailor up`), what `make install` uses

Versions come from requirements.txt, the one place pins live; this file only says which role needs which
package. The import roots live in several folders (the runtime, each service, the gateway, the CLI, the
SDK and the stubs generated into gen/ by `make protos`), so each package's folder is mapped explicitly:
`tailor` itself is the SDK (sdk/tailor) and its `tailor.<service>.v1` subpackages are the stubs.
"""

import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
SOURCE_ROOTS = [
    "gen",  # before sdk: sdk/tailor/__init__.py is the `tailor` package, gen/ adds its subpackages
    "sdk",
    "runtime",
    "services/quantizer",
    "services/trainer",
    "services/benchmarker",
    "services/exporter",
    "services/selector",
    "gateway",
    "cli",
    "web",
]

# Which packages (names as in requirements.txt) each role imports. tests/unit/test_packaging.py checks
# these against the imports in each role's code.
CLIENT = ["grpcio", "grpcio-health-checking", "protobuf", "pyyaml", "rich", "pydantic", "shtab"]
SERVER_KIT = CLIENT + [
    "grpcio-reflection", "boto3", "prometheus-client",
    "opentelemetry-api", "opentelemetry-sdk",
]  # fmt: skip
ML = ["torch", "transformers", "tokenizers", "safetensors", "huggingface-hub", "accelerate", "numpy"]
ROLES = {
    # The HTTP/JSON API: a gRPC client of the gateway through the SDK, served by uvicorn (web/tailor_web).
    "web": CLIENT + ["fastapi", "uvicorn", "python-multipart"],
    "gateway": SERVER_KIT + ["jinja2", "kubernetes", "psycopg", "jsonschema", "huggingface-hub"],
    "selector": SERVER_KIT + ["numpy"],
    "trainer": SERVER_KIT + ML + ["peft", "bitsandbytes", "jinja2", "datasets", "tensorboard"],
    "quantizer": SERVER_KIT + ML + [
        "bitsandbytes", "llmcompressor", "compressed-tensors", "datasets", "torchao", "gguf",
        "sentencepiece", "onnx", "onnxruntime", "peft",
    ],
    "benchmarker": SERVER_KIT + ML + [
        "bitsandbytes", "compressed-tensors", "onnx", "onnxruntime", "gguf", "sacrebleu", "rouge-score",
        "peft",
    ],
    "exporter": SERVER_KIT + ML + [
        "onnx", "onnxscript", "onnxruntime", "gguf", "sentencepiece", "tritonclient", "python-rapidjson",
        "ml-dtypes", "executorch", "coremltools", "peft",
    ],
}  # fmt: skip


def pins() -> dict[str, str]:
    """name -> requirement line ("torch==2.13.0", "psycopg[binary]==3.3.9") from requirements.txt."""
    found = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found[re.split(r"[\[=<>!~ ]", line, maxsplit=1)[0].lower()] = line
    return found


def requirements(names: list[str]) -> list[str]:
    pinned = pins()
    missing = sorted(set(names) - set(pinned))
    if missing:
        raise SystemExit(f"setup.py names {missing}, which requirements.txt does not pin")
    return sorted({pinned[name] for name in names})


def package_dirs() -> dict[str, str]:
    """Every package (a folder with __init__.py) under the source roots -> its folder."""
    found: dict[str, str] = {}
    for root in SOURCE_ROOTS:
        for init in sorted((ROOT / root).rglob("__init__.py")):
            parts = init.parent.relative_to(ROOT / root).parts
            if "tests" in parts or "__pycache__" in parts:
                continue
            found[".".join(parts)] = init.parent.relative_to(ROOT).as_posix()
    return found


if __name__ == "__main__":
    dirs = package_dirs()
    setup(
        packages=sorted(dirs),
        package_dir=dirs,
        # The dashboard's page, script, styles and vendored chart library, served by `python -m tailor_web`.
        package_data={"tailor_web": ["static/*", "static/vendor/*"]},
        install_requires=requirements(CLIENT),
        extras_require={
            **{role: requirements(names) for role, names in ROLES.items()},
            "all": sorted(pins().values()),
        },
    )

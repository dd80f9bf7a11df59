#!/usr/bin/env bash
# The GPU work of a session in as few device calls as possible (each call starts a machine: minutes).
# Run from the repository root on the device machine, carrying gen/ (make protos) and the wheels in .whl (bitsandbytes,
# liger-kernel, torchao, pydantic, ...; .whl/data/alpaca_5000.json for the trainer bench):
#   bash bench/gpu_session.sh tests decode     # gpu-marked tests, then bench/gpu_decode.py
#   bash bench/gpu_session.sh train            # bench/trainer_speed_gpu.py (LoRA and QLoRA)
#   bash bench/gpu_session.sh benchmarker      # bench/benchmarker_gpu.py (the Benchmark RPC's own GPU path)
# GPU_TESTS overrides the test files; BENCH_ONLY the benchmarker's artifacts (bf16,rtn,nf4).
# Results go to $OUT (the device tool brings them back).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install --no-index --no-deps -q --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD/tests:$PWD/gen:$PWD/runtime:$PWD/services/trainer:$PWD/services/quantizer:$PWD/services/benchmarker
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

# PATHS_3x512 etc. override PATHS for one setting (bash names cannot hold the x: PATHS_3x512 is fine).
paths_for() { local name="PATHS_$1"; echo "${!name:-${PATHS:-baseline,tailor}}"; }

for part in "$@"; do
  case "$part" in
    tests)
      TAILOR_ALPACA=.whl/data/alpaca_5000.json python3 -m pytest -m gpu -q -s -p no:cacheprovider --noconftest \
        ${GPU_TESTS:-tests/unit/test_packed_int4.py services/trainer/tests/test_gpu_training.py \
        services/quantizer/tests/test_gpu_methods.py services/benchmarker/tests/test_gpu_measure.py} > "$OUT/pytest_gpu.txt" 2>&1
      grep -E "passed|failed|^FAILED|^E |gap" "$OUT/pytest_gpu.txt" | head -30
      ;;
    decode)
      python3 bench/gpu_decode.py --skip hf,static_int4_tinygemm,static_int4_gemlite,static_int4_packed \
        --out "$OUT/gpu_decode.json" 2>&1 | grep -v Warning | tail -30
      ;;
    benchmarker)
      python3 bench/benchmarker_gpu.py --out "$OUT/benchmarker_gpu.json" ${BENCH_ONLY:+--only $BENCH_ONLY} 2>&1 \
        | grep -v Warning | tail -30
      ;;
    train)
      # Issue 15: HF Trainer + PEFT on the same packed rows against Tailor, 3 and 8 rows of 512, 1 row of 4096.
      # PATHS: the variants side by side, per method (lora:...;qlora:...), levers joined with + (see the bench).
      for setting in ${TRAIN_SETTINGS:-3x512 8x512 1x4096}; do
        TAILOR_ALPACA=.whl/data/alpaca_5000.json python3 bench/trainer_speed_gpu.py --steps "${STEPS:-10}" --warmup 2 \
          --rows "${setting%x*}" --seq "${setting#*x}" --model-dir /tmp/llama7b-random --trace-memory \
          --paths "$(paths_for "$setting")" --out "$OUT/trainer_speed_$setting.json" 2>&1 \
          | grep -E "^\||random model|error" | cut -c1-400 | tail -16
      done
      ;;
    *) echo "unknown part $part (tests, decode, benchmarker, train)"; exit 2 ;;
  esac
done

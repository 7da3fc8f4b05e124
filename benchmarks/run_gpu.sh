#!/usr/bin/env bash
# Every GPU figure that BENCHMARKS.md lists under "Pending a GPU session", in one run, each script's output
# in its own file under OUT (default gpu-results/). Not yet run on a GPU (estimated 15-20 minutes on one H100).
#
#     bash benchmarks/run_gpu.sh [OUT]        # SAELENS_PYTHON=/path/to/venv/bin/python adds SAELens's row
set -u
out=${1:-gpu-results}
mkdir -p "$out"
py=${PYTHON:-python}
: > "$out/all.txt"
run() {  # run NAME COMMAND...: the output to OUT/NAME.txt, OUT/all.txt and the terminal; a failure does not stop the rest
    local name=$1
    shift
    : > "$out/$name.txt"
    { echo "== $name: $*"; "$@" 2>&1; } | tee -a "$out/$name.txt" "$out/all.txt"
}
run gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
run gpu_tests "$py" -m pytest -q -m gpu tests/test_gpu.py
run profile_step "$py" benchmarks/profile_step.py --device cuda --d-in 1280 --d-sae 40960 --k 64 --steps 10 --what both
run optimizer_step "$py" benchmarks/optimizer_step.py --device cuda --steps 20
run sae_step "$py" benchmarks/sae_step.py --device cuda --autocast bf16 --max-d-sae 0 --budget 2 --max-steps 50
run model_forward "$py" benchmarks/model_forward.py --device cuda --models demo d20 --context 2048
run fit_e2e "$py" benchmarks/fit_e2e.py --device cuda
run fit_e2e_compiled "$py" benchmarks/fit_e2e.py --device cuda --compile
run sparse_decode "$py" benchmarks/sparse_decode.py --device cuda
run runtime_overhead "$py" benchmarks/runtime_overhead.py --depth 20 --device cuda --expansion 16
run cache_throughput "$py" benchmarks/cache_throughput.py --device cuda --workers 1 \
    ${SAELENS_PYTHON:+--saelens-python "$SAELENS_PYTHON"}

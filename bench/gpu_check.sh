#!/usr/bin/env bash
# The GPU check: everything the Triton backend must show on a CUDA machine, in one command, in
# under 8 minutes, without network. Run from anywhere:
#
#     bash bench/gpu_check.sh            # figures and logs under ./gpu-check-<time>/ ($OUT if set)
#
# Steps (each logged to $OUT/<step>.log, its exit status and seconds to $OUT/steps.txt):
#   env         the device, driver, torch and triton versions
#   build-and-precompile
#               the package installed from this working tree, no dependency downloads (pip
#               --no-deps --no-build-isolation --no-index -e .; if pip cannot, the C++ extension
#               is built in place; the tree is on PYTHONPATH either way), while every kernel
#               variant is compiled for this device's target with its shared memory, registers
#               and spills recorded (tests/triton_compile.py), which fills Triton's cache
#   cuda-tests  the cuda tests of tests/ops/test_triton.py and tests/test_transfer.py, no TRITON_INTERPRET: the cpp backend's bytes,
#               della rows past 16384, index ties on the GPU, staged merges on every GPU
#   e2e         a generated Llama-3-8B-shape pair (2 layers) merged with --device cuda and with
#               the cpp backend (the torch one on the GPU if cpp is not built): byte-identical
#               shards, and times against a page-cache read of the inputs
#   bench       GB/s and % of HBM peak for 4096x14336 and 14336x4096, each method, bytes checked
#               against cpp first, and the plain elementwise pass for scale
#   cuda-reference
#               tests/ops/test_conformance.py's cuda cases (against the torch reference) in the time left
# and a summary of every figure, printed last (and kept in $OUT/summary.txt).
# Without a CUDA device it says so in one line and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false); nothing checked."
    exit 0
fi

OUT=${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA=${GPU_CHECK_DATA:-${TMPDIR:-/tmp}/fk-gpu-check}
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-470} ))
: > "$OUT/steps.txt"

# step NAME SECONDS COMMAND...: run with at most SECONDS (and never past the deadline).
step() {
    local name=$1 limit=$2 start rc left
    shift 2
    left=$(( DEADLINE - $(date +%s) ))
    (( left < limit )) && limit=$left
    if (( limit < 5 )); then
        echo "$name skipped (out of time)" >> "$OUT/steps.txt"
        return
    fi
    echo "gpu_check: $name (at most ${limit} s)"
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" >> "$OUT/steps.txt"
}

env_report() {
    nvidia-smi || true
    "$PY" - <<'EOF'
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
EOF
}

install() {
    if "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .; then
        return 0
    fi
    echo "pip could not install the tree; building the C++ extension in place instead"
    "$PY" setup.py build_ext --inplace
}

precompile() {
    local cap
    cap=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(10 * a + b)')
    for dtype in bfloat16 float16 float32; do
        "$PY" tests/triton_compile.py --target "$cap" --dtypes "$dtype" \
            --json "$OUT/compile-sm${cap}-${dtype}.json" &
    done
    wait
}

# The C++ build (one compiler per core) and the precompilation share the machine's cores.
build_and_precompile() {
    install > "$OUT/install.log" 2>&1 &
    precompile
    wait
}

# Most important first: the deadline cuts the last steps short, never the first.
step env 30 env_report
step build-and-precompile 150 build_and_precompile
step cuda-tests 100 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ops/test_triton.py tests/test_transfer.py \
    --junitxml="$OUT/cuda-tests.xml"
step e2e 110 "$PY" bench/gpu_check.py e2e "$OUT" --data "$DATA"
step bench 70 "$PY" -m pytest -q -p no:cacheprovider bench/bench_gpu_kernels.py \
    --benchmark-only -k "(test_triton or test_plain_pass) and (4096x14336 or 14336x4096)" \
    --benchmark-columns=min,mean,rounds --benchmark-json="$OUT/bench.json"
step cuda-reference 300 "$PY" -m pytest -q -p no:cacheprovider -m cuda \
    tests/ops/test_conformance.py --junitxml="$OUT/cuda-reference.xml"
"$PY" bench/gpu_check.py summary "$OUT" | tee "$OUT/summary.txt"

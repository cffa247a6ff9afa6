#!/usr/bin/env bash
# The GPU check: everything the Triton backend must show on a CUDA machine, in one command, in
# under 8 minutes, without network. Run from anywhere:
#
#     bash bench/gpu_check.sh            # results in ./gpu-check-<time>/ ($OUT if set)
#
# Steps, most important first (a step that would start past the deadline is skipped, never an
# earlier one); each is time-boxed, so a hung kernel costs its step's limit and no more:
#   env         the device, driver, torch and triton versions, how many GPUs are visible
#   precompile  (in the background, beside build) every kernel variant compiled for this device's
#               target, one process per core, filling Triton's cache; shared memory, registers
#               and spills recorded (tests/triton_compile.py)
#   build       the C++ extension built in place (the cpp backend is the oracle of the bytes), and
#               the tree installed without dependencies or downloads (pip --no-deps --no-index
#               -e .); the tree is on PYTHONPATH either way
#   cuda-core   without TRITON_INTERPRET: whole merges through the staged transport on every
#               visible GPU (cuda:N while device 0 is current, where there are several) against
#               CPU merges, della rows longer than 16384 against cpp's bytes, index ties
#   cuda-cpp    every method and axis at 4096x14336 and in every dtype against cpp's bytes
#   bench       GB/s and % of HBM peak at 4096x14336 and 14336x4096 for each method, bytes
#               checked against cpp before timing, and the plain elementwise pass for scale
#   e2e         a generated Llama-3-8B-shape pair (2 layers) merged with --device cuda and with
#               cpp: byte-identical shards, and times against a page-cache read of the inputs
#   cuda-reference
#               the conformance matrix's cuda cases against the torch reference, in the time left
#
# What comes out ($OUT holds at most five files): summary.txt (every figure, also printed last),
# bench.json, e2e.json, and results.tar.gz with every log, JUnit file and compile table. All are
# rewritten after each step, so whatever stops the run leaves the steps before it.
# GPU_CHECK_SECONDS (default 470) sets the deadline (whatever runs the script should allow a
# minute more), GPU_CHECK_STEPS a subset of the steps to rerun (with build, for cpp's bytes),
# GPU_CHECK_DATA where the e2e pair is generated. Without a CUDA device it says so in one line
# and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
export PY=${PYTHON:-python3}

probe='import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'
if ! timeout -k 5 120 "$PY" -c "$probe" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false); nothing checked."
    exit 0
fi

OUT=${OUT:-gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export WORK
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fk-gpu-check.XXXXXX")
DATA=${GPU_CHECK_DATA:-${TMPDIR:-/tmp}/fk-gpu-check-data}
STEPS=" ${GPU_CHECK_STEPS:-env precompile build cuda-core cuda-cpp bench e2e cuda-reference} "
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_SECONDS:-470} ))
: > "$WORK/steps.txt"

# limit_for SECONDS: SECONDS, or what is left before the deadline if that is less.
limit_for() {
    local left=$(( DEADLINE - $(date +%s) ))
    echo $(( left < $1 ? left : $1 ))
}

# step NAME SECONDS COMMAND...: run it (if GPU_CHECK_STEPS names it) for at most SECONDS, its
# output in NAME.log, its exit status and seconds in steps.txt; then publish what there is.
step() {
    local name=$1 limit start rc
    limit=$(limit_for "$2")
    shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    if (( limit < 5 )); then
        echo "$name skipped (out of time)" >> "$WORK/steps.txt"
        return 0
    fi
    echo "gpu_check: $name (at most ${limit} s)"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    echo "$name rc=$rc seconds=$(( $(date +%s) - start ))" >> "$WORK/steps.txt"
    publish
}

publish() {
    timeout -k 5 60 "$PY" bench/gpu_check.py summary "$WORK" > "$OUT/summary.txt" 2>&1
    for file in bench.json e2e.json; do
        [[ -f $WORK/$file ]] && cp "$WORK/$file" "$OUT/$file"
    done
    # Status 1: a file changed while read (the background compile writing); the rest is sound.
    tar -czf "$OUT/results.tar.gz.part" -C "$WORK" .
    (( $? <= 1 )) && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

env_report() {
    nvidia-smi
    "$PY" - <<'EOF'
import torch, triton
p = torch.cuda.get_device_properties(0)
count = torch.cuda.device_count()
print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
      f"{p.total_memory / 2**30:.0f} GiB, {count} visible")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
print("cuda:N with N != the current device: " + (
    f"exercised by cuda-core's staged merges on cuda:1..{count - 1}" if count > 1
    else "not exercised (one GPU; tests/test_device_placement.py checks the guards without one)"))
EOF
}

# One compile process per core but two (the C++ build runs beside it), at most 14 (each holds
# torch), each taking every N-th variant; they fill Triton's cache, so the tests that follow load
# instead of compiling.
precompile() {
    local cap jobs i
    cap=$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(10 * a + b)')
    jobs=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 ))
    (( jobs > 14 )) && jobs=14
    for (( i = 0; i < jobs; i++ )); do
        "$PY" tests/triton_compile.py --target "$cap" --dtypes bfloat16,float16,float32 \
            --shard "$i/$jobs" --json "$WORK/compile-sm${cap}-$i.json" &
    done
    wait
}

# In place first (setup.py compiles the sources in parallel): the tests import the tree.
build() {
    "$PY" setup.py build_ext --inplace
    FUSION_KERNELS_SKIP_CPP_BUILD=1 "$PY" -m pip install -q --no-deps --no-build-isolation \
        --no-index -e . || echo "pip could not install the tree; it is on PYTHONPATH instead"
    if "$PY" -c 'import fusion_kernels._cpp'; then
        echo "cpp extension: built"
    else
        echo "cpp extension: NOT built (every comparison with cpp's bytes is skipped)"
        return 1
    fi
}
export -f env_report precompile build

step env 30 bash -c env_report
precompiling=
if [[ $STEPS == *" precompile "* ]]; then
    limit=$(limit_for 180)
    echo "gpu_check: precompile, in the background (at most ${limit} s)"
    (
        start=$(date +%s)
        timeout -k 10 "$limit" bash -c precompile > "$WORK/precompile.log" 2>&1
        echo "precompile rc=$? seconds=$(( $(date +%s) - start ))" >> "$WORK/steps.txt"
    ) &
    precompiling=$!
fi
step build 150 bash -c build
[[ -n $precompiling ]] && wait "$precompiling"

PYTEST=("$PY" -m pytest -v -p no:cacheprovider -m cuda)
CORE="staged_gpu_merge or della_long_rows or index_tie_break"
step cuda-core 90 "${PYTEST[@]}" tests/test_transfer.py tests/ops/test_triton.py -k "$CORE" \
    --junitxml="$WORK/cuda-core.xml"
step cuda-cpp 150 "${PYTEST[@]}" tests/ops/test_triton.py -k "not ($CORE)" \
    --junitxml="$WORK/cuda-cpp.xml"
step bench 90 "$PY" -m pytest -q -p no:cacheprovider bench/bench_gpu_kernels.py \
    --benchmark-only -k "(test_triton or test_plain_pass) and (4096x14336-row or 14336x4096-col)" \
    --benchmark-columns=min,mean,rounds --benchmark-json="$WORK/bench.json"
step e2e 120 "$PY" bench/gpu_check.py e2e "$WORK" --data "$DATA"
step cuda-reference 300 "${PYTEST[@]}" tests/ops/test_conformance.py \
    --junitxml="$WORK/cuda-reference.xml"
publish
cat "$OUT/summary.txt"

#!/usr/bin/env bash
# The GPU check (issue 18): one command for a lent GPU machine, everything written under $OUT
# (default ./gpu-check-out). Run from the repository root, on the machine that has the GPU:
#
#     benchmarks/gpu_wheels.sh                  # here, once: the wheels the GPU machine lacks -> .whl/
#     benchmarks/gpu_check.sh                   # there: CUDA tests, then phimoe bench, one table
#     DEVICE=cpu SHAPE=mid benchmarks/gpu_check.sh   # the dry run, on a machine without a GPU
#
# Steps: install the wheels in $WHEELS (default .whl) with pip --no-index into /tmp/site (nothing is
# downloaded); the package itself runs from this checkout (PYTHONPATH). Then `pytest -m cuda`, then
# `phimoe bench --device $DEVICE --shape $SHAPE` with bf16 (the default decode path, on CUDA the
# captured static step), int8 and nf4 experts, with `--offload experts --gpu-memory
# $OFFLOAD_MEMORY` (missed experts copied in, then computed on the CPU from host memory:
# PHIMOE_OFFLOAD_MISS=host), and a short bf16 run with eager decode to compare; each under its own
# timeout, cut to what is left of $DEADLINE seconds (default 585) from the script's start, and
# skipped when less than 20 s are left, in that order of importance. benchmarks/gpu_table.py prints
# one table (decode path, decode and prefill tok/s, peak memory, % of the memory roofline,
# expert-cache hit rate) into $OUT/table.md. A step that fails or runs out of time leaves its log
# and the table marks its row. Run it as run(command="benchmarks/gpu_check.sh", carry=[".whl"],
# timeout_s=600): the deadline keeps it inside the device tool's 600 s per command.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-./gpu-check-out}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-phi-3.5-moe}
LAYERS=${LAYERS:-}
WHEELS=${WHEELS:-.whl}
OFFLOAD_MEMORY=${OFFLOAD_MEMORY:-20GiB}
DEADLINE=${DEADLINE:-585}
begin=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - begin) - 10 )); }  # seconds left, 10 kept for the table
within() { local l; l=$(left); echo $(( $1 < l ? $1 : l )); }  # a step's timeout, cut to what is left
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PHIMOE_NO_HISTORY=1
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl > "$OUT/wheels.log" 2>&1 || echo "wheels: install failed (see wheels.log)"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || echo "no nvidia-smi"
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
    nproc; free -g | head -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

start=$(date +%s)
echo "== pytest -m cuda"
timeout "$(within 150)" python3 -m pytest -p no:cacheprovider -o addopts= -q -m cuda -rs tests/test_cuda.py \
    > "$OUT/pytest.txt" 2>&1
echo "pytest exit $? ($(( $(date +%s) - start )) s)"; tail -5 "$OUT/pytest.txt"

bench() {  # name, timeout, bench options... (KERNEL, MISS: PHIMOE_DECODE_KERNEL, PHIMOE_OFFLOAD_MISS)
    local name=$1 limit; limit=$(within "$2"); shift 2
    if [ "$limit" -lt 20 ]; then
        echo "skipped: out of time" > "$OUT/bench-$name.err"; echo "bench $name: skipped (out of time)"; return
    fi
    local t0; t0=$(date +%s)
    PHIMOE_DECODE_KERNEL=${KERNEL:-auto} PHIMOE_OFFLOAD_MISS=${MISS:-copy} timeout "$limit" python3 -m phimoe_cli.cli \
        bench --device "$DEVICE" --shape "$SHAPE" ${LAYERS:+--layers $LAYERS} \
        --repeat 2 --json "$@" > "$OUT/bench-$name.json" 2> "$OUT/bench-$name.err"
    echo "bench $name: exit $? ($(( $(date +%s) - t0 )) s, limit $limit s)"
}
bench bf16 80 -p 128 -n 64
bench int8 100 -p 128 -n 64 -q int8
bench nf4 100 -p 128 -n 64 -q nf4
bench offload 70 -p 32 -n 16 --offload experts --gpu-memory "$OFFLOAD_MEMORY"
MISS=host bench offload-host 70 -p 32 -n 16 --offload experts --gpu-memory "$OFFLOAD_MEMORY"
KERNEL=eager bench bf16-eager 40 -p 32 -n 8
python3 benchmarks/gpu_table.py "$OUT" | tee "$OUT/table.md"
echo "total $(( $(date +%s) - begin )) s"

#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on the GPU machine that it lacks (its image has torch,
# transformers, safetensors, tokenizers, sentencepiece, typer, rich, huggingface-hub, pytest,
# numpy, packaging), for its Python 3.12, manylinux x86_64, into $WHEELS (default .whl, which
# .git/info/exclude should ignore so that it travels only when carried). Says their total size:
# the working tree that travels is limited to 64 MiB.
set -eu
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
mkdir -p "$WHEELS"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
    "bitsandbytes==0.50.2"  # quantized experts on CUDA; everything else the check imports is there
du -ch "$WHEELS"/*.whl | tail -1 | sed 's/total/in all (carry it: run(..., carry=[".whl"]))/'

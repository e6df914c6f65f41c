#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call on a lent GPU machine (about 9
# minutes; the device allows 10 a call and 15 a session, so run it once, then give it back).
#
#   speed (generate.py):   fp16 and NF4 decode, prefill, turn-1 vs turn-5 TTFT, vs plain generate
#   attention.py:          attention=True vs plain on LLaVA-1.5-7B and NeXT-7B shapes
#   finetune.py:           QLoRA on the LLaVA-1.5-7B shape, batch 1, ~1k tokens: peak memory
#
# The machine lacks some wheels and cannot reach PyPI. First, here (once):
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl transformers==5.24.0 bitsandbytes==0.50.2 \
#       peft==0.21.2 accelerate==1.15.0
# then run `bash benchmarks/gpu.sh` there, carrying `.whl`. All three share one random-weights
# checkpoint in the 7B shape (llava_nb.testing.llava_parts), built once.
set -u
cd "$(dirname "$0")/.."
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

run() {  # run LIMIT_SECONDS SCRIPT ARGS...: one benchmark, cut off at its limit
    local limit=$1
    shift
    echo
    echo "== python3 $* (limit ${limit} s)"
    timeout "$limit" python3 "$@"
    echo "== exit status $?"
}

run 240 benchmarks/generate.py --shape llava-1.5-7b --quant none,4bit \
    --checkpoint /tmp/bench/llava-1.5-7b-random
run 150 benchmarks/attention.py --shape 7b --family llava --family llava_next \
    --new-tokens 64 --repeat 3 --pointing 0
run 150 benchmarks/finetune.py --shape llava-1.5-7b --method qlora --steps 10 --batch-size 1 \
    --tokens 450 --rows 16 --image-size 336 --workdir /tmp/bench

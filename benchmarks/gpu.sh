#!/usr/bin/env bash
# The GPU measurements on a lent GPU machine (the device allows 10 minutes a call and 15 a
# session: run the first, then the second if time is left, then give it back):
#
#   speed (generate.py):   bf16 and NF4 decode, prefill, turn-1 vs turn-5 TTFT, vs plain generate,
#                          the CUDA-graph path and the compiled one, and (bf16) where a step's
#                          time goes, kernel by kind (at most 9 minutes)
# with `int8` (at most 4 minutes, a call of its own): the same for bitsandbytes 8-bit
# and with `rest` (about 5 minutes, a call of its own) the figures already in the README:
#   finetune.py:           QLoRA on the LLaVA-1.5-7B shape, batch 1, ~1k tokens: peak memory
#   attention.py:          attention=True vs plain on LLaVA-1.5-7B and NeXT-7B shapes
#
# The machine lacks some wheels and cannot reach PyPI. First, here (once):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#       -d .whl transformers==5.24.0 bitsandbytes==0.50.2 peft==0.21.2
# then run `bash benchmarks/gpu.sh 2>&1 | tee $OUT/gpu.log` there, carrying `.whl`. generate.py
# and finetune.py share one random-weights checkpoint in the LLaVA-1.5-7B shape
# (llava_nb.testing.llava_parts); attention.py builds its own two (1.5 and NeXT).
set -u
case "${1:-}" in "" | int8 | rest) ;; *) echo "usage: bash benchmarks/gpu.sh [int8 | rest]"; exit 2 ;; esac
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

run() {  # run LIMIT_SECONDS SCRIPT ARGS...: one benchmark, cut off at its limit
    local limit=$1
    shift
    echo
    echo "== python3 $* (limit ${limit} s)"
    timeout "$limit" python3 "$@"
    echo "== exit status $?"
}

# issue 8's speed table: bf16 and NF4, the default path (CUDA graph) and the compiled one
# (torch.compile, then the graph; compiling the 7B step takes a while, in its warm-up answer)
if [ -z "${1:-}" ]; then  # bf16 first: its goal is the open one
  run 330 benchmarks/generate.py --shape llava-1.5-7b --quant none --paths default,compiled \
      --repeat 1 --checkpoint /tmp/bench/llava-1.5-7b-random --profile
  run 200 benchmarks/generate.py --shape llava-1.5-7b --quant 4bit --paths default,compiled \
      --repeat 1 --checkpoint /tmp/bench/llava-1.5-7b-random --check-steps 0
  exit
fi
if [ "$1" = int8 ]; then  # 8-bit: whether its step can be captured, and what that gives
  run 240 benchmarks/generate.py --shape llava-1.5-7b --quant 8bit --paths default \
      --repeat 1 --checkpoint /tmp/bench/llava-1.5-7b-random --profile
  exit
fi
run 120 benchmarks/finetune.py --shape llava-1.5-7b --method qlora --steps 10 --batch-size 1 \
    --tokens 450 --rows 16 --image-size 336 --workdir /tmp/bench
rm -rf /tmp/bench  # room on the disk for the two checkpoints attention.py writes
run 190 benchmarks/attention.py --shape 7b --family llava --family llava_next \
    --new-tokens 48 --repeat 2 --pointing 0

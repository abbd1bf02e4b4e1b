#!/usr/bin/env bash
# The packed-schedule measurements on one H200 (bench/RESULTS.md, "The packed schedule").
# Usage: bench/h200_packed.sh OUTDIR 1|2   (call 1: GPU tests + 1.5B targets, fp32 check, B sweep;
#                                           call 2: 1.5B again with the device bank, 0.5B, 7B with a profile;
#                                           call 3: all GPU tests, larger microbatches, the no-bank setting)
set -o pipefail
out=$1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, b.__version__)' | tee -a "$out/gpu.txt"
common=(--repeats 1 --warmup-prompts 8 --group 8 --prompt-len 64 --response-len 192)
if [ "$2" = 1 ]; then
  GRADPROBE_TEST_CUDA=1 timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py \
    -k "schedules or fp32" 2>&1 | tail -15 | tee "$out/test_cuda.txt"
  timeout 420 python3 bench/probe_bench.py --preset qwen2.5-1.5b --prompts 64 "${common[@]}" \
    --rows step@8,step@64,packed@64,fused@8 \
    --full 8 --full-rows packed@64,literal@8 --full-precision fp32 --full-checkpointing reentrant,non_reentrant \
    --sweep 8,16,32,64,128 --sweep-rows step@64,packed@64 \
    --json "$out/qwen15b_packed_h200.json" 2>&1 | grep -v Warning | tee "$out/qwen15b.txt"
elif [ "$2" = 2 ]; then
  timeout 230 python3 bench/probe_bench.py --preset qwen2.5-1.5b --prompts 64 "${common[@]}" \
    --rows step@64,packed@64,fused@8 --sweep 64,128 --sweep-rows step@64,packed@64 \
    --json "$out/qwen15b_packed_run2_h200.json" 2>&1 | grep -v Warning | tee "$out/qwen15b_run2.txt"
  timeout 100 python3 bench/probe_bench.py --preset qwen2.5-0.5b --prompts 32 "${common[@]}" \
    --rows step@64,packed@64,fused@8 --checkpointing reentrant \
    --json "$out/qwen05b_packed_h200.json" 2>&1 | grep -v Warning | tee "$out/qwen05b.txt"
  timeout 230 python3 bench/probe_bench.py --preset qwen2.5-7b --prompts 32 "${common[@]}" \
    --rows step@32,packed@32 --checkpointing reentrant,non_reentrant --microbatch 32 \
    --profile "$out/profile_packed_7b.txt" --profile-row packed@32 \
    --json "$out/qwen7b_packed_h200.json" 2>&1 | grep -v Warning | tee "$out/qwen7b.txt"
elif [ "$2" = 3 ]; then
  GRADPROBE_TEST_CUDA=1 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -15 \
    | tee "$out/test_cuda.txt"
  timeout 200 python3 bench/probe_bench.py --preset qwen2.5-1.5b --prompts 64 "${common[@]}" \
    --rows step@64,step@128,packed@64,packed@128,packed_none@64 --checkpointing reentrant \
    --json "$out/qwen15b_packed_run3_h200.json" 2>&1 | grep -v Warning | tee "$out/qwen15b_run3.txt"
fi

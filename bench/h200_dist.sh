#!/usr/bin/env bash
# torchrun on the GPU machine (bench/RESULTS.md, "torchrun"). Usage: bench/h200_dist.sh OUTDIR
# On one GPU: the CUDA tests on the merged code; the 1.5B-shape workload (B=64, G=8, 64+192 tokens, LoRA r=64,
# nf4, bf16) as one process and under torchrun with one process (time, peak memory, identical numbers); and
# two processes on one GPU, which must be refused in one line. Several GPUs: add --nproc-per-node N rows.
set -o pipefail
out=$1
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, peft, bitsandbytes as b; print(torch.__version__, transformers.__version__, peft.__version__, b.__version__, torch.cuda.nccl.version())' | tee -a "$out/gpu.txt"
GRADPROBE_TEST_CUDA=1 timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -8 \
  | tee "$out/test_cuda.txt"
python3 - <<'PY'
import sys; sys.path.insert(0, "bench"); sys.path.insert(0, ".")
from probe_bench import synthetic_batch
from gradprobe import write_rollouts
write_rollouts(synthetic_batch(151936, 64, 8, 64, 192), "/tmp/r15b.jsonl")
PY
args=(delta-h1 --set model.preset=qwen2.5-1.5b --set lora.r=64 --set lora.alpha=128 --rollouts /tmp/r15b.jsonl
      --set probe.microbatch_size=64 --set probe.warmup_steps=0 --quiet)
for run in one torchrun1 torchrun2; do
  t0=$(date +%s.%N)
  case $run in
    one) timeout 240 python3 -m gradprobe "${args[@]}" --json "$out/$run.json" 2>&1 | tail -3 ;;
    torchrun1) timeout 240 torchrun --standalone --nproc-per-node 1 -m gradprobe "${args[@]}" --json "$out/$run.json" 2>&1 | tail -3 ;;
    torchrun2) timeout 120 torchrun --standalone --nproc-per-node 2 -m gradprobe "${args[@]}" --json "$out/$run.json" 2>&1 | grep -v "^\s*$" | head -12 ;;
  esac
  echo "$run: rc=$? wall $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" | tee -a "$out/runs.txt"
done
python3 - "$out" <<'PY' | tee "$out/compare.txt"
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
one = json.loads((d / "one.json").read_text())["result"]
t1 = json.loads((d / "torchrun1.json").read_text())["result"]
for k in ("deltaH", "se_deltaH", "se_deltaH_batches", "deltaH1", "se", "se_jackknife", "se_unbiased", "U_cross"):
    a, b = one[k], t1[k]
    print(f"{k:18s} one {a!r:>24} torchrun-1 {b!r:>24} rel {abs(a - b) / abs(a) if a else 0:.1e}")
for r, name in ((one, "one"), (t1, "torchrun-1")):
    print(name, "probe s", round(r["seconds"], 2), "peak GiB", round(r["peak_memory_bytes"] / 2**30, 2),
          "world", r["world_size"], "units/rank", r["units_per_rank"], "timings", {k: round(v, 1) for k, v in r["timings"].items()})
PY

#!/usr/bin/env bash
# One short GPU check (about 10 minutes of GPU time), for a machine with an NVIDIA GPU:
#   1. build Horovod 0.28.1 with NCCL against this machine's torch, with the same sdist, patch and
#      set-up script as everywhere else (launch/setup.sh, HOROVOD_GPU_OPERATIONS=NCCL);
#   2. run benchmark (a), training throughput against global batch, for resnet20 on CIFAR-shaped
#      synthetic data on one GPU, and at the largest micro-batch (2048, no accumulation) the same
#      model, data and batch in a plain PyTorch loop (torch.optim.SGD, no Horovod): goal >= 0.9;
#   3. append the figures to benchmarks/RESULTS.md under a "GPU" heading (and to $OUT if set).
# Usage: benchmarks/gpu_check.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "gpu_check: no NVIDIA GPU visible" >&2; exit 2; }

start=$(date +%s)
HOROVOD_GPU_OPERATIONS=NCCL ADABATCH_CACHE=${ADABATCH_CACHE:-$HOME/.cache/adabatch-hvd-gpu} launch/setup.sh \
  2>&1 | tee "$out/setup.log"
build_s=$(( $(date +%s) - start ))
.venv/bin/horovodrun --check-build | tee "$out/check-build.txt"
grep -q '\[X\] NCCL' "$out/check-build.txt" || { echo "gpu_check: Horovod was built without NCCL" >&2; exit 1; }

.venv/bin/horovodrun -np 1 -H localhost:1 --gloo .venv/bin/python benchmarks/worker.py throughput \
  "$out/gpu_resnet20.json" --model resnet20 --data synthetic --batches 128,512,2048,4096,8192 --cap 2048 \
  --samples 32768 --repeats 3
.venv/bin/horovodrun -np 1 -H localhost:1 --gloo .venv/bin/python benchmarks/worker.py minimal \
  "$out/gpu_plain.json" --plain --model resnet20 --data synthetic --batches 2048 --samples 32768 --repeats 3

.venv/bin/python - "$out/gpu_resnet20.json" "$build_s" "$out/gpu_plain.json" <<'PY' | tee "$out/gpu.md" | tee -a benchmarks/RESULTS.md
import json, subprocess, sys
r = json.load(open(sys.argv[1]))
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
print(f"\n## GPU: (a) throughput, resnet20 on CIFAR-shaped synthetic data, 1 GPU\n")
print(f"{gpu}; set-up with the NCCL build of Horovod took {sys.argv[2]} s. Command: `benchmarks/gpu_check.sh`.\n")
print("| global batch | micro x accum | samples/s |\n|---|---|---|")
for p in r["points"]:
    print(f"| {p['global_batch']} | {p['micro_batch']} x {p['accum_steps']} | {p['samples_per_second']:.0f} |")
plain = json.load(open(sys.argv[3]))
ours = next(p for p in r["points"] if p["global_batch"] == plain["global_batch"])
print(f"\nAt micro-batch {plain['global_batch']} (x1), a plain PyTorch loop (torch.optim.SGD, no Horovod) on the same "
      f"GPU: {plain['samples_per_second']:.0f} samples/s; the trainer / plain = "
      f"**{ours['samples_per_second'] / plain['samples_per_second']:.3f}** (goal >= 0.9).")
PY

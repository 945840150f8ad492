#!/usr/bin/env bash
# The device check: one short script for a lent GPU machine that reaches no registry and already
# has Python 3.12 with torch 2.11 (CUDA 13), nvcc, CMake and ninja (/work/.library/device/KINDS.md).
# Well inside one 10-minute command it
#   1. checks what the machine has and what benchmarks/gpu/carry/ brings (benchmarks/gpu/fill.sh
#      fills that folder beforehand, on a machine with the network; it is not in git);
#   2. installs the missing Python packages from the carried wheels (pip --no-index, into
#      $GPU_CHECK_WORK/site, which goes first on PYTHONPATH: the machine's own environment is not
#      changed) and builds Horovod 0.28.1 with NCCL against the machine's own torch, through the same
#      launch/build-horovod.sh as everywhere else (its "pip download" of the sdist is pointed at the
#      carried one with PIP_NO_INDEX/PIP_FIND_LINKS; NCCL is torch's own libnccl.so.2, linked shared;
#      the CUDA kernels only for this GPU's architecture, which makes the build short). Without MPI on
#      the machine (no mpicxx/mpicc) it builds Gloo + NCCL (HOROVOD_WITHOUT_MPI=1), which is all that
#      one machine needs;
#   3. proves the build: horovodrun --check-build lists NCCL; the library needs libnccl.so.2 and
#      libcudart.so.13 and the process loads torch's copies; CUDA tensors allreduce correctly through
#      NCCL (NCCL_DEBUG and Horovod's timeline say so);
#   4. measures on one GPU, each step skipped (and said so) when the time left is too short:
#      - each rank sees only its own GPU (CUDA_VISIBLE_DEVICES): the trainer's device choice on 2 ranks;
#      - throughput of resnet20 (CIFAR-shaped) and resnet50 (ImageNet-shaped, synthetic) at fp32 and
#        bf16: the trainer against a plain PyTorch loop at the same micro-batch and precision (goal >= 0.9);
#      - the 1-GPU training smoke run and bf16 against fp32 accuracy: the real CLI on Fashion-MNIST (carried);
#      - a real CUDA out-of-memory that --max-micro-batch auto survives (capped memory fraction);
#   5. writes $OUT (the device tool brings it back; at most 8 files): summary.md, results.json, log.txt,
#      build.log, check-build.txt; and appends summary.md to benchmarks/RESULTS.md.
#
# Usage, from the repository root:
#   benchmarks/gpu/fill.sh                  here, once (network): fills benchmarks/gpu/carry/
#   benchmarks/gpu_check.sh                 on the GPU machine (device tool: carry benchmarks/gpu/carry)
#   benchmarks/gpu_check.sh --rehearse      on a machine without a GPU: the same steps, on the CPU with
#                                           small sizes, to find mistakes before a lease is spent
#                                           (RESULTS.md is left alone)
# Environment: PYTHON (default python3: the one with torch), OUT (default runs/gpu-check[-rehearsal]),
# GPU_CHECK_WORK (default /tmp/adabatch-gpu-check; a rerun there reuses the built wheel),
# GPU_CHECK_BUDGET_S (default 540: the whole check, inside a 600 s command), GPU_CHECK_ARCHS (default:
# this GPU's, e.g. 90; 90 when rehearsing), GPU_CHECK_CARRY, CUDA_HOME (default /usr/local/cuda, else
# nvcc's), GPU_CHECK_MPI=0|1 (default: 1 when mpicxx or mpicc is found), GPU_CHECK_TIMEOUT_SCALE (the
# steps' time limits times this; default 1, 4 when rehearsing on a slow CPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
T0=$(date +%s)
REHEARSE=0
case "${1:-}" in
  --rehearse) REHEARSE=1 ;;
  "") ;;
  *) echo "usage: benchmarks/gpu_check.sh [--rehearse]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
CARRY=${GPU_CHECK_CARRY:-$ROOT/benchmarks/gpu/carry}
WORK=${GPU_CHECK_WORK:-/tmp/adabatch-gpu-check}
BUDGET=${GPU_CHECK_BUDGET_S:-540}
SCALE=${GPU_CHECK_TIMEOUT_SCALE:-$([ "$REHEARSE" = 1 ] && echo 4 || echo 1)}
if [ "$REHEARSE" = 1 ]; then OUTDIR=${OUT:-$ROOT/runs/gpu-check-rehearsal}; else OUTDIR=${OUT:-$ROOT/runs/gpu-check}; fi
mkdir -p "$OUTDIR" "$WORK/json"
rm -f "$WORK"/json/*.json
exec > >(tee -a "$OUTDIR/log.txt") 2>&1

elapsed() { echo $(( $(date +%s) - T0 )); }
log() { echo "gpu_check [$(elapsed) s]: $*"; }
die() { log "FAILED: $*"; exit 1; }
notes=()
note() { notes+=("$*"); log "$*"; }
left() { echo $(( BUDGET - $(elapsed) )); }
# step NAME NEED_S TIMEOUT_S CMD...: run CMD unless fewer than NEED_S seconds are left; a failure
# is recorded, and the check goes on with the next step.
step() {
  local name=$1 need=$(( $2 * SCALE )) limit=$(( $3 * SCALE )) t rc=0
  shift 3
  if [ "$(left)" -lt "$need" ]; then
    note "$name: SKIPPED, $(left) s left of the ${BUDGET} s budget and it needs about $need s"
    return 0
  fi
  [ "$limit" -le "$(left)" ] || limit=$(left)
  log "$name (at most $limit s)"
  t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  if [ "$rc" = 0 ]; then
    note "$name: ok in $(( $(date +%s) - t )) s"
  else
    note "$name: FAILED with rc $rc after $(( $(date +%s) - t )) s$([ "$rc" = 124 ] && echo " (timed out)")"
  fi
}

log "$([ "$REHEARSE" = 1 ] && echo "REHEARSAL on the CPU" || echo "GPU check") in $ROOT; out: $OUTDIR; work: $WORK"

# ---- 1. what the machine has, and the carried folder ---------------------------------------------
probe=$("$PY" - <<'EOF'
import sys, torch
cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print(sys.version.split()[0], torch.__version__, torch.version.cuda or "-", torch.cuda.is_available(),
      f"{cap[0]}{cap[1]}" if cap else "-", torch.cuda.device_count())
EOF
) || die "$PY cannot import torch"
read -r py_ver torch_ver torch_cuda has_gpu cap ngpu <<<"$probe"
log "python $py_ver, torch $torch_ver (CUDA $torch_cuda), GPU available: $has_gpu ($ngpu, compute capability $cap)"
if [ "$REHEARSE" = 0 ]; then
  [ "$has_gpu" = True ] || die "torch sees no GPU (run with --rehearse on a machine without one)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
[ "$torch_cuda" != - ] || die "torch $torch_ver is a CPU-only build; the NCCL flavour needs a CUDA build"
ARCHS=${GPU_CHECK_ARCHS:-$([ "$cap" != - ] && echo "$cap" || echo 90)}
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  else die "no nvcc: neither /usr/local/cuda/bin/nvcc nor one on PATH (set CUDA_HOME)"; fi
fi
export CUDA_HOME
nvcc_ver=$("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
log "nvcc $nvcc_ver at $CUDA_HOME; Horovod's CUDA kernels for sm_$ARCHS"

[ -f "$CARRY/MANIFEST.sha256" ] || die "no $CARRY/MANIFEST.sha256: run benchmarks/gpu/fill.sh first, and carry benchmarks/gpu/carry"
(cd "$CARRY" && sha256sum --quiet -c MANIFEST.sha256) || die "$CARRY does not match its MANIFEST.sha256"
log "carried: $(du -sh "$CARRY" | cut -f1) ($(cd "$CARRY" && find . -type f ! -name MANIFEST.sha256 | sort | paste -sd' '))"

mkdir -p "$WORK/bin"
for tool in patch make; do
  if ! command -v "$tool" >/dev/null; then
    cp "$CARRY/bin/$tool" "$WORK/bin/$tool" && chmod +x "$WORK/bin/$tool"
    note "tools: no $tool here; the carried one (Debian's) is used"
  fi
done
export PATH="$WORK/bin:$PATH"
for tool in g++ cmake; do command -v "$tool" >/dev/null || die "no $tool on this machine"; done
log "tools: $(g++ --version | head -n1); $(cmake --version | head -n1); make $(make --version | head -n1 | awk '{print $NF}')"
if [ -z "${GPU_CHECK_MPI:-}" ]; then
  GPU_CHECK_MPI=0
  if command -v mpicxx >/dev/null || command -v mpicc >/dev/null; then GPU_CHECK_MPI=1; fi
fi
if [ "$GPU_CHECK_MPI" = 0 ]; then
  export HOROVOD_WITHOUT_MPI=1
  note "MPI: none on this machine (no mpicxx/mpicc): Horovod is built with Gloo + NCCL, without MPI"
else
  unset HOROVOD_WITHOUT_MPI
  log "MPI: $(command -v mpicxx || command -v mpicc): Horovod is built with MPI, Gloo and NCCL"
fi

# ---- 2. the missing Python packages, then Horovod -------------------------------------------------
SITE=$WORK/site
mkdir -p "$SITE"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - "$CARRY/wheels" <<'EOF'
import importlib.metadata as md, pathlib, sys
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = whl.name.split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(whl)
EOF
)
if [ -n "$missing" ]; then
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade --target "$SITE" $missing \
    || die "pip could not install the carried wheels: $missing"
  log "installed from the carried wheels: $(for w in $missing; do basename "$w" | cut -d- -f1,2; done | paste -sd' ')"
else
  log "every carried wheel's package is already here"
fi

t=$(date +%s)
# A copy of the build script and the patch: bash reads a script while it runs, so an edit of
# launch/build-horovod.sh during a long build (a shared checkout) would break the run after the compile.
rm -rf "$WORK/snap" && mkdir -p "$WORK/snap/launch" && cp -r launch/build-horovod.sh launch/patches "$WORK/snap/launch/"
[ ! -f launch/lib.sh ] || cp launch/lib.sh "$WORK/snap/launch/"
log "building Horovod (launch/build-horovod.sh, NCCL flavour, sdist from $CARRY/sdist, no index)"
wheel=$(PIP_NO_INDEX=1 PIP_FIND_LINKS="$CARRY/sdist" PIP_DISABLE_PIP_VERSION_CHECK=1 \
        HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_BUILD_CUDA_CC_LIST="$ARCHS" \
        "$WORK/snap/launch/build-horovod.sh" "$PY" "$WORK/wheels") || {
  failed=$(ls "$WORK"/wheels/horovod-build-failed.log 2>/dev/null | head -n1)
  [ -z "$failed" ] || cp "$failed" "$OUTDIR/build.log"
  die "launch/build-horovod.sh failed (its log: $OUTDIR/build.log)"
}
build_s=$(( $(date +%s) - t ))
wheel_dir=$(dirname "$wheel")
cp "$wheel_dir/build.log" "$OUTDIR/build.log" 2>/dev/null || true
note "build: $(basename "$wheel") in $wheel_dir: $build_s s here ($(cat "$wheel_dir/build-seconds" 2>/dev/null || echo '?') s compiling when it was built)"
grep -E "CUDA compiler identification|Linking against shared NCCL|NCCL_VERSION_CODE|Found NCCL|Could NOT find MPI|Found MPI" \
  "$wheel_dir/build.log" | sed 's/^/  build.log: /' | sort -u | head -n 12 || true
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade --target "$SITE" "$wheel" \
  || die "pip could not install $wheel"
export PATH="$SITE/bin:$PATH"

# ---- 3. the build, proven ---------------------------------------------------------------------------
horovodrun --check-build | tee "$OUTDIR/check-build.txt"
grep -q '\[X\] NCCL' "$OUTDIR/check-build.txt" || die "horovodrun --check-build does not list NCCL"
grep -q '\[X\] PyTorch' "$OUTDIR/check-build.txt" || die "horovodrun --check-build does not list PyTorch"
lib=$(ls "$SITE"/horovod/torch/mpi_lib_v2*.so)
needed=$(readelf -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | paste -sd' ')
for want in libnccl.so.2 "libcudart.so.${torch_cuda%%.*}"; do
  [[ " $needed " == *" $want "* ]] || die "$(basename "$lib") does not need $want (NEEDED: $needed)"
done
note "check-build: NCCL listed; $(basename "$lib") needs libnccl.so.2 and libcudart.so.${torch_cuda%%.*}"

HVD=(horovodrun -np 1 -H localhost:1 --gloo)
J=$WORK/json
step "libs: imports, loaded libraries, allreduce of $([ "$has_gpu" = True ] && echo CUDA || echo CPU) tensors" 20 90 \
  env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT HOROVOD_TIMELINE="$WORK/timeline.json" \
  "${HVD[@]}" "$PY" benchmarks/gpu/bench_gpu.py libs "$J/libs.json" \
    --sizes "$([ "$REHEARSE" = 1 ] && echo 0.004,1 || echo 0.004,1,64,256)"
nccl_lines=$(grep -c 'NCCL INFO' "$OUTDIR/log.txt" || true)
timeline_nccl=$(grep -c 'NCCL_ALLREDUCE' "$WORK/timeline.json" 2>/dev/null || true)
note "libs: NCCL_DEBUG printed ${nccl_lines} 'NCCL INFO' lines; Horovod's timeline holds ${timeline_nccl:-0} NCCL_ALLREDUCE events"

# ---- 4. measurements ----------------------------------------------------------------------------------
if [ "$REHEARSE" = 1 ]; then
  MODELS=(resnet20:3,32,32:10:32:256 resnet50:3,64,64:10:4:16); REPEATS=1
  OOM=(--model resnet20:3,32,32:10 --batch 64 --samples 256 --cap-gib 1)
  FMNIST=(--train-samples 2048 --test-samples 500 --epochs 2 --threads 1)
else
  MODELS=(resnet20:3,32,32:10:512:16384 resnet50:3,224,224:1000:128:2048); REPEATS=3
  OOM=(--model resnet50:3,224,224:1000 --batch 256 --samples 1024 --cap-gib 12)
  FMNIST=(--epochs 4 --device cuda)
fi
step "devmap: 2 ranks, each with CUDA_VISIBLE_DEVICES=0 (one GPU each)" 30 60 \
  env CUDA_VISIBLE_DEVICES=0 horovodrun -np 2 -H localhost:2 --gloo "$PY" benchmarks/gpu/bench_gpu.py devmap "$J/devmap.json"
step "throughput: ${MODELS[*]} at fp32 and bf16, trainer against a plain loop" 90 240 \
  "${HVD[@]}" "$PY" benchmarks/gpu/bench_gpu.py throughput "$J/throughput.json" --models "${MODELS[@]}" \
    --precisions fp32,bf16 --repeats "$REPEATS"
for precision in fp32 bf16; do
  step "fashion-mnist $precision: the CLI, 1 $([ "$REHEARSE" = 1 ] && echo process || echo GPU)" 45 150 \
    "${HVD[@]}" "$PY" -m adabatch_hvd --config configs/fashion_mnist.yaml --root "$CARRY/fashion-mnist" \
      --precision "$precision" "${FMNIST[@]}" --quiet true --run-dir "$WORK/fmnist-$precision-$$"
  if [ -f "$WORK/fmnist-$precision-$$/metrics.jsonl" ]; then
    cp "$WORK/fmnist-$precision-$$/metrics.jsonl" "$J/fmnist-$precision.jsonl"
  fi
done
step "oom: --max-micro-batch auto under a ${OOM[-1]} GiB memory cap" 45 120 \
  "${HVD[@]}" "$PY" benchmarks/gpu/bench_gpu.py oom "$J/oom.json" "${OOM[@]}"

# ---- 5. results ------------------------------------------------------------------------------------------
"$PY" - "$J" "$OUTDIR" "$REHEARSE" "$build_s" "$(elapsed)" "${notes[@]}" <<'EOF'
import json, pathlib, subprocess, sys
j, out, rehearse, build_s, total = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
notes = sys.argv[6:]
load = lambda name: json.loads((j / name).read_text()) if (j / name).exists() else None
res = {n: load(f"{n}.json") for n in ("libs", "devmap", "throughput", "oom")}
fm = {p: [json.loads(l) for l in (j / f"fmnist-{p}.jsonl").read_text().splitlines()] if (j / f"fmnist-{p}.jsonl").exists() else None
      for p in ("fp32", "bf16")}
res["fashion_mnist"], res["notes"], res["rehearsal"] = fm, notes, rehearse
(out / "results.json").write_text(json.dumps(res, indent=1))
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() if not rehearse else "no GPU (rehearsal on the CPU)"
L = [f"\n## GPU check{' REHEARSAL (CPU, small sizes: no GPU figures)' if rehearse else ''}: {gpu}\n",
     f"`benchmarks/gpu_check.sh{' --rehearse' if rehearse else ''}`: {total} s in all, Horovod set-up {build_s} s.\n"]
if res["libs"]:
    l = res["libs"]
    L.append(f"- Horovod {l['horovod']} on torch {l['torch']} (CUDA {l['torch_cuda']}): NCCL built {l['nccl_built']}, "
             f"Gloo {l['gloo_built']}, MPI {l['mpi_built']}; torch's NCCL {l['torch_nccl']}")
    L.append("- loaded: " + ", ".join(p.split("site-packages/")[-1] for p in l["loaded"]))
    for a in l["allreduce"]:
        L.append(f"- allreduce {a['MiB']} MiB on {a['device']}: correct {a['correct']}, {a['ms']:.3f} ms "
                 f"({a['algbw_GBps']:.1f} GB/s algorithm bandwidth; 1 rank: a local copy, no link measured)")
if res["devmap"]:
    for r in res["devmap"]["ranks"]:
        L.append(f"- devmap rank {r['rank']} (local {r['local_rank']}, CUDA_VISIBLE_DEVICES={r['CUDA_VISIBLE_DEVICES']}, "
                 f"{r['device_count']} visible): {r.get('device') or r.get('error')}")
if res["throughput"]:
    L += ["\n| model | input | micro-batch | precision | trainer samples/s | plain samples/s | trainer / plain (goal >= 0.9) |",
          "|---|---|---|---|---|---|---|"]
    for p in res["throughput"]["points"]:
        L.append(f"| {p['model']} | {'x'.join(map(str, p['shape']))} | {p['micro_batch']} | {p['precision']} | "
                 f"{p['trainer']['samples_per_second']:.0f} | {p['plain']['samples_per_second']:.0f} | {p.get('ratio', 0):.3f} |")
    L.append("")
for p, recs in fm.items():
    if recs:
        r = recs[-1]
        L.append(f"- Fashion-MNIST {p}: {len(recs)} epochs, final train loss {r['train_loss']:.4f}, test acc "
                 f"{r['test_acc']:.4f}, {r['samples_per_second']:.0f} samples/s")
if fm["fp32"] and fm["bf16"]:
    L.append(f"- bf16 - fp32 test accuracy: {fm['bf16'][-1]['test_acc'] - fm['fp32'][-1]['test_acc']:+.4f}")
if res["oom"]:
    o = res["oom"]
    cap = f"a {o['memory_GiB_cap']} GiB cap" if o["memory_GiB_cap"] else "no cap (CPU: no CUDA out-of-memory possible)"
    L.append(f"- oom: global batch {o['global_batch']} under {cap}: finished {o.get('finished')}, "
             f"{o['out_of_memory_count']} out-of-memory warnings, micro-batches per epoch "
             f"{[e['micro_batch'] for e in o['epochs']]}" + (f", error {o['error']}" if o.get("error") else ""))
L += ["", "Steps:"] + [f"- {n}" for n in notes]
text = "\n".join(L) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
if [ "$REHEARSE" = 0 ]; then
  cat "$OUTDIR/summary.md" >>benchmarks/RESULTS.md
  log "appended $OUTDIR/summary.md to benchmarks/RESULTS.md"
fi
log "done in $(elapsed) s; $OUTDIR: $(ls "$OUTDIR" | paste -sd' ')"
grep -q 'FAILED' <<<"${notes[*]}" && exit 1
exit 0

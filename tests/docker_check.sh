#!/usr/bin/env bash
# make docker-check: build the image and run it the way a cluster user does, on this machine.
#
#   tests/docker_check.sh                  (root; Debian/Ubuntu; needs the Debian mirror and PyPI)
#   FLAVOUR=cuda tests/docker_check.sh     the CUDA + NCCL flavour (make docker-check FLAVOUR=cuda);
#                                          needs no GPU: its CPU path is what runs here
#
#  1. docker.io, debootstrap (and ssh-keygen) from Debian if missing; starts dockerd if none answers (and stops it
#     again at the end). The Debian client /usr/bin/docker with DOCKER_BUILDKIT=1 is used throughout.
#  2. the base image: debian:bookworm from a registry if one answers, else made from Debian's
#     packages (debootstrap --variant=minbase + docker import); kept for the next run.
#     FLAVOUR=cuda: nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04 from a registry if one answers, else
#     that Debian base plus this machine's CUDA 13 toolkit ($DOCKER_CHECK_CUDA_HOME, default
#     /usr/local/cuda, copied to /usr/local/cuda-<version> with the link /usr/local/cuda), kept as
#     adabatch-base:bookworm-cuda<version>.
#  3. builds the flavour with the machine's CA bundle as the build secret "ca", records the build
#     time and the image size, and proves the secret is in no layer. DOCKER_CHECK_CUDA_ARCHS=90
#     (the build argument CUDA_ARCHS) compiles Horovod's CUDA kernels for those architectures only.
#  4. horovodrun --check-build in the image (PyTorch, MPI, Gloo; and NCCL for cuda, whose
#     libnccl.so.2 and libcudart must be torch's own once horovod.torch is imported).
#  5. the entrypoint's three forms, as the image's non-root user, with a bind-mounted host run dir:
#     adabatch-train options; horovodrun -np 2 -H localhost:2; a worker running sshd.
#  6. one job across two containers on a Docker network (launch/docker-run.sh worker + launch),
#     with Gloo and with MPI.
#  7. kills the worker container mid-run: the job must end non-zero; then --resume finishes it.
# Prints a summary with the figures; logs and the summary go to $DOCKER_CHECK_OUT
# (default runs/docker-check, runs/docker-check-cuda for FLAVOUR=cuda). Everything it creates is named
# adabatch-dc<id> and removed at the end, except the base images and the image
# (adabatch-hvd:<flavour>-check), whose layers and build cache make the next run fast.
# dockerd sets the iptables FORWARD policy to DROP when it starts, which cuts bridged network
# namespaces (the test cluster of other runs on this machine): the policy found before is put back
# at once.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ID=dc$$
FLAVOUR=${FLAVOUR:-cpu}
case $FLAVOUR in cpu|cuda) ;; *) echo "docker-check: FLAVOUR must be cpu or cuda, got '$FLAVOUR'" >&2; exit 2 ;; esac
OUT=${DOCKER_CHECK_OUT:-$ROOT/runs/docker-check$([ "$FLAVOUR" = cpu ] || echo "-$FLAVOUR")}
BASE=${DOCKER_CHECK_BASE:-adabatch-base:bookworm}
CUDA_IMAGE=${DOCKER_CHECK_CUDA_IMAGE:-nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04}
CUDA_HOME_HERE=${DOCKER_CHECK_CUDA_HOME:-/usr/local/cuda}
IMAGE=adabatch-hvd:$FLAVOUR-check
CA=${DOCKER_CHECK_CA:-/etc/ssl/certs/ca-certificates.crt}
MIRROR=${DOCKER_CHECK_MIRROR:-http://deb.debian.org/debian}
NET=adabatch-$ID
WORK=$(mktemp -d "/tmp/adabatch-$ID.XXXX")
DOCKER=/usr/bin/docker              # Debian's client: BuildKit built in (other clients may lack buildx)
export DOCKER_BUILDKIT=1
# Tiny jobs: 2048 Fashion-MNIST images, the default config's model and batch schedule, 1 thread.
TRAIN=(--config configs/fashion_mnist.yaml --train-samples 2048 --test-samples 1000 --run.threads 1 --quiet true)

die() { echo "docker-check: FAILED: $*" >&2; exit 1; }
log() { echo "docker-check: $*"; }
summary=()
note() { summary+=("$*"); log "$*"; }

mkdir -p "$OUT"
: >"$OUT/summary.txt"
started_dockerd=""
forward_policy=""
cleanup() {
  local rc=$?
  if [ -S /var/run/docker.sock ]; then
    # shellcheck disable=SC2046
    "$DOCKER" rm -f $("$DOCKER" ps -aq --filter "name=adabatch-$ID") >/dev/null 2>&1 || true
    "$DOCKER" network rm "$NET" >/dev/null 2>&1 || true
    "$DOCKER" image rm "adabatch-$ID-leak" >/dev/null 2>&1 || true
  fi
  if [ -n "$started_dockerd" ]; then
    kill "$started_dockerd" 2>/dev/null || true
    wait "$started_dockerd" 2>/dev/null || true
    log "stopped the dockerd this check started (pid $started_dockerd)"
    if [ -n "${forward_policy:-}" ]; then
      iptables -P FORWARD "$forward_policy" && log "iptables FORWARD policy put back to $forward_policy"
    fi
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT

now() { date +%s; }
t_all=$(now)

# ---- 1. Docker ------------------------------------------------------------------------------------
[ "$(id -u)" = 0 ] || die "run as root (it installs packages and starts dockerd)"
missing=()
for p in docker.io debootstrap openssh-client; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
      --no-install-recommends "${missing[@]}"; } >"$OUT/apt.log" 2>&1 \
    || die "apt-get install ${missing[*]} failed; see $OUT/apt.log"
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
  log "starting dockerd (log: $OUT/dockerd.log)"
  # dockerd sets the FORWARD policy to DROP, which cuts bridged network namespaces (the test
  # cluster); the policy found here is put back when this dockerd is stopped.
  forward_policy=$(iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p')
  dockerd --storage-driver=overlay2 >"$OUT/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null 2>&1 || die "dockerd did not answer within 60 s; see $OUT/dockerd.log"
  # At once, not at the end: other jobs' namespace hosts on this machine need their bridge now.
  # Docker's own chains still accept the containers' traffic.
  if [ -n "$forward_policy" ] && [ "$(iptables -S FORWARD 2>/dev/null | sed -n 's/^-P FORWARD //p')" != "$forward_policy" ]; then
    iptables -P FORWARD "$forward_policy" && log "iptables FORWARD policy put back to $forward_policy (dockerd had changed it)"
  fi
fi
# docker-run.sh calls plain "docker": make it Debian's client.
mkdir -p "$WORK/bin"
ln -s "$DOCKER" "$WORK/bin/docker"
export PATH="$WORK/bin:$PATH"

# ---- 2. base image -----------------------------------------------------------------------------------
t=$(now)
if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  note "base image: $BASE (kept from an earlier run)"
elif timeout 60 "$DOCKER" pull -q debian:bookworm >"$OUT/pull.log" 2>&1; then
  "$DOCKER" tag debian:bookworm "$BASE"
  note "base image: debian:bookworm pulled from a registry in $(( $(now) - t )) s"
else
  log "no registry answered ($(tail -n1 "$OUT/pull.log")); making $BASE with debootstrap from $MIRROR"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$OUT/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $OUT/debootstrap.log"
  tar -C "$WORK/rootfs" -c . | "$DOCKER" import -c 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$WORK/rootfs"
  note "base image: $BASE made with debootstrap + docker import in $(( $(now) - t )) s"
fi
build_base=$BASE
if [ "$FLAVOUR" = cuda ]; then
  # A CUDA 13 devel base: NVIDIA's from a registry, else Debian plus this machine's toolkit.
  t=$(now)
  nvcc_here="$CUDA_HOME_HERE/bin/nvcc"
  cuda_ver=$("$nvcc_here" --version 2>/dev/null | sed -n 's/.*release [0-9.]*, V\([0-9.]*\).*/\1/p') || true
  cuda_base=${DOCKER_CHECK_CUDA_BASE:-adabatch-base:bookworm-cuda${cuda_ver:-none}}
  if "$DOCKER" image inspect "$cuda_base" >/dev/null 2>&1; then
    build_base=$cuda_base
    note "cuda base image: $cuda_base (kept from an earlier run)"
  elif timeout 60 "$DOCKER" pull -q "$CUDA_IMAGE" >"$OUT/pull-cuda.log" 2>&1; then
    build_base=$CUDA_IMAGE
    note "cuda base image: $CUDA_IMAGE pulled from a registry in $(( $(now) - t )) s"
  else
    log "no registry served $CUDA_IMAGE ($(tail -n1 "$OUT/pull-cuda.log")); making $cuda_base from $BASE and $CUDA_HOME_HERE"
    [ -n "$cuda_ver" ] || die "no CUDA toolkit here to make the cuda base from: $nvcc_here is missing (set DOCKER_CHECK_CUDA_HOME)"
    [ "${cuda_ver%%.*}" = 13 ] || die "the toolkit at $CUDA_HOME_HERE is CUDA $cuda_ver; torch 2.14.1 needs CUDA 13"
    toolkit=$(realpath "$CUDA_HOME_HERE")
    links_out=$(find "$toolkit" -type l -lname '/*' | head -n3)
    [ -z "$links_out" ] || die "the toolkit at $toolkit has links to absolute paths, which a copy would break: $links_out"
    mkdir -p "$WORK/cuda-base"
    cp -a "$toolkit" "$WORK/cuda-base/cuda"
    cat >"$WORK/cuda-base/Dockerfile" <<EOF
FROM $BASE
COPY cuda /usr/local/cuda-$cuda_ver
RUN ln -s cuda-$cuda_ver /usr/local/cuda && /usr/local/cuda/bin/nvcc --version
ENV PATH=/usr/local/cuda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    CUDA_VERSION=$cuda_ver NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
LABEL org.adabatch.base="Debian bookworm (debootstrap) + the CUDA $cuda_ver toolkit of the machine that built it"
EOF
    "$DOCKER" build --progress=plain -t "$cuda_base" "$WORK/cuda-base" >"$OUT/cuda-base.log" 2>&1 \
      || { tail -n 20 "$OUT/cuda-base.log" >&2; die "making the cuda base image failed; see $OUT/cuda-base.log"; }
    rm -rf "$WORK/cuda-base"
    build_base=$cuda_base
    note "cuda base image: $cuda_base made from $BASE + $toolkit (CUDA $cuda_ver, $(du -sh "$toolkit" | cut -f1)) in $(( $(now) - t )) s, $(awk -v b="$("$DOCKER" image inspect -f '{{.Size}}' "$cuda_base")" 'BEGIN{printf "%.2f GB", b/1e9}')"
  fi
fi

# ---- 3. build the image -------------------------------------------------------------------------------
# The CA bundle gets a marker line (PEM readers skip text outside certificates). The marker is
# computed, not written in this file, because the image contains this file.
[ -r "$CA" ] || die "no CA bundle at $CA (set DOCKER_CHECK_CA)"
marker="adabatch-docker-check-secret-$(printf 'ca marker' | sha256sum | cut -c1-16)"
{ cat "$CA"; echo "# $marker"; } >"$WORK/ca.pem"
t=$(now)
build_args=(--build-arg FLAVOUR="$FLAVOUR" --build-arg BASE_IMAGE="$build_base")
[ -z "${DOCKER_CHECK_CUDA_ARCHS:-}" ] || build_args+=(--build-arg CUDA_ARCHS="$DOCKER_CHECK_CUDA_ARCHS")
"$DOCKER" build --progress=plain "${build_args[@]}" \
    --secret id=ca,src="$WORK/ca.pem" -t "$IMAGE" "$ROOT" >"$OUT/build.log" 2>&1 \
  || { tail -n 40 "$OUT/build.log" >&2; die "docker build failed; see $OUT/build.log"; }
build_s=$(( $(now) - t ))
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
cached=$(grep -c '^#[0-9]* CACHED' "$OUT/build.log" || true)
steps=$(grep -cE '^#[0-9]+ \[[^]]* [0-9]+/[0-9]+\]' "$OUT/build.log" || true)
note "build: $IMAGE (FLAVOUR=$FLAVOUR${DOCKER_CHECK_CUDA_ARCHS:+, CUDA_ARCHS=$DOCKER_CHECK_CUDA_ARCHS}, base $build_base) in ${build_s} s, $cached of $steps steps cached; image size $(awk -v b="$size" 'BEGIN{printf "%.2f GB", b/1e9}')"
if grep -qE '^#[0-9]+ [0-9.]+ build: pip uses the CA bundle' "$OUT/build.log"; then
  note "build secret: the set-up step used the CA bundle"
fi

# The secret in no layer and not in the history or the image's environment...
t=$(now)
leaks=$("$DOCKER" save "$IMAGE" | grep -a -c -F "$marker" || true)
[ "$leaks" = 0 ] || die "the CA bundle from the build secret is in a layer of $IMAGE ($leaks hits)"
"$DOCKER" history --no-trunc "$IMAGE" | grep -q -F "$marker" && die "the CA bundle is in the image history"
"$DOCKER" image inspect -f '{{json .Config.Env}}' "$IMAGE" | grep -qE 'PIP_CERT|SSL_CERT_FILE' \
  && die "PIP_CERT/SSL_CERT_FILE are baked into the image's environment"
# ...while the same search finds it in an image that does copy it (the search can fail).
printf 'FROM %s\nCOPY ca.pem /tmp/\n' "$BASE" >"$WORK/Dockerfile.leak"
"$DOCKER" build -q -f "$WORK/Dockerfile.leak" -t "adabatch-$ID-leak" "$WORK" >/dev/null
found=$("$DOCKER" save "adabatch-$ID-leak" | grep -a -c -F "$marker" || true)
[ "$found" -gt 0 ] || die "the layer search did not find the bundle in an image that contains it"
note "build secret: in no layer of $IMAGE, not in its history or env; the same search finds it in a control image ($(( $(now) - t )) s)"

# ---- 4. --check-build ----------------------------------------------------------------------------------
check=$("$DOCKER" run --rm --name "adabatch-$ID-check" "$IMAGE" horovodrun --check-build)
echo "$check" >"$OUT/check-build.txt"
expect=("[X] PyTorch:1" "[X] MPI:2" "[X] Gloo:2")
if [ "$FLAVOUR" = cpu ]; then expect+=("[X] NCCL:0"); else expect+=("[X] NCCL:1"); fi
for line in "${expect[@]}"; do
  [ "$(grep -cF "${line%:*}" <<<"$check" || true)" = "${line##*:}" ] \
    || die "--check-build: '${line%:*}' is not there ${line##*:} time(s): $check"
done
note "check-build: PyTorch, MPI and Gloo controllers and tensor ops built; NCCL $(grep -q '\[X\] NCCL' <<<"$check" && echo built || echo not built)"
if [ "$FLAVOUR" = cuda ]; then
  # One NCCL and one CUDA runtime in the process, both from torch's wheels (no GPU needed).
  libs=$("$DOCKER" run --rm --name "adabatch-$ID-libs" "$IMAGE" python -c '
import horovod.torch as hvd, torch
hvd.init()
maps = {l.split()[-1] for l in open("/proc/self/maps") if "/" in l}
print("nccl_built", hvd.nccl_built(), "cuda", torch.version.cuda)
for lib in sorted(m for m in maps if "libnccl" in m or "libcudart" in m):
    print(lib)
print("allreduce", hvd.allreduce(torch.tensor([1.0, 2.0]), op=hvd.Sum).tolist())
') || die "import horovod.torch in $IMAGE failed"
  echo "$libs" >"$OUT/libs.txt"
  grep -q '^nccl_built [1-9][0-9]* cuda 13' <<<"$libs" || die "horovod.torch in $IMAGE: $libs"
  [ "$(grep -c 'libnccl' <<<"$libs")" = 1 ] && grep -q '/site-packages/nvidia/nccl/lib/libnccl.so.2$' <<<"$libs" \
    || die "libnccl in the process is not torch's one: $libs"
  if grep 'libcudart' <<<"$libs" | grep -qv '/site-packages/nvidia/'; then
    die "a CUDA runtime not from torch's wheels is loaded: $libs"
  fi
  grep -q '^allreduce \[1.0, 2.0\]' <<<"$libs" || die "one-process allreduce in $IMAGE: $libs"
  note "libraries: $(sed -n 1p <<<"$libs"); loaded: $(grep -v '^nccl_built\|^allreduce' <<<"$libs" | sed 's|.*/site-packages/|site-packages/|' | paste -sd' ')"
fi

# ---- 5. the entrypoint's three forms, as the non-root user ------------------------------------------------
uid=$("$DOCKER" image inspect -f '{{.Config.User}}' "$IMAGE")
[[ $uid =~ ^[1-9][0-9]*$ ]] || die "the image's USER is '$uid', not a non-root UID"
mkdir -p "$WORK/runs" "$WORK/data"
chown "$uid" "$WORK/runs"               # the image's user writes there
work=/opt/adabatch-hvd
mount=(-v "$WORK/runs:$work/runs" -e OMP_NUM_THREADS=1)

owned() {  # owned RUN: every file of $WORK/runs/RUN belongs to the image's user
  local bad
  [ -s "$WORK/runs/$1/metrics.jsonl" ] || die "$1: no metrics.jsonl in the bind-mounted run dir"
  bad=$(find "$WORK/runs/$1" ! -uid "$uid" | head -n3)
  [ -z "$bad" ] || die "$1: files not owned by UID $uid: $bad"
}
field() {  # field RUN KEY [INDEX]: KEY of the run's metrics record INDEX (default: the last)
  python3 -c 'import json, sys; print([json.loads(l) for l in open(sys.argv[1])][int(sys.argv[3])][sys.argv[2]])' \
    "$WORK/runs/$1/metrics.jsonl" "$2" "${3:--1}"
}
metrics() {  # metrics RUN: one line per epoch
  python3 - "$WORK/runs/$1/metrics.jsonl" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"epoch {r['epoch']}: world size {r['world_size']}, global batch {r['global_batch']}, "
          f"train loss {r['train_loss']:.4f}, test acc {r['test_acc']:.4f}, {r['samples_per_second']:.0f} samples/s")
EOF
}

t=$(now)
"$DOCKER" run --rm --name "adabatch-$ID-one" "${mount[@]}" "$IMAGE" "${TRAIN[@]}" --epochs 1 --run-dir runs/one \
  >"$OUT/one.log" 2>&1 || { tail -n 20 "$OUT/one.log" >&2; die "docker run IMG --epochs 1 failed"; }
owned one
note "form 1: docker run IMG --config ... --epochs 1: rc 0 in $(( $(now) - t )) s, files owned by UID $uid, $(metrics one | tail -n1)"

t=$(now)
"$DOCKER" run --rm --name "adabatch-$ID-local" "${mount[@]}" "$IMAGE" horovodrun -np 2 -H localhost:2 --gloo \
  adabatch-train "${TRAIN[@]}" --epochs 2 --run-dir runs/local >"$OUT/local.log" 2>&1 \
  || { tail -n 20 "$OUT/local.log" >&2; die "docker run IMG horovodrun -np 2 -H localhost:2 failed"; }
owned local
[ "$(field local world_size)" = 2 ] || die "horovodrun -np 2 in one container did not train on 2 workers"
note "form 2: docker run IMG horovodrun -np 2 -H localhost:2 --gloo: rc 0 in $(( $(now) - t )) s, $(metrics local | tail -n1)"

# Form 3, the worker, is started by docker-run.sh on a Docker network; the next step uses it.
"$DOCKER" network create "$NET" >/dev/null
"$ROOT/launch/docker-run.sh" keys -k "$WORK/keys" >/dev/null
chown -R "$uid" "$WORK/keys"           # ssh and sshd run as the image's user and refuse others' keys
cd "$WORK"                              # docker-run.sh mounts ./runs and ./data
dr=("$ROOT/launch/docker-run.sh")
opts=(-i "$IMAGE" -k "$WORK/keys" --network "$NET" --gpus none -e OMP_NUM_THREADS=1)
worker="adabatch-$ID-w1"
launcher="adabatch-$ID-l0"
start_worker() {
  "$DOCKER" rm -f "$worker" >/dev/null 2>&1 || true
  "${dr[@]}" worker "${opts[@]}" --name "$worker" >/dev/null 2>"$OUT/worker.err" \
    || { cat "$OUT/worker.err" >&2; die "docker-run.sh worker failed"; }
  for _ in $(seq 30); do
    "$DOCKER" logs "$worker" 2>&1 | grep -q "Server listening" && return 0
    sleep 1
  done
  "$DOCKER" logs "$worker" >&2; die "the worker's sshd did not start"
}
start_worker
sshd_uid=$("$DOCKER" exec "$worker" ps -o uid= -C sshd | head -n1 | tr -d ' ')
[ "$sshd_uid" = "$uid" ] || die "the worker's sshd runs as UID '$sshd_uid', not $uid"
login=$("$DOCKER" run --rm --name "adabatch-$ID-ssh" --network "$NET" -v "$WORK/keys:/home/adabatch/.ssh:ro" "$IMAGE" \
  ssh -p 12345 "$worker" 'id -u; python -c "import horovod.torch as h; print(h.gloo_built(), h.mpi_built())"') \
  || die "ssh into the worker failed"
[ "$login" = "$uid"$'\n'"True True" ] || die "ssh into the worker gave '$login'"
note "form 3: worker docker run IMG /usr/sbin/sshd (docker-run.sh worker --network): sshd as UID $uid, key login from another container works"

# ---- 6. one job, two containers ---------------------------------------------------------------------------
launch() {  # launch CONTROLLER RUN ARGS...: the job on the launcher + the worker, 1 rank each
  local controller=$1 run=$2; shift 2
  "${dr[@]}" launch "${opts[@]}" --name "$launcher" -H "$launcher:1,$worker:1" "--$controller" -- \
    "${TRAIN[@]}" --run-dir "runs/$run" "$@"
}
for controller in gloo mpi; do
  t=$(now)
  launch "$controller" "two-$controller" --epochs 2 >"$OUT/two-$controller.log" 2>&1 \
    || { tail -n 30 "$OUT/two-$controller.log" >&2; die "the two-container job with --$controller failed"; }
  owned "two-$controller"
  [ "$(field "two-$controller" world_size)" = 2 ] || die "the two-container job did not run 2 workers"
  note "two containers, --$controller: rc 0 in $(( $(now) - t )) s"
  while read -r line; do note "  $line"; done < <(metrics "two-$controller")
done
# The same job on one container's 2 ranks and across two containers, Gloo or MPI: the same numbers.
for run in two-gloo two-mpi; do
  [ "$(field $run train_loss)" = "$(field local train_loss)" ] \
    || die "$run's train loss $(field $run train_loss) differs from one container's $(field local train_loss)"
done
note "two containers (Gloo, MPI) and one container (2 ranks): the same final train loss, $(field local train_loss)"

# ---- 7. kill the worker mid-run, then --resume ------------------------------------------------------------
t=$(now)
launch gloo kill --epochs 3 --every-steps 4 >"$OUT/kill.log" 2>&1 &
job=$!
for _ in $(seq 600); do
  compgen -G "$WORK/runs/kill/checkpoints/ckpt-*.pt" >/dev/null && break
  kill -0 "$job" 2>/dev/null || break
  sleep 0.5
done
compgen -G "$WORK/runs/kill/checkpoints/ckpt-*.pt" >/dev/null \
  || { tail -n 30 "$OUT/kill.log" >&2; die "the job wrote no checkpoint before it ended"; }
kill -0 "$job" 2>/dev/null || { tail -n 30 "$OUT/kill.log" >&2; die "the job ended before the worker could be killed"; }
"$DOCKER" kill "$worker" >/dev/null
killed_at=$(now)
rc=0
timeout 300 tail --pid="$job" -f /dev/null || die "the job did not end within 300 s after the worker was killed"
wait "$job" || rc=$?
[ "$rc" != 0 ] || die "the job ended with rc 0 although its worker was killed"
ckpts=$(cd "$WORK/runs/kill/checkpoints" && echo ckpt-*.pt)
note "kill: docker kill $worker mid-run: the job ended with rc $rc, $(( $(now) - killed_at )) s after the kill; checkpoints: $ckpts"
start_worker
launch gloo kill --epochs 3 --every-steps 4 --resume >"$OUT/resume.log" 2>&1 \
  || { tail -n 30 "$OUT/resume.log" >&2; die "--resume after the kill failed"; }
[ "$(field kill epoch)" = 2 ] || die "the resumed job did not finish epoch 2 (last record: $(tail -n1 "$WORK/runs/kill/metrics.jsonl"))"
resumed=$(grep -o -m1 'resuming from .*' "$OUT/resume.log") || die "the resumed job did not say it resumed"
note "resume: --resume finished all 3 epochs ($(( $(now) - t )) s from the first start); ${resumed/$work\//}"
while read -r line; do note "  $line"; done < <(metrics kill)
# Epochs 0-1 were cut by the kill and resumed: they must still match the uninterrupted job exactly.
[ "$(field kill train_loss 1)" = "$(field two-gloo train_loss 1)" ] \
  || die "after the kill and --resume, epoch 1's train loss $(field kill train_loss 1) differs from the uninterrupted $(field two-gloo train_loss 1)"
note "resume: epoch 1's train loss equals the uninterrupted two-container job's, $(field kill train_loss 1)"

note "total: $(( $(now) - t_all )) s"
echo
echo "docker-check: summary"
printf '  %s\n' "${summary[@]}" | tee "$OUT/summary.txt"

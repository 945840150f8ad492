#!/usr/bin/env bash
# Run the adabatch-hvd image (Dockerfile) on one node or on several. See usage() or launch/README.md.
set -euo pipefail
PROG=docker-run
# shellcheck source=launch/lib.sh
. "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

usage() {
  cat <<'EOF'
Usage:
  launch/docker-run.sh [options] [--] [adabatch-train arguments...]          one node
  launch/docker-run.sh keys [-k DIR]                                         once: ssh keys for multi-node
  launch/docker-run.sh worker [options]                                      every node but the first
  launch/docker-run.sh launch -H HOSTS [options] [--] [adabatch-train args]  the first node

One node: N processes (default: one per GPU that nvidia-smi lists) in one container:
    docker run --rm --gpus all --network host --ipc host -v $PWD/runs:... IMG \
        horovodrun -np N -H localhost:N --gloo adabatch-train ARGS...

Several nodes: containers reach each other over ssh, as Horovod's own Docker guide does.
On the host network (the default) each node runs one container; with --network NET the
containers join a Docker network instead (e.g. several "nodes" on one machine, or an overlay
network), each with its container name as hostname, which is what -H then lists.
  1. keys     writes DIR (default ~/.ssh/adabatch-hvd) with a key pair, authorized_keys, an
              sshd host key and an ssh config; put DIR on every node (shared home, or copy).
  2. worker   on each other node: a detached container running sshd on port -p (as the
              image's unprivileged user; key login only) and waiting for horovodrun.
  3. launch   on the first node: horovodrun -np N -H HOSTS -p PORT ... inside a container;
              the first node's ranks run in that container, the others in the workers'.
  Stop the workers afterwards: docker rm -f adabatch-worker

Options:
  -i, --image IMG     image (default $ADABATCH_IMAGE or adabatch-hvd:latest)
  -n, -np N           processes: on this node (one node) or in total (launch; default:
                      the sum of the slots in -H)
  -H HOSTS            launch: host1:4,host2:4 -- the first node's own hostname first
                      (with --network NET: the containers' names, the launch container's first)
  -p, --port PORT     sshd port inside worker containers (default 12345)
  -k, --ssh-dir DIR   key directory (default $ADABATCH_SSH_DIR or ~/.ssh/adabatch-hvd);
                      mounted as the container user's ~/.ssh, so build the image with
                      --build-arg USER_UID=$(id -u) (ssh refuses keys it cannot own)
  --iface IF          network interface: NCCL_SOCKET_IFNAME, HOROVOD_GLOO_IFACE and
                      horovodrun --network-interfaces
  --network NET       Docker network (default host); any other network gives the container
                      --hostname = its --name, so containers find each other by name
  --gpus SPEC         docker run --gpus SPEC (default: all when nvidia-smi lists a GPU,
                      otherwise none, the CPU image)
  --gloo | --mpi      Horovod controller (default gloo)
  --threads T         torch threads per rank (OMP_NUM_THREADS in the containers; default: the
                      trainer's, the container's usable cores, --cpus quota included, / its ranks)
  -v SRC:DST          an extra bind mount (repeatable); ./runs and ./data are always
                      mounted at /opt/adabatch-hvd/runs and /opt/adabatch-hvd/data
  -e VAR[=VALUE]      pass an environment variable (repeatable), e.g. -e NCCL_DEBUG=INFO
  --name NAME         container name (default adabatch-train / adabatch-worker)
  --dry-run           print the docker command, run nothing
  -h, --help          this text

Everything is checked before anything is created or started (./runs, ./data, a container): a
mistake, a mode not known or an option the mode has no use for is one line and exit code 2.

Examples:
  launch/docker-run.sh -n 4 -- --config configs/cifar10_resnet20_adabatch.yaml --run-dir runs/c10
  launch/docker-run.sh keys
  ssh node2 'cd adabatch-hvd && launch/docker-run.sh worker'
  launch/docker-run.sh launch -H node1:4,node2:4 --iface ib0 -- --config configs/imagenet_resnet50.yaml
  docker network create adabatch                                     # two "nodes" on one machine
  launch/docker-run.sh worker --network adabatch --name w1
  launch/docker-run.sh launch --network adabatch --name l0 -H l0:1,w1:1 -- --config configs/fashion_mnist.yaml
EOF
}

# Everything is checked before anything is created or started: a mistake is one line and exit code 2.
mode=single
if [ $# -gt 0 ] && [[ $1 != -* ]]; then
  case $1 in
    keys|worker|launch|single) mode=$1; shift ;;
    *) hint=$(suggest "$1" keys worker launch)
       die "unknown mode '$1'${hint:- (the modes are keys, worker and launch; one node needs none)}" ;;
  esac
fi

image=${ADABATCH_IMAGE:-adabatch-hvd:latest}
np=""
hosts=""
port=12345
ssh_dir=${ADABATCH_SSH_DIR:-$HOME/.ssh/adabatch-hvd}
iface=""
network=host
gpus=""
threads=""
controller=gloo
name=""
dry_run=0
mounts=()
envs=()
train_args=()
given=()  # the options given, to check them against the mode
while [ $# -gt 0 ]; do
  case $1 in
    -i|--image) need "$1" $#; image=$2; given+=(-i); shift 2 ;;
    -n|-np) need "$1" $#; np=$2; given+=(-n); shift 2 ;;
    -H|--hosts) need "$1" $#; hosts=$2; given+=(-H); shift 2 ;;
    -p|--port) need "$1" $#; port=$2; given+=(-p); shift 2 ;;
    -k|--ssh-dir) need "$1" $#; ssh_dir=$2; given+=(-k); shift 2 ;;
    --iface) need "$1" $#; iface=$2; given+=(--iface); shift 2 ;;
    --network) need "$1" $#; network=$2; given+=(--network); shift 2 ;;
    --gpus) need "$1" $#; gpus=$2; given+=(--gpus); shift 2 ;;
    --gloo|--mpi) controller=${1#--}; given+=("$1"); shift ;;
    --threads) need "$1" $#; threads=$2; given+=(--threads); shift 2 ;;
    -v) need "$1" $#; mounts+=(-v "$2"); given+=(-v); shift 2 ;;
    -e) need "$1" $#; envs+=(-e "$2"); given+=(-e); shift 2 ;;
    --name) need "$1" $#; name=$2; given+=(--name); shift 2 ;;
    *) common_arg "$@"; shift "$took" ;;  # -h, --dry-run, --, training arguments
  esac
done
for opt in "${given[@]}"; do
  case $mode:$opt in
    keys:-k) ;;
    keys:*) die "mode keys takes only -k DIR (and --dry-run), not $opt" ;;
    worker:-n|worker:-H|worker:--gloo|worker:--mpi|worker:--threads)
      die "$opt is not an option of mode worker (it only runs sshd)" ;;
    single:-H) die "-H is for mode launch (docker-run.sh launch -H HOSTS ...); one node needs no host list" ;;
    single:-p|single:-k) die "$opt is for modes worker and launch; one node uses no ssh" ;;
  esac
done
if [ ${#train_args[@]} -gt 0 ] && [[ $mode == keys || $mode == worker ]]; then
  die "mode $mode takes no training arguments, got '${train_args[0]}'"
fi
port_number --port "$port"
[ -z "$threads" ] || positive --threads "$threads"

run() {
  if [ "$dry_run" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

# ---- keys: one key pair for every container of the job ----------------------------------------
if [ "$mode" = keys ]; then
  [ -e "$ssh_dir/id_ed25519" ] && die "$ssh_dir/id_ed25519 exists; remove $ssh_dir to make new keys"
  [ "$dry_run" = 1 ] || command -v ssh-keygen >/dev/null || die "ssh-keygen not found (install openssh-client)"
  run mkdir -p -m 700 "$ssh_dir"
  run ssh-keygen -q -t ed25519 -N "" -C adabatch-hvd -f "$ssh_dir/id_ed25519"
  run ssh-keygen -q -t ed25519 -N "" -C adabatch-hvd-host -f "$ssh_dir/ssh_host_ed25519_key"
  run cp "$ssh_dir/id_ed25519.pub" "$ssh_dir/authorized_keys"
  if [ "$dry_run" = 0 ]; then
    # The containers' host key changes with DIR; the job's hosts are named on the command line.
    printf 'Host *\n    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n    LogLevel ERROR\n' \
      >"$ssh_dir/config"
    chmod 600 "$ssh_dir"/*
    echo "docker-run: keys in $ssh_dir; copy that directory to the same path on every node"
  fi
  exit 0
fi

# ---- the checks of each mode, then the docker run common to every mode ---------------------------
case $mode in
  single)
    if [ -z "$np" ]; then
      np=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
      [ "$np" -gt 0 ] 2>/dev/null || np=1
    fi
    positive -n "$np"
    ;;
  launch)
    [ -n "$hosts" ] || die "launch needs -H host1:4,host2:4"
    total=$(slots_total "$hosts")
    np=${np:-$total}
    positive -n "$np"
    ;;
esac
if [ "$dry_run" = 0 ]; then
  if [ "$mode" != single ]; then
    [ -r "$ssh_dir/authorized_keys" ] || die "no keys in $ssh_dir: run 'launch/docker-run.sh keys' first"
  fi
  command -v docker >/dev/null || die "docker not found: install Docker (or run launch/run-local.sh without it)"
fi

work=/opt/adabatch-hvd          # the image's WORKDIR
[ "$dry_run" = 1 ] || mkdir -p runs data
if [ -z "$gpus" ]; then
  gpus=none
  if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then gpus=all; fi
fi
base=(docker run)
[ "$gpus" = none ] || base+=(--gpus "$gpus")
base+=(--network "$network")
case $mode in
  worker) container=${name:-adabatch-worker} ;;
  *) container=${name:-adabatch-train} ;;
esac
# On a Docker network the others reach this container by name: make that its hostname too, so
# that horovodrun recognises the launch container's own entry in -H.
[ "$network" = host ] || base+=(--hostname "$container")
base+=(--ipc host --ulimit stack=67108864 -v "$PWD/runs:$work/runs" -v "$PWD/data:$work/data")
# InfiniBand/RoCE for NCCL when the host has it; registering RDMA memory needs an unlimited memlock.
# (Only then: raising the limit needs CAP_SYS_RESOURCE, which some sandboxed hosts do not grant.)
if [ -d /dev/infiniband ]; then base+=(--device /dev/infiniband --cap-add IPC_LOCK --ulimit memlock=-1); fi
use_iface "$iface"
for e in "${iface_env[@]}"; do base+=(-e "$e"); done
# --threads: each rank's torch threads (the trainer's default is the container's usable cores, its
# --cpus quota included, / the ranks in it); horovodrun passes OMP_NUM_THREADS on to the workers' ranks.
[ -z "$threads" ] || base+=(-e "OMP_NUM_THREADS=$threads")
base+=("${mounts[@]}" "${envs[@]}")
ssh_mount=(-v "$ssh_dir:/home/adabatch/.ssh:ro")

warn_uid() {  # ssh refuses keys that the container's user does not own
  [ "$dry_run" = 1 ] && return 0
  local uid
  uid=$(docker image inspect -f '{{.Config.User}}' "$image" 2>/dev/null || true)
  if [ -n "$uid" ] && [ "$uid" != "$(id -u)" ]; then
    echo "docker-run: warning: the image runs as UID $uid but $ssh_dir belongs to UID $(id -u);" \
         "rebuild with --build-arg USER_UID=$(id -u) or ssh will refuse the keys" >&2
  fi
}

case $mode in
  single)
    cmd=("${base[@]}" --rm --name "$container")
    [ -t 0 ] && [ -t 1 ] && cmd+=(-it)
    if [ "$np" = 1 ]; then
      # The image's entrypoint runs adabatch-train for option arguments.
      run "${cmd[@]}" "$image" "${train_args[@]}"
    else
      hvd=(horovodrun -np "$np" -H "localhost:$np" "--$controller" "${iface_args[@]}")
      run "${cmd[@]}" "$image" "${hvd[@]}" adabatch-train "${train_args[@]}"
    fi
    ;;
  worker)
    warn_uid
    # sshd as the unprivileged user: it can only log that user in, which is all horovodrun needs.
    # PATH is set for the sessions because ssh logins do not inherit the image's ENV.
    run "${base[@]}" -d --restart no --name "$container" "${ssh_mount[@]}" "$image" \
      /usr/sbin/sshd -D -e -p "$port" \
      -h /home/adabatch/.ssh/ssh_host_ed25519_key \
      -o PidFile=none -o UsePAM=no -o StrictModes=no \
      -o AuthorizedKeysFile=/home/adabatch/.ssh/authorized_keys \
      -o PasswordAuthentication=no -o KbdInteractiveAuthentication=no \
      -o "SetEnv=PATH=/opt/venv/bin:/usr/local/cuda/bin:/usr/local/bin:/usr/bin:/bin"
    [ "$dry_run" = 1 ] || echo "docker-run: worker sshd on port $port; stop it with: docker rm -f $container"
    ;;
  launch)
    warn_uid
    cmd=(horovodrun -np "$np" -H "$hosts" -p "$port" "--$controller" "${iface_args[@]}")
    run "${base[@]}" --rm --name "$container" "${ssh_mount[@]}" "$image" \
      "${cmd[@]}" adabatch-train "${train_args[@]}"
    ;;
esac

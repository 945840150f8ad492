#!/usr/bin/env bash
# Train across several machines with horovodrun over ssh. See usage() or launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/run-multinode.sh (-hostfile FILE | -H HOSTS) [options] [--] [adabatch-train arguments...]

Runs horovodrun from this machine; it reaches the other hosts over ssh:
    horovodrun -np N -H host1:4,host2:4 [--network-interfaces IF] --gloo|--mpi adabatch-train ARGS...

Hosts (one of):
  -hostfile FILE     lines "host slots=N" ('#' comments and blank lines allowed)
  -H HOSTS           host1:4,host2:4 (host:slots, comma separated)
Options:
  -np N              total processes (default: the sum of the slots)
  --gloo             Gloo controller (default)
  --mpi              MPI controller (OpenMPI mpirun; --allow-run-as-root is added for root)
  -i, --iface IF     network interface for the job's traffic, e.g. eth0 or ib0 (default
                     $ADABATCH_IFACE). Sets HOROVOD_GLOO_IFACE (Gloo), NCCL_SOCKET_IFNAME
                     (NCCL bootstrap/socket transport) and horovodrun --network-interfaces
                     (also OpenMPI's btl_tcp_if_include).
  -p, --ssh-port P   ssh port on the hosts (horovodrun -p)
  --ssh-key FILE     ssh identity file (horovodrun -i)
  --threads T        torch threads per rank: exports OMP_NUM_THREADS=T, which horovodrun
                     passes to every rank and adabatch-train follows unless its own
                     --threads is given. Default: each host's usable cores (affinity and
                     cgroup CPU quota) / its ranks
  --dry-run          print the command, run nothing
  -h, --help         this text

Network knobs read from the environment and passed to every rank (horovodrun forwards the
launcher's environment): HOROVOD_GLOO_IFACE, NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_DISABLE,
NCCL_DEBUG=INFO (to see which transport NCCL picked), GLOO_SOCKET_IFNAME.

Everything, the training arguments too (adabatch-plan), is checked before anything starts: a
mistake ends in one line and exit code 2. Ctrl-C, SIGTERM, SIGHUP or SIGUSR1 stops every rank on
every host at the same step with a checkpoint and exits 75; a second one (a second or more later)
kills the job at once and exits 128 + the signal.

Requirements: passwordless ssh from this machine to every host (and between hosts for MPI),
and this checkout with its .venv at the same path on every host (a shared file system), or
the Docker image on every host (see launch/docker-run.sh).

Example:
    launch/run-multinode.sh -H node1:4,node2:4 -i ib0 -- --config configs/imagenet_resnet50.yaml --run-dir runs/r50
EOF
}

PROG=run-multinode
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
. "$ROOT/launch/lib.sh"
hostfile=""
hosts=""
np=""
controller=gloo
iface=${ADABATCH_IFACE:-}
ssh_port=""
ssh_key=""
threads=""
dry_run=0
train_args=()

while [ $# -gt 0 ]; do
  case $1 in
    -hostfile|--hostfile) need "$1" $#; hostfile=$2; shift 2 ;;
    -H|--hosts) need "$1" $#; hosts=$2; shift 2 ;;
    -np|-n) need "$1" $#; np=$2; shift 2 ;;
    --gloo|--mpi) controller=${1#--}; shift ;;
    -i|--iface) need "$1" $#; iface=$2; shift 2 ;;
    -p|--ssh-port) need "$1" $#; ssh_port=$2; shift 2 ;;
    --ssh-key) need "$1" $#; ssh_key=$2; shift 2 ;;
    *) common_arg "$@"; shift "$took" ;;  # -h, --threads, --dry-run, --, training arguments
  esac
done

[ -n "$hostfile" ] && [ -n "$hosts" ] && die "give -hostfile or -H, not both"
if [ -n "$hostfile" ]; then
  [ -f "$hostfile" ] && [ -r "$hostfile" ] || die "cannot read hostfile $hostfile (not a readable file)"
  [ "$(stat -c %s "$hostfile")" -le 1048576 ] || die "hostfile $hostfile is larger than 1 MiB; give one line per host"
  # horovodrun's own -hostfile parser fails on comments and blank lines; build -H here.
  list=()
  while read -r line; do
    line=${line%%#*}
    read -r -a f <<<"$line"
    [ ${#f[@]} -eq 0 ] && continue
    slots=1
    for kv in "${f[@]:1}"; do
      case $kv in slots=*) slots=${kv#slots=} ;; esac
    done
    [[ $slots =~ ^[1-9][0-9]*$ ]] || die "bad slots in $hostfile: '$line'"
    list+=("${f[0]}:$slots")
  done <"$hostfile"
  [ ${#list[@]} -gt 0 ] || die "no hosts in $hostfile"
  hosts=$(IFS=,; echo "${list[*]}")
fi
[ -n "$hosts" ] || die "no hosts: give -hostfile FILE or -H host1:4,host2:4 (see -h)"

total=$(slots_total "$hosts")
np=${np:-$total}
positive -np "$np"
[ "$np" -le "$total" ] || die "-np $np exceeds the $total slots in '$hosts'"
[ -z "$threads" ] || positive --threads "$threads"
[ -z "$ssh_port" ] || port_number --ssh-port "$ssh_port"
[ -z "$ssh_key" ] || [ -r "$ssh_key" ] || die "cannot read --ssh-key $ssh_key"

horovodrun=$(tool horovodrun)
train=$(tool adabatch-train)

[ -z "$threads" ] || export OMP_NUM_THREADS=$threads
use_iface "$iface"

cmd=("$horovodrun" -np "$np" -H "$hosts" "${iface_args[@]}")
[ -n "$ssh_port" ] && cmd+=(-p "$ssh_port")
[ -n "$ssh_key" ] && cmd+=(-i "$ssh_key")
cmd+=("--$controller")
if [ "$controller" = mpi ] && [ "$(id -u)" = 0 ]; then
  cmd+=(--mpi-args=--allow-run-as-root)
fi
cmd+=("$train" "${train_args[@]}")

[ "$dry_run" = 1 ] || preflight run-multinode "$(tool adabatch-plan)" "$np" "${train_args[@]}"
echo "run-multinode: $np processes on $hosts (${controller}${iface:+, interface $iface})" >&2
supervise_or_print "$dry_run" run-multinode "$(python_for "$horovodrun")" "${cmd[@]}"

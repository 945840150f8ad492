#!/usr/bin/env bash
# Elastic training: workers may leave and join while the global batch, LR and sample order stay
# as planned. See usage() or launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/run-elastic.sh --host-discovery-script S [options] [--] [adabatch-train arguments...]

Runs an elastic Horovod job under Gloo (it reaches other hosts over ssh, as run-multinode.sh):
    horovodrun -np N --min-np A --max-np B --host-discovery-script S --gloo \
        [--network-interfaces IF] adabatch-train --elastic ARGS...

  --host-discovery-script S   (required) an executable that prints one "host:slots" line per host
                     that may run workers now; horovodrun runs it every second. A host that
                     disappears from its output is removed gracefully, one that appears joins.
  -np N              processes to start with (default: the slots S prints now)
  --min-np A         below A slots the job waits for hosts (default 1)
  --max-np B         never more than B processes (default N)
  -i, --iface IF     network interface, as in run-multinode.sh: horovodrun --network-interfaces,
                     HOROVOD_GLOO_IFACE, NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME.
                     Default: lo when every host S prints is this machine, because horovodrun's
                     own detection needs two hosts and otherwise waits forever; else $ADABATCH_IFACE,
                     else horovodrun detects it
  --slots-per-host K slots of a line of S without ":slots"
  --blacklist-cooldown-range LO HI
                     a host whose workers failed may come back after LO..HI seconds (default:
                     never, as in horovodrun)
  --reset-limit R    stop after R resets
  -p, --ssh-port P   ssh port on the hosts (horovodrun -p)
  --ssh-key FILE     ssh identity file (horovodrun -i)
  --threads T        torch threads per rank: exports OMP_NUM_THREADS=T, which adabatch-train
                     follows unless its own --threads is given. Default: each host's usable
                     cores (affinity and cgroup CPU quota) / its ranks
  --verbose          horovodrun's driver log (host and slot counts at every change)
  --dry-run          print the command, run nothing
  -h, --help         this text

Everything, the training arguments too (adabatch-plan), is checked before the job starts: a
mistake ends in one line and exit code 2. The training arguments get --elastic added. Every
worker commits its state in memory every --commit-every optimizer steps (default 10): a failed
worker rolls the others back to the last commit; a host removed by S leaves at the next commit
with nothing lost.

Unlike run-local.sh, run-multinode.sh and slurm.sbatch, it runs horovodrun itself, not under
adabatch_hvd.supervise. The supervisor judges a job by one exit status per rank of a fixed world
(a rank that failed, or wrote none, is the job's failure), while an elastic job renumbers its ranks
at every reset and goes on after a worker fails. So Ctrl-C, SIGTERM and SIGHUP reach horovodrun as
they are, and its own handling applies: a stop of every rank at one step with a checkpoint (exit
code 75) is not ensured, and the exit code and the report of a failure are horovodrun's.

Example (one machine, 3 workers that may shrink to 1):
    printf '#!/bin/sh\ncat /tmp/hosts\n' > /tmp/discover.sh; chmod +x /tmp/discover.sh
    echo localhost:3 > /tmp/hosts
    launch/run-elastic.sh --host-discovery-script /tmp/discover.sh --min-np 1 --max-np 3 \
        -- --config configs/fashion_mnist.yaml --run-dir runs/elastic
    echo localhost:2 > /tmp/hosts     # later: one worker leaves; the job goes on with 2
EOF
}

PROG=run-elastic
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
. "$ROOT/launch/lib.sh"
script=""
np=""
min_np=1
max_np=""
iface=""
slots_per_host=""
cooldown=()
reset_limit=""
ssh_port=""
ssh_key=""
threads=""
verbose=0
dry_run=0
train_args=()

while [ $# -gt 0 ]; do
  case $1 in
    --host-discovery-script) need "$1" $#; script=$2; shift 2 ;;
    -np|-n) need "$1" $#; np=$2; shift 2 ;;
    --min-np) need "$1" $#; min_np=$2; shift 2 ;;
    --max-np) need "$1" $#; max_np=$2; shift 2 ;;
    -i|--iface) need "$1" $#; iface=$2; shift 2 ;;
    --slots-per-host) need "$1" $#; slots_per_host=$2; shift 2 ;;
    --blacklist-cooldown-range) [ $# -ge 3 ] || die "$1 needs two numbers"; cooldown=("$2" "$3"); shift 3 ;;
    --reset-limit) need "$1" $#; reset_limit=$2; shift 2 ;;
    -p|--ssh-port) need "$1" $#; ssh_port=$2; shift 2 ;;
    --ssh-key) need "$1" $#; ssh_key=$2; shift 2 ;;
    --verbose) verbose=1; shift ;;
    *) common_arg "$@"; shift "$took" ;;  # -h, --threads, --dry-run, --, training arguments
  esac
done

[ -n "$script" ] || die "no --host-discovery-script: give an executable that prints host:slots lines (see -h)"
[ -f "$script" ] && [ -x "$script" ] || die "discovery script $script is not an executable file"
for v in slots_per_host reset_limit threads ssh_port; do
  [ -n "${!v}" ] && positive "--${v//_/-}" "${!v}"
done
if [ ${#cooldown[@]} -gt 0 ]; then
  positive "--blacklist-cooldown-range's LO" "${cooldown[0]}"
  positive "--blacklist-cooldown-range's HI" "${cooldown[1]}"
  [ "${cooldown[0]}" -le "${cooldown[1]}" ] || die "--blacklist-cooldown-range needs LO <= HI, got ${cooldown[*]}"
fi
[ -z "$ssh_key" ] || [ -r "$ssh_key" ] || die "cannot read --ssh-key $ssh_key"

# The hosts the script offers now: the default -np, and whether they are all this machine.
found=$("$script") || die "discovery script $script failed (exit $?)"
hosts=$(printf '%s\n' "$found" | sed '/^[[:space:]]*$/d' | while read -r line; do
  [[ $line == *:* ]] && echo "$line" || echo "$line:${slots_per_host:-1}"
done | paste -sd, -)
[ -n "$hosts" ] || die "discovery script $script printed no hosts"
total=$(slots_total "$hosts")
np=${np:-$total}
positive -np "$np"
positive --min-np "$min_np"
max_np=${max_np:-$np}
positive --max-np "$max_np"
[ "$min_np" -le "$np" ] && [ "$np" -le "$max_np" ] || die "need --min-np <= -np <= --max-np, got $min_np, $np, $max_np"

if [ -z "$iface" ]; then
  local_only=1
  for entry in ${hosts//,/ }; do
    case ${entry%%:*} in localhost|127.*|"$(hostname)"|"$(hostname -f 2>/dev/null)") ;; *) local_only=0 ;; esac
  done
  if [ "$local_only" = 1 ]; then iface=lo; else iface=${ADABATCH_IFACE:-}; fi
fi

horovodrun=$(tool horovodrun)
train=$(tool adabatch-train)
[ "$dry_run" = 1 ] || preflight run-elastic "$(tool adabatch-plan)" "$np" --elastic true "${train_args[@]}"

[ -z "$threads" ] || export OMP_NUM_THREADS=$threads
use_iface "$iface"

cmd=("$horovodrun" -np "$np" --min-np "$min_np" --max-np "$max_np" --host-discovery-script "$script"
     "${iface_args[@]}")
[ -n "$slots_per_host" ] && cmd+=(--slots-per-host "$slots_per_host")
[ ${#cooldown[@]} -gt 0 ] && cmd+=(--blacklist-cooldown-range "${cooldown[@]}")
[ -n "$reset_limit" ] && cmd+=(--reset-limit "$reset_limit")
[ -n "$ssh_port" ] && cmd+=(-p "$ssh_port")
[ -n "$ssh_key" ] && cmd+=(-i "$ssh_key")
[ "$verbose" = 1 ] && cmd+=(--verbose)
cmd+=(--gloo "$train" --elastic true "${train_args[@]}")

echo "run-elastic: $np processes (min $min_np, max $max_np) on $hosts now${iface:+, interface $iface}" >&2
run_or_print "$dry_run" "${cmd[@]}"

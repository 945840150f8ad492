#!/usr/bin/env bash
# Train on one machine with N Horovod processes: horovodrun -np N -H localhost:N [--gloo|--mpi].
# See usage() or launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/run-local.sh [N] [options] [--] [adabatch-train arguments...]

Runs N Horovod processes on this machine:
    horovodrun -np N -H localhost:N --gloo|--mpi adabatch-train ARGS...

  N, -np N, -n N     number of processes (default 2, or $NP)
  --gloo             Gloo controller (default; needs no MPI at run time)
  --mpi              MPI controller (OpenMPI mpirun). As root it adds OpenMPI's
                     --allow-run-as-root through horovodrun --mpi-args, and
                     --oversubscribe when N exceeds the CPU cores
  --threads T        torch threads per process: exports OMP_NUM_THREADS=T, which
                     adabatch-train follows unless its own --threads is given. Without
                     either, an OMP_NUM_THREADS already set is followed, else the
                     trainer takes the usable cores (affinity and cgroup CPU quota) / N
  --dry-run          print the command and the thread setting, run nothing
  -h, --help         this text

Everything else (and everything after --) goes to adabatch-train; it is checked (adabatch-plan)
before anything starts, so a mistake ends in one line and exit code 2. Ctrl-C, SIGTERM, SIGHUP or
SIGUSR1 stops every rank at the same step with a checkpoint and exits 75, as adabatch-train does; a
second one (a second or more later) kills the job at once and exits 128 + the signal (130 for
Ctrl-C). Nothing of the job is left running. E.g.
    launch/run-local.sh 2 --config configs/fashion_mnist.yaml --run-dir runs/fm --epochs 3
    launch/run-local.sh 4 --mpi -- --config configs/cifar10_resnet20_adabatch.yaml --resume

Tools: .venv/bin/horovodrun and .venv/bin/adabatch-train of this checkout when present
(launch/setup.sh makes .venv), otherwise those on PATH (e.g. inside the Docker image).
Environment: NP (default N), OMP_NUM_THREADS (see --threads).
EOF
}

PROG=run-local
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=launch/lib.sh
. "$ROOT/launch/lib.sh"
np=${NP:-2}
controller=gloo
threads=""
dry_run=0
train_args=()

if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then np=$1; shift; fi
while [ $# -gt 0 ]; do
  case $1 in
    -np|-n) need "$1" $#; np=$2; shift 2 ;;
    --gloo|--mpi) controller=${1#--}; shift ;;
    *) common_arg "$@"; shift "$took" ;;  # -h, --threads, --dry-run, --, training arguments
  esac
done
positive N "$np"
[ -z "$threads" ] || positive --threads "$threads"

horovodrun=$(tool horovodrun)
train=$(tool adabatch-train)

[ -z "$threads" ] || export OMP_NUM_THREADS=$threads
# The cores, for --oversubscribe (nproc alone would answer OMP_NUM_THREADS).
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)

cmd=("$horovodrun" -np "$np" -H "localhost:$np" "--$controller")
if [ "$controller" = mpi ]; then
  mpi_args=()
  # horovodrun 0.28.1 already passes --allow-run-as-root to OpenMPI itself; repeating it is
  # harmless and keeps root runs working with a horovodrun that does not.
  [ "$(id -u)" = 0 ] && mpi_args+=(--allow-run-as-root)
  [ "$np" -gt "$cores" ] && mpi_args+=(--oversubscribe)
  [ ${#mpi_args[@]} -gt 0 ] && cmd+=("--mpi-args=${mpi_args[*]}")
fi
cmd+=("$train" "${train_args[@]}")

[ "$dry_run" = 1 ] || preflight run-local "$(tool adabatch-plan)" "$np" "${train_args[@]}"
per_rank=${OMP_NUM_THREADS:+OMP_NUM_THREADS=$OMP_NUM_THREADS}
echo "run-local: $np processes ($controller); threads per rank: ${per_rank:-usable cores / $np}" >&2
supervise_or_print "$dry_run" run-local "$(python_for "$horovodrun")" "${cmd[@]}"

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
  --threads T        OMP_NUM_THREADS per process. Default on CPU: cores / N (at
                     least 1); on GPU: left alone. An OMP_NUM_THREADS already set
                     in the environment wins.
  --dry-run          print the command and the thread setting, run nothing
  -h, --help         this text

Everything else (and everything after --) goes to adabatch-train; it is checked (adabatch-plan)
before anything starts, so a mistake ends in one line and exit code 2. Ctrl-C, SIGTERM, SIGHUP or
SIGUSR1 stops every rank at the same step with a checkpoint and exits 128 + the signal (130 for
Ctrl-C); a second one kills the job at once. Nothing of the job is left running. E.g.
    launch/run-local.sh 2 --config configs/fashion_mnist.yaml --run-dir runs/fm --epochs 3
    launch/run-local.sh 4 --mpi -- --config configs/cifar10_resnet20_adabatch.yaml --resume

Tools: .venv/bin/horovodrun and .venv/bin/adabatch-train of this checkout when present
(launch/setup.sh makes .venv), otherwise those on PATH (e.g. inside the Docker image).
Environment: NP (default N), ADABATCH_DEVICE=cpu|gpu (skip GPU detection by nvidia-smi).
EOF
}

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
    -h|--help) usage; exit 0 ;;
    -np|-n) [ $# -ge 2 ] || { echo "run-local: $1 needs a number" >&2; exit 2; }; np=$2; shift 2 ;;
    --gloo) controller=gloo; shift ;;
    --mpi) controller=mpi; shift ;;
    --threads) [ $# -ge 2 ] || { echo "run-local: --threads needs a number" >&2; exit 2; }; threads=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; train_args+=("$@"); break ;;
    *) train_args+=("$1"); shift ;;
  esac
done
[[ $np =~ ^[1-9][0-9]*$ ]] || { echo "run-local: N must be a positive integer, got '$np'" >&2; exit 2; }
if [ -n "$threads" ] && ! [[ $threads =~ ^[1-9][0-9]*$ ]]; then
  echo "run-local: --threads must be a positive integer, got '$threads'" >&2; exit 2
fi

tool() {  # the checkout's venv first, then PATH
  if [ -x "$ROOT/.venv/bin/$1" ]; then echo "$ROOT/.venv/bin/$1"
  elif command -v "$1" >/dev/null 2>&1; then command -v "$1"
  elif [ "$dry_run" = 1 ]; then echo "$1"
  else echo "run-local: $1 not found: run launch/setup.sh first (it makes .venv)" >&2; return 1
  fi
}
horovodrun=$(tool horovodrun)
train=$(tool adabatch-train)

# CPU or GPU: each rank's torch uses every core by default, so N ranks on one machine
# oversubscribe the CPU; give each cores/N threads. GPU runs keep the default.
cores=$(nproc)
device=${ADABATCH_DEVICE:-}
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    device=gpu
  else
    device=cpu
  fi
fi
if [ -n "$threads" ]; then
  export OMP_NUM_THREADS=$threads
elif [ -z "${OMP_NUM_THREADS:-}" ] && [ "$device" = cpu ]; then
  per_rank=$(( cores / np ))
  export OMP_NUM_THREADS=$(( per_rank > 0 ? per_rank : 1 ))
fi

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
echo "run-local: $device, $np processes, OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}" >&2
supervise_or_print "$dry_run" run-local "$(python_for "$horovodrun")" "${cmd[@]}"

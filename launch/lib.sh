#!/usr/bin/env bash
# Shared helpers of the launchers: run-local.sh, run-multinode.sh, run-elastic.sh, docker-run.sh and
# slurm.sbatch (sourced, not run). A launcher sets PROG (its name in messages) and, for tool, ROOT;
# dry_run, threads and train_args are its own, set by common_arg. (setup.sh and build-horovod.sh stand
# alone: the Dockerfile's first layer copies them without this file.)

# ---- arguments ----------------------------------------------------------------------------------
# die MESSAGE: "PROG: error: MESSAGE" on stderr and exit code 2; nothing has been started yet.
die() { echo "$PROG: error: $*" >&2; exit 2; }

# need OPTION ARGC: OPTION (the caller's $1) has a value after it; ARGC is the caller's $#.
need() { [ "$2" -ge 2 ] || die "$1 needs a value"; }

# positive NAME VALUE: VALUE is a whole number from 1 up.
positive() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

# port_number NAME VALUE: VALUE is a TCP port, 1 to 65535.
port_number() {
  [[ $2 =~ ^[1-9][0-9]{0,4}$ ]] && [ "$2" -le 65535 ] || die "$1 must be a port number (1-65535), got '$2'"
}

# common_arg "$@": the arguments every launcher takes the same way, for the last branch of its own
# option loop:  *) common_arg "$@"; shift "$took" ;;
#   -h, --help    usage (the caller's), exit 0
#   --threads T   threads=T (checked with positive by the caller, exported as OMP_NUM_THREADS)
#   --dry-run     dry_run=1
#   --            everything after it goes to adabatch-train (train_args)
#   anything else goes to adabatch-train (train_args)
# took: how many arguments it used, for the caller's shift.
common_arg() {
  case $1 in
    -h|--help) usage; exit 0 ;;
    --threads) need "$1" $#; threads=$2; took=2 ;;
    --dry-run) dry_run=1; took=1 ;;
    --) train_args+=("${@:2}"); took=$# ;;
    *) train_args+=("$1"); took=1 ;;
  esac
}

# ---- the network interface (-i/--iface, ADABATCH_IFACE) ------------------------------------------
# The variables that put a rank's traffic on one interface: NCCL's bootstrap and socket transport,
# Horovod's Gloo controller, and torch's Gloo.
IFACE_VARS=(NCCL_SOCKET_IFNAME HOROVOD_GLOO_IFACE GLOO_SOCKET_IFNAME)

# use_iface IF: the job's traffic goes over network interface IF; for an empty IF it does nothing and
# the arrays stay empty. It exports IFACE_VARS=IF here, which horovodrun, srun and mpirun -x pass on to
# the ranks, and sets
#   iface_env    VAR=IF for each of IFACE_VARS, for a launcher that passes them itself (docker run -e)
#   iface_args   horovodrun --network-interfaces IF (horovodrun restricts its mpirun's TCP to IF too)
#   iface_mca    the same for a bare mpirun: OpenMPI's btl_tcp_if_include and oob_tcp_if_include
use_iface() {
  local v
  iface_env=() iface_args=() iface_mca=()
  [ -n "$1" ] || return 0
  for v in "${IFACE_VARS[@]}"; do
    export "$v=$1"
    iface_env+=("$v=$1")
  done
  iface_args=(--network-interfaces "$1")
  iface_mca=(--mca btl_tcp_if_include "$1" --mca oob_tcp_if_include "$1")
}

# ---- hosts, tools, running ------------------------------------------------------------------------

# slots_total "host1:4,host2:4" -> 8; dies on an entry that is not host:slots.
slots_total() {
  local total=0 e entries
  IFS=, read -r -a entries <<<"$1"
  for e in "${entries[@]}"; do
    [[ $e =~ ^[^:,[:space:]]+:([1-9][0-9]*)$ ]] || die "bad host entry '$e' (want host:slots)"
    total=$(( total + BASH_REMATCH[1] ))
  done
  echo "$total"
}

# suggest WORD CANDIDATE...: " (did you mean 'X'?)" for the candidate nearest WORD, when it is a likely typo
# of it (at most a third of its letters changed, added, dropped or swapped, at least 1); nothing otherwise.
suggest() {
  local word=$1 best="" best_d=99 c d i j cost
  local -a prev2 prev cur
  shift
  [ ${#word} -le 64 ] || return 0
  for c in "$@"; do
    for ((j = 0; j <= ${#c}; j++)); do prev[j]=$j; done
    for ((i = 1; i <= ${#word}; i++)); do
      cur=("$i")
      for ((j = 1; j <= ${#c}; j++)); do
        [ "${word:i-1:1}" = "${c:j-1:1}" ] && cost=0 || cost=1
        d=$(( prev[j] + 1 < cur[j-1] + 1 ? prev[j] + 1 : cur[j-1] + 1 ))
        d=$(( prev[j-1] + cost < d ? prev[j-1] + cost : d ))
        if [ "$i" -gt 1 ] && [ "$j" -gt 1 ] && [ "${word:i-2:2}" = "${c:j-1:1}${c:j-2:1}" ]; then
          d=$(( prev2[j-2] + 1 < d ? prev2[j-2] + 1 : d ))  # two letters swapped
        fi
        cur[j]=$d
      done
      prev2=("${prev[@]}") prev=("${cur[@]}")
    done
    d=${prev[${#c}]}
    if [ "$d" -lt "$best_d" ] && [ "$d" -le $(( ${#c} / 3 > 1 ? ${#c} / 3 : 1 )) ]; then best=$c best_d=$d; fi
  done
  [ -z "$best" ] || echo " (did you mean '$best'?)"
}

# tool NAME: the checkout's .venv/bin/NAME ($ROOT), else NAME on PATH; with $dry_run 1 the bare name.
tool() {
  if [ -x "$ROOT/.venv/bin/$1" ]; then echo "$ROOT/.venv/bin/$1"
  elif command -v "$1" >/dev/null 2>&1; then command -v "$1"
  elif [ "$dry_run" = 1 ]; then echo "$1"
  else die "$1 not found: run launch/setup.sh first (it makes .venv)"
  fi
}

# run_or_print DRY_RUN CMD...: print the command (quoted) when DRY_RUN is 1, else exec it.
run_or_print() {
  local dry=$1; shift
  if [ "$dry" = 1 ]; then
    printf '%q ' "$@"; echo
    exit 0
  fi
  exec "$@"
}

# python_for TOOL: the Python of the environment that holds TOOL (.venv/bin/horovodrun -> .venv/bin/python).
python_for() {
  local dir
  dir=$(dirname "$1")
  if [ -x "$dir/python" ]; then echo "$dir/python"; else command -v python3 || echo python3; fi
}

# preflight NAME PLAN NP ARGS...: adabatch-plan checks the training arguments (flags, config file, batch
# sizes for NP processes) before any process starts, so that a mistake ends here in one line, exit code 2.
preflight() {
  local name=$1 plan=$2 np=$3 err rc=0
  shift 3
  err=$("$plan" --world-size "$np" "$@" 2>&1 >/dev/null) || rc=$?
  if [ "$rc" = 2 ]; then
    echo "$name: ${err#adabatch-plan: }" >&2
    exit 2
  elif [ "$rc" != 0 ]; then
    printf '%s\n' "$err" >&2
    exit "$rc"
  fi
}

# supervise_or_print DRY_RUN NAME PYTHON CMD...: print the command when DRY_RUN is 1; else run it under
# adabatch_hvd.supervise: Ctrl-C, SIGTERM, SIGHUP and SIGUSR1 stop the whole job at a step with a
# checkpoint (exit code 75; 128 + the signal if it had to be killed), nothing of it is left running,
# and a rank's failure ends in one line with that rank's exit code.
supervise_or_print() {
  local dry=$1 name=$2 py=$3
  shift 3
  [ "$dry" = 1 ] && run_or_print 1 "$@"
  exec "$py" -m adabatch_hvd.supervise "$name" -- "$@"
}

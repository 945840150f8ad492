#!/usr/bin/env bash
# Shared helpers of the launch scripts (sourced, not run). Callers define die() (and ROOT, dry_run for tool).

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

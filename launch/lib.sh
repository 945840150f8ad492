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

#!/usr/bin/env bash
# Shared helpers of the launch scripts (sourced, not run). Callers define die().

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

# run_or_print DRY_RUN CMD...: print the command (quoted) when DRY_RUN is 1, else exec it.
run_or_print() {
  local dry=$1; shift
  if [ "$dry" = 1 ]; then
    printf '%q ' "$@"; echo
    exit 0
  fi
  exec "$@"
}

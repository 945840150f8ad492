#!/usr/bin/env bash
# The peer comparison's Lightning environment (issue 19): prints the path of a Python that imports
# lightning==2.6.6 together with this project's torch, without installing torch a second time.
#
#   PY=$(benchmarks/lightning_env.sh) && "$PY" benchmarks/lightning_job.py ...
#
# It is a thin venv of its own, ${ADABATCH_CACHE:-${XDG_CACHE_HOME:-~/.cache}/adabatch-hvd}/peers/
# lightning-2.6.6, made with the interpreter that .venv/bin/python runs on. A .pth file in its
# site-packages adds the site-packages that holds .venv's torch (the shared environment that
# launch/setup.sh section 5 points .venv at; the same .pth idea), after its own; lightning and the
# dependencies torch's environment lacks are installed into the venv itself. A dry run first checks
# that pip takes torch as installed: the script stops if pip would fetch torch, triton or an nvidia-*
# package. Neither .venv nor the shared environment is written to (pip never uninstalls outside the
# venv it runs in; the names in the shared site-packages are compared before and after).
# This checkout's adabatch_hvd is not installed here: lightning_job.py imports it from the checkout.
#
# A finished environment is reused (its marker holds the interpreter, the torch directory and the
# version); a changed one is made afresh. Progress goes to stderr, the python path to stdout.
set -euo pipefail

LIGHTNING_VERSION=2.6.6
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OWN_PY=${ADABATCH_PYTHON:-$ROOT/.venv/bin/python}
CACHE=${ADABATCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/adabatch-hvd}
DIR=$CACHE/peers/lightning-$LIGHTNING_VERSION
MARKER=$DIR/.adabatch-peer-complete

die() { echo "lightning_env: error: $*" >&2; exit 1; }
log() { echo "lightning_env: $*" >&2; }

[ -x "$OWN_PY" ] || die "$OWN_PY not found; run launch/setup.sh (make setup) first"
# The interpreter behind .venv (a venv's python is a link to it) and the directory holding torch.
{ read -r BASE && read -r SHARED; } < <("$OWN_PY" -c '
import os, sys, torch
print(sys._base_executable, os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))), sep="\n")') \
  || die "$OWN_PY cannot import torch; run launch/setup.sh first"
[ -x "$BASE" ] || die "the interpreter of $OWN_PY ($BASE) is not executable"
WANT=$(printf 'lightning==%s\npython %s\nshared %s\n' "$LIGHTNING_VERSION" "$BASE" "$SHARED")

mkdir -p "$CACHE/peers"
exec 9>"$DIR.lock"
flock 9  # two benchmark drivers on one host make it once

if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ]; then
  echo "$DIR/bin/python"
  exit 0
fi

listing() { ls -1A "$SHARED" | sha256sum; }  # names: an added, removed or upgraded (dist-info) package
before=$(listing)
rm -rf "$DIR"
log "creating $DIR (lightning==$LIGHTNING_VERSION over torch in $SHARED)"
"$BASE" -m venv "$DIR" >&2 || die "$BASE -m venv failed"
PY=$DIR/bin/python
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf 'import site; site.addsitedir(%s)\n' "'$SHARED'" >"$site/_adabatch_shared.pth"
"$PY" -c 'import torch' || die "the new venv does not see torch through $site/_adabatch_shared.pth"

# pip's chatter (e.g. warnings about this machine's extra index) goes to a log, shown on failure.
PIP_LOG=$DIR/pip.log
pip_quiet() { "$PY" -m pip --disable-pip-version-check "$@" >>"$PIP_LOG" 2>&1 || { tail -n 20 "$PIP_LOG" >&2; return 1; }; }
report=$DIR/pip-dry-run.json
pip_quiet install --dry-run --report "$report" "lightning==$LIGHTNING_VERSION" \
  || die "pip install --dry-run lightning==$LIGHTNING_VERSION failed (no network to the package registry?)"
"$PY" - "$report" <<'EOF' || die "pip would install torch (or its CUDA parts) again; see $report"
import json, re, sys
items = json.load(open(sys.argv[1]))["install"]
names = [(i["metadata"]["name"], i["metadata"]["version"]) for i in items]
print("lightning_env: pip will add " + ", ".join(f"{n}=={v}" for n, v in names), file=sys.stderr)
bad = [n for n, _ in names if re.fullmatch(r"(torch|torchvision|triton|nvidia-.*|cuda-.*)", n.lower())]
if bad:
    print(f"lightning_env: refusing: the dry run pulls {', '.join(bad)}", file=sys.stderr)
    sys.exit(1)
EOF
pip_quiet install "lightning==$LIGHTNING_VERSION" || die "pip install lightning==$LIGHTNING_VERSION failed"
"$PY" - "$SHARED" "$LIGHTNING_VERSION" <<'EOF' || die "the environment at $DIR does not import the right lightning and torch"
import os, sys
import lightning, torch
assert lightning.__version__ == sys.argv[2], lightning.__version__
assert os.path.abspath(torch.__file__).startswith(sys.argv[1] + os.sep), torch.__file__
EOF
[ "$(listing)" = "$before" ] || die "the shared site-packages $SHARED changed while making $DIR"
echo "$WANT" >"$MARKER"
log "ready"
echo "$PY"

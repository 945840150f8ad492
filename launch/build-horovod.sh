#!/usr/bin/env bash
# Build (or find cached) the patched Horovod 0.28.1 wheel for a Python that already has torch.
#
#   launch/build-horovod.sh PYTHON WHEEL_DIR     -> prints the wheel's path on stdout
#
# launch/setup.sh calls this; tests/test_nocuda.py calls it in a mount namespace with /usr/local
# hidden, to prove that a machine without a CUDA toolkit builds the CPU flavour.
#
# Flavours (HOROVOD_GPU_OPERATIONS):
#   unset/empty  CPU: PyTorch + Gloo + MPI. CUDA is never looked for: CUDA_HOME and
#                HOROVOD_CUDA_HOME are removed from the build's environment and HOROVOD_CPU_ONLY=1
#                (our patch to FindPytorch.cmake) keeps a CUDA build of torch from pulling in
#                add_cuda(). The same wheel comes out with or without a toolkit on the machine.
#   NCCL         GPU: needs a CUDA toolkit ($CUDA_HOME, default /usr/local/cuda, with bin/nvcc).
set -euo pipefail

die() { echo "build-horovod: error: $*" >&2; exit 1; }
log() { echo "build-horovod: $*" >&2; }

[ $# -eq 2 ] || die "usage: launch/build-horovod.sh PYTHON WHEEL_DIR"
PY=$1
WHEEL_DIR=$2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOROVOD_VERSION=0.28.1
PATCH="$ROOT/launch/patches/horovod-${HOROVOD_VERSION}-torch2.patch"
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}

wheel=$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ]; then
  log "using cached wheel $wheel"
  echo "$wheel"
  exit 0
fi

flavour=(env -u CUDA_HOME -u HOROVOD_CUDA_HOME -u HOROVOD_GPU_OPERATIONS HOROVOD_CPU_ONLY=1)
if [ -n "$GPU_OPS" ]; then
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$cuda_home/bin/nvcc" ] \
    || die "HOROVOD_GPU_OPERATIONS=$GPU_OPS needs a CUDA toolkit, but $cuda_home/bin/nvcc does not exist (set CUDA_HOME, or unset HOROVOD_GPU_OPERATIONS for the CPU build)"
  flavour=(env HOROVOD_GPU_OPERATIONS="$GPU_OPS" CUDA_HOME="$cuda_home" HOROVOD_CUDA_HOME="$cuda_home")
fi

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
log "downloading horovod==$HOROVOD_VERSION sdist"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" \
    -d "$build" >"$build/download.log" 2>&1 \
  || { tail -n 5 "$build/download.log" >&2; die "could not download the horovod==$HOROVOD_VERSION sdist from PyPI"; }
tar xzf "$build/horovod-$HOROVOD_VERSION.tar.gz" -C "$build"
src="$build/horovod-$HOROVOD_VERSION"
(cd "$src" && patch -p0 -s <"$PATCH") || die "patch $PATCH does not apply to horovod $HOROVOD_VERSION"

# cmake 4 refuses Gloo's old cmake_minimum_required; Debian's 3.25 is used, and the policy
# minimum keeps a newer cmake working too.
log "building the Horovod wheel (${GPU_OPS:-CPU} flavour; about 3-5 minutes on 2 cores)"
start=$(date +%s)
mkdir -p "$WHEEL_DIR"
if ! (cd "$src" && "${flavour[@]}" \
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
    HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 \
    CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)" \
    "$PY" -m pip wheel -v --no-deps --no-build-isolation . -w "$build/dist" >"$build/build.log" 2>&1); then
  tail -n 30 "$build/build.log" >&2
  cp "$build/build.log" "$WHEEL_DIR/../horovod-build-failed.log"
  die "building horovod $HOROVOD_VERSION failed; full log in $(cd "$WHEEL_DIR/.." && pwd)/horovod-build-failed.log"
fi
cp "$build"/dist/horovod-*.whl "$WHEEL_DIR/"
cp "$build/build.log" "$WHEEL_DIR/build.log"  # what CMake found (MPI, Gloo, no CUDA) stays on record
echo "$(( $(date +%s) - start ))" >"$WHEEL_DIR/build-seconds"
wheel=$(ls "$WHEEL_DIR"/horovod-*.whl | head -n1)
log "built $(basename "$wheel") in $(cat "$WHEEL_DIR/build-seconds") s, cached in $WHEEL_DIR"
echo "$wheel"

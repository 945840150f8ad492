#!/usr/bin/env bash
# Build (or find cached) the patched Horovod wheel (HOROVOD_VERSION below) for a Python that already
# has torch.
#
#   launch/build-horovod.sh PYTHON WHEEL_DIR     -> prints the wheel's path on stdout
#   launch/build-horovod.sh --version            -> prints HOROVOD_VERSION
#   launch/build-horovod.sh --patch              -> prints the patch file's path
#
# The version and the patch are defined here only: setup.sh asks for them (its cache keys hold
# them), and the Dockerfile copies both scripts. Prose (README, the Dockerfile's label) names it too.
#
# launch/setup.sh calls this; tests/test_nocuda.py calls it in a mount namespace with /usr/local
# hidden, to prove that a machine without a CUDA toolkit builds the CPU flavour;
# tests/test_nccl_build.py builds the NCCL flavour with it.
#
# Flavours (HOROVOD_GPU_OPERATIONS):
#   unset/empty  CPU: PyTorch + Gloo + MPI. CUDA is never looked for: CUDA_HOME and
#                HOROVOD_CUDA_HOME are removed from the build's environment and HOROVOD_CPU_ONLY=1
#                (our patch to FindPytorch.cmake) keeps a CUDA build of torch from pulling in
#                add_cuda(). The same wheel comes out with or without a toolkit on the machine.
#   NCCL         GPU: needs a CUDA build of torch and a CUDA toolkit of the same major version
#                ($CUDA_HOME, default /usr/local/cuda, with bin/nvcc). NCCL comes from the first of:
#                  HOROVOD_NCCL_HOME or NCCL_HOME  a directory with include/nccl.h and lib*/libnccl.so
#                  torch's wheel (nvidia/nccl)     the very libnccl.so.2 torch loads; it has no
#                                                  libnccl.so to link, so nccl-home/ beside the
#                                                  wheel links include/ and lib/libnccl.so{,.2}
#                  the system                      nccl.h in /usr/include or $CUDA_HOME/include
#                HOROVOD_NCCL_LINK: SHARED (default; libnccl.so.2 is then whichever one torch has
#                loaded, so no second NCCL in the process) or STATIC (libnccl_static.a, for an NCCL
#                other than torch's). The CUDA kernels are compiled for torch's own architectures
#                (HOROVOD_BUILD_CUDA_CC_LIST=75,90,... overrides), with PTX for the newest.
#                CUDAARCHS=OFF leaves the architectures to those -gencode flags alone: without it
#                CMake warns "CUDA_ARCHITECTURES is empty" (policy CMP0104) and adds none anyway.
#                The wheel goes to WHEEL_DIR/nccl<NCCL_VERSION_CODE>-<source>-<link>-sm<archs>/, the
#                version read from the nccl.h it compiles against: another NCCL never reuses it.
set -euo pipefail

die() { echo "build-horovod: error: $*" >&2; exit 1; }
log() { echo "build-horovod: $*" >&2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOROVOD_VERSION=0.28.1
PATCH="$ROOT/launch/patches/horovod-${HOROVOD_VERSION}-torch2.patch"
case ${1:-} in
  --version) echo "$HOROVOD_VERSION"; exit 0 ;;
  --patch) echo "$PATCH"; exit 0 ;;
esac

[ $# -eq 2 ] || die "usage: launch/build-horovod.sh PYTHON WHEEL_DIR"
PY=$1
WHEEL_DIR=$2
[[ $PY != */* ]] || PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # the build runs in another directory
GPU_OPS=${HOROVOD_GPU_OPERATIONS:-}

flavour=(env -u CUDA_HOME -u HOROVOD_CUDA_HOME -u HOROVOD_GPU_OPERATIONS HOROVOD_CPU_ONLY=1)
if [ -n "$GPU_OPS" ]; then
  [ "$GPU_OPS" = NCCL ] || die "HOROVOD_GPU_OPERATIONS=$GPU_OPS is not supported: NCCL, or unset for the CPU build"
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  [ -x "$cuda_home/bin/nvcc" ] \
    || die "HOROVOD_GPU_OPERATIONS=$GPU_OPS needs a CUDA toolkit, but $cuda_home/bin/nvcc does not exist (set CUDA_HOME, or unset HOROVOD_GPU_OPERATIONS for the CPU build)"
  nvcc_ver=$("$cuda_home/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')
  # torch's CUDA version, its NCCL directory (- if its wheel has none) and its GPU architectures
  probe=$("$PY" - <<'EOF'
import importlib.util, re, torch
spec = importlib.util.find_spec("nvidia.nccl")
print(torch.version.cuda or "-")
print(next(iter(spec.submodule_search_locations)) if spec else "-")
# get_arch_list() is empty where CUDA is not usable (no driver, some versions); the build's flags are not
archs = torch.cuda.get_arch_list() or (getattr(torch._C, "_cuda_getArchFlags", lambda: "")() or "").split()
print(",".join(map(str, sorted({int(m[1]) for m in map(re.compile(r"sm_(\d+)").match, archs) if m}))) or "-")
EOF
  ) || die "$PY cannot import torch"
  { read -r torch_cuda; read -r torch_nccl; read -r torch_archs; } <<<"$probe"
  [ "$torch_cuda" != - ] || die "the NCCL flavour needs a CUDA build of torch; $PY has a CPU-only one"
  [ "${torch_cuda%%.*}" = "${nvcc_ver%%.*}" ] \
    || die "torch is built for CUDA $torch_cuda but $cuda_home/bin/nvcc is CUDA $nvcc_ver (set CUDA_HOME to a CUDA ${torch_cuda%%.*} toolkit)"
  archs=${HOROVOD_BUILD_CUDA_CC_LIST:-$torch_archs}
  [[ $archs =~ ^[0-9]+(,[0-9]+)*$ ]] \
    || die "GPU architectures '$archs' (HOROVOD_BUILD_CUDA_CC_LIST, else torch's list) are not a list like 80,90"
  link=${HOROVOD_NCCL_LINK:-SHARED}
  link=${link^^}
  [[ $link =~ ^(SHARED|STATIC)$ ]] || die "HOROVOD_NCCL_LINK=$link: SHARED or STATIC"
  nccl_home=${HOROVOD_NCCL_HOME:-${NCCL_HOME:-}}
  if [ -n "$nccl_home" ]; then
    [ -d "$nccl_home" ] || die "NCCL home $nccl_home (HOROVOD_NCCL_HOME or NCCL_HOME) is not a directory"
    nccl_home=$(realpath "$nccl_home")
    nccl_inc=$nccl_home/include
    nccl_src="home-$(echo "$nccl_home" | sha256sum | cut -c1-8)"
  elif [ "$torch_nccl" != - ]; then
    nccl_inc=$torch_nccl/include
    nccl_src=torch
    [ "$link" = SHARED ] || die "torch's wheel has no static NCCL; set HOROVOD_NCCL_HOME to an NCCL with libnccl_static.a"
    [ -f "$torch_nccl/lib/libnccl.so.2" ] || die "torch's wheel has nccl.h but no $torch_nccl/lib/libnccl.so.2"
  else
    for dir in /usr "$cuda_home"; do
      if [ -f "$dir/include/nccl.h" ]; then nccl_home=$dir; break; fi
    done
    [ -n "$nccl_home" ] || die "no NCCL: torch's wheel has none and there is no nccl.h in /usr/include or $cuda_home/include (install libnccl-dev, or set HOROVOD_NCCL_HOME)"
    nccl_inc=$nccl_home/include
    nccl_src=system
  fi
  [ -f "$nccl_inc/nccl.h" ] || die "no $nccl_inc/nccl.h"
  nccl_code=$(sed -n 's/^#define NCCL_VERSION_CODE \([0-9]*\).*/\1/p' "$nccl_inc/nccl.h" | head -n1)
  [ -n "$nccl_code" ] || die "no NCCL_VERSION_CODE in $nccl_inc/nccl.h"
  if [ "$nccl_src" != torch ]; then
    libname=libnccl.so; [ "$link" = SHARED ] || libname=libnccl_static.a
    [ -n "$(find "$nccl_home"/lib* -maxdepth 2 -name "$libname" 2>/dev/null | head -n1)" ] \
      || die "no $libname under $nccl_home/lib* (HOROVOD_NCCL_LINK=$link)"
  fi
  WHEEL_DIR="$WHEEL_DIR/nccl${nccl_code}-${nccl_src}-${link,,}-sm${archs//,/.}"
  log "NCCL $nccl_code ($nccl_src: $nccl_inc), linked ${link,,}; CUDA $nvcc_ver kernels for sm ${archs}"
fi

wheel=$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n1 || true)
if [ -n "$wheel" ]; then
  log "using cached wheel $wheel"
  echo "$wheel"
  exit 0
fi
mkdir -p "$WHEEL_DIR"
if [ -n "$GPU_OPS" ]; then
  if [ "$nccl_src" = torch ]; then
    nccl_home="$(cd "$WHEEL_DIR" && pwd)/nccl-home"
    mkdir -p "$nccl_home/lib"
    ln -sfn "$torch_nccl/include" "$nccl_home/include"
    # libnccl.so for the link, libnccl.so.2 for the RUNPATH that the link puts in the library
    ln -sfn "$torch_nccl/lib/libnccl.so.2" "$nccl_home/lib/libnccl.so"
    ln -sfn "$torch_nccl/lib/libnccl.so.2" "$nccl_home/lib/libnccl.so.2"
  fi
  # nvcc first on PATH: Horovod's build_utils.py runs the first "nvcc" it finds.
  flavour=(env -u HOROVOD_NCCL_INCLUDE -u HOROVOD_NCCL_LIB -u NCCL_HOME PATH="$cuda_home/bin:$PATH"
           HOROVOD_GPU_OPERATIONS="$GPU_OPS" CUDA_HOME="$cuda_home" HOROVOD_CUDA_HOME="$cuda_home"
           HOROVOD_NCCL_HOME="$nccl_home" HOROVOD_NCCL_LINK="$link" HOROVOD_BUILD_CUDA_CC_LIST="$archs"
           CUDAARCHS=OFF)
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
log "building the Horovod wheel (${GPU_OPS:-CPU} flavour; on 2 cores about 3-5 minutes, NCCL about 9)"
start=$(date +%s)
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
cp "$build/build.log" "$WHEEL_DIR/build.log"  # what CMake found (MPI, Gloo, CUDA, NCCL) stays on record
echo "$(( $(date +%s) - start ))" >"$WHEEL_DIR/build-seconds"
wheel=$(ls "$WHEEL_DIR"/horovod-*.whl | head -n1)
log "built $(basename "$wheel") in $(cat "$WHEEL_DIR/build-seconds") s, cached in $WHEEL_DIR"
echo "$wheel"

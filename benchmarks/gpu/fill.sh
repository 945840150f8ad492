#!/usr/bin/env bash
# Fill benchmarks/gpu/carry/ with what benchmarks/gpu_check.sh needs on a lent GPU machine that
# reaches no registry. Run it here (PyPI and Debian's packages reachable), from anywhere:
#
#   benchmarks/gpu/fill.sh                 -> benchmarks/gpu/carry/ (about 35 MB; not in git)
#
# The GPU machine's image (/work/.library/device/KINDS.md) already has Python 3.12 with torch
# 2.11.0+cu130 (and its nvidia-nccl-cu13), torchvision, numpy, pyyaml, tqdm, matplotlib, tensorboard,
# psutil, cloudpickle, packaging, setuptools, wheel, cmake, ninja and mpi4py: every runtime
# dependency of adabatch-hvd and Horovod but one. So the folder holds:
#   sdist/horovod-0.28.1.tar.gz     the sdist that launch/build-horovod.sh patches and builds (it
#                                   runs "pip download", which gpu_check.sh points here with
#                                   PIP_NO_INDEX=1 PIP_FIND_LINKS=.../sdist)
#   wheels/cffi-*.whl, pycparser-*  Horovod's one missing requirement (cffi>=1.4.0, and what cffi
#                                   needs), for CPython 3.12 on manylinux x86_64
#   fashion-mnist/*.gz              the official Fashion-MNIST IDX files (Debian's dataset-fashion-mnist)
#   bin/patch, bin/make             Debian's, for a machine without them (they need only libc);
#                                   gpu_check.sh puts them on PATH only if the machine has none
#   MANIFEST.sha256                 checked by gpu_check.sh before it uses anything
# The Horovod patch itself is launch/patches/, which travels with the repository.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CARRY=${GPU_CHECK_CARRY:-$HERE/carry}
PY=${PYTHON:-python3}
HOROVOD_VERSION=0.28.1
# Pins: cffi 2.x supports CPython 3.12 (cp312 manylinux wheels); pycparser is cffi's only requirement.
CFFI=cffi==2.1.1
PYCPARSER=pycparser==2.23
FMNIST=/usr/share/datasets/fashion-mnist

die() { echo "fill: error: $*" >&2; exit 1; }
log() { echo "fill: $*" >&2; }

rm -rf "$CARRY.new"
mkdir -p "$CARRY.new"/{sdist,wheels,fashion-mnist,bin}
pipd=("$PY" -m pip download -q --disable-pip-version-check --no-deps)

log "horovod==$HOROVOD_VERSION sdist"
"${pipd[@]}" --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$CARRY.new/sdist" \
  || die "pip could not download the horovod==$HOROVOD_VERSION sdist"
[ -f "$CARRY.new/sdist/horovod-$HOROVOD_VERSION.tar.gz" ] || die "no horovod-$HOROVOD_VERSION.tar.gz after pip download"

log "$CFFI and $PYCPARSER for CPython 3.12, manylinux x86_64"
"${pipd[@]}" --only-binary :all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "$CFFI" -d "$CARRY.new/wheels" || die "pip could not download $CFFI for cp312"
"${pipd[@]}" --only-binary :all: --python-version 3.12 "$PYCPARSER" -d "$CARRY.new/wheels" \
  || die "pip could not download $PYCPARSER"

if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  log "Fashion-MNIST: installing Debian's dataset-fashion-mnist"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
      dataset-fashion-mnist; } >/dev/null 2>&1 || die "apt-get install dataset-fashion-mnist failed (as root?)"
fi
cp "$FMNIST"/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz "$CARRY.new/fashion-mnist/"

for tool in patch make; do
  bin=$(command -v "$tool") || die "no $tool here to carry"
  # only binaries that need nothing but the C library travel (they then run on any newer glibc)
  others=$(ldd "$bin" | grep -vE 'linux-vdso|ld-linux|libc\.so|libdl\.so' || true)
  [ -z "$others" ] || die "$bin needs more than libc: $others"
  cp "$bin" "$CARRY.new/bin/$tool"
done

(cd "$CARRY.new" && find . -type f ! -name MANIFEST.sha256 | sort | xargs sha256sum >MANIFEST.sha256)
rm -rf "$CARRY"
mv "$CARRY.new" "$CARRY"
log "done: $CARRY, $(du -sh "$CARRY" | cut -f1):"
(cd "$CARRY" && find . -type f | sort | xargs ls -l | awk '{printf "  %10d  %s\n", $5, $9}') >&2

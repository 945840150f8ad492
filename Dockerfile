# adabatch-hvd images, in two flavours chosen by build arguments:
#
#   CUDA + NCCL (the default), for GPU clusters: a CUDA 13 devel base (nvcc and the CUDA headers for
#   Horovod's CUDA kernels), OpenMPI, and Horovod 0.28.1 built with NCCL GPU operations:
#     docker build -t adabatch-hvd .
#   CPU (PyTorch + Gloo + MPI, like Horovod's own horovod-cpu images), from any Debian or Ubuntu base:
#     docker build --build-arg FLAVOUR=cpu --build-arg BASE_IMAGE=debian:bookworm -t adabatch-hvd:cpu .
#
# Both run launch/setup.sh, the very script a workstation runs; the cuda flavour runs it with
# HOROVOD_GPU_OPERATIONS=NCCL, as `HOROVOD_GPU_OPERATIONS=NCCL launch/setup.sh` does on a GPU
# workstation. NCCL is torch's own (the libnccl.so.2 of its nvidia-nccl-cu13 wheel), linked shared
# by launch/build-horovod.sh, so the process holds one NCCL, and no NCCL package or NVIDIA apt
# repository is needed: any base with a CUDA 13 toolkit at /usr/local/cuda will do.
# Without a registry, make such a base from Debian plus a local CUDA 13 toolkit
# (FLAVOUR=cuda tests/docker_check.sh does this) and pass it as BASE_IMAGE:
#     docker build --build-arg BASE_IMAGE=adabatch-base:bookworm-cuda13.0 -t adabatch-hvd .
# CUDA_ARCHS (e.g. 90) compiles Horovod's CUDA kernels for those GPU architectures only (faster
# build); empty means torch's own list.
#
# Add --build-arg USER_UID="$(id -u)" so that files written to bind mounts are yours. Behind a
# proxy that inspects TLS, hand pip the proxy's CA bundle as a BuildKit secret; it is read only
# inside the set-up steps and never stored in a layer:
#     DOCKER_BUILDKIT=1 docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
# (There is no "# syntax=" line on purpose: it makes BuildKit pull a frontend image from a
# registry, and the daemon's built-in frontend already knows RUN --mount.)
# tests/docker_check.sh builds either flavour (FLAVOUR=cpu|cuda) from a base made here and runs it.
#
# Launching (one node, several nodes, Slurm/pyxis): see launch/README.md and launch/docker-run.sh;
# on GPUs, README.md "GPU clusters".
#
# Python: the base image's own python3 (Ubuntu 24.04: 3.12, Debian 12: 3.11). torch 2.14.1,
# torchvision 0.29.1 and the rest of setup.sh's pins ship wheels for both, and Horovod's sdist
# builds against either. setup.sh puts everything in a venv (/opt/venv), so the distribution's
# "externally managed" system Python is left alone.
#
# CUDA base: the 13.0 devel image (nvcc for Horovod's CUDA kernels, CUDA headers for the NCCL ops;
# torch's CUDA major version is 13, and build-horovod.sh refuses a toolkit of another major).
# torch's wheels bring their own cuDNN, so the plain 13.0.2-devel image does as well as this one.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04
FROM ${BASE_IMAGE}

# cuda: Horovod with NCCL (needs a CUDA devel base); cpu: Gloo + MPI only, CUDA never looked for.
ARG FLAVOUR=cuda
# cuda flavour: GPU architectures for Horovod's CUDA kernels (HOROVOD_BUILD_CUDA_CC_LIST, e.g. 80,90);
# empty: torch's own list (sm_75 to sm_120 for torch 2.14.1).
ARG CUDA_ARCHS=
# UID of the unprivileged user; pass your own so files written to bind mounts are yours.
ARG USER_UID=1000
# Build-time settings read by launch/setup.sh (ARG: visible to RUN, not baked into the runtime env).
# HOROVOD_GPU_OPERATIONS and CUDA_HOME are set inside the set-up RUN for the cuda flavour only: the
# cpu flavour must not even define them.
ARG ADABATCH_VENV=/opt/venv
ARG ADABATCH_SKIP_APT=1
# No Slurm/munge/iptables: those are for the multi-node test cluster of `make test`, not the image.
ARG ADABATCH_TEST_CLUSTER=0
# setup.sh's interpreter: the distribution's python3, also once /opt/venv/bin leads PATH.
ARG PYTHON=/usr/bin/python3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# System packages. setup.sh would install its own list (OpenMPI, cmake, g++, make, the
# Fashion-MNIST data set) itself, but doing it here keeps apt's lists out of the image;
# ADABATCH_SKIP_APT=1 makes setup.sh fail loudly if one is missing instead.
# python3-dev: headers for the Horovod and mpi4py builds; patch: setup.sh patches Horovod;
# openssh-client/-server: horovodrun/mpirun reach other nodes over ssh, and a worker container
# runs sshd (as the unprivileged user, see launch/docker-run.sh). The host keys the package
# generates are deleted: no key pair is shared by every copy of the image.
# The unprivileged user: Ubuntu 24.04 images ship a user "ubuntu" with UID 1000; it is replaced so
# that the default UID 1000 (the first user on most hosts) belongs to "adabatch".
# No NCCL package: the cuda flavour links torch's own NCCL (see the top of this file).
# DL3008 (pin every apt version) is ignored on purpose: Debian's and Ubuntu's archives keep only
# the current version of each package, so exact pins of python3/openmpi/cmake would break the build
# at the next security update. The versions that matter for correctness (torch, and with it NCCL
# and the CUDA runtime) are pinned by launch/setup.sh.
# hadolint ignore=DL3008
RUN case "${FLAVOUR}" in \
      cuda) [ -x /usr/local/cuda/bin/nvcc ] \
              || { echo "FLAVOUR=cuda needs a CUDA 13 devel base image with /usr/local/cuda/bin/nvcc (BASE_IMAGE)" >&2; exit 1; } ;; \
      cpu) ;; \
      *) echo "FLAVOUR must be cuda or cpu, got '${FLAVOUR}'" >&2; exit 1 ;; \
    esac \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-dev python3-venv \
      libopenmpi-dev openmpi-bin \
      cmake g++ make patch ca-certificates \
      openssh-client openssh-server procps \
      dataset-fashion-mnist \
 && rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub \
 && rm -rf /var/lib/apt/lists/* \
 && if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --create-home --uid "${USER_UID}" --shell /bin/bash adabatch

# The venv's console scripts (adabatch-train, horovodrun, python) come first on PATH.
# OpenMPI's shared-memory transport tries process_vm_readv (CMA), which Docker's default
# seccomp/ptrace policy forbids; with the variable set, intra-node MPI messages use copy-in/out.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    OMPI_MCA_btl_vader_single_copy_mechanism=none

WORKDIR /opt/adabatch-hvd

# 1) The slow part (torch ~5 GB, the Horovod build): copy only what setup.sh needs so that this
#    layer survives edits to the code. The cache mount keeps pip's downloads and setup.sh's Horovod
#    wheel (~/.cache/adabatch-hvd; the key tells the _cpu and _gpu-NCCL builds apart) between
#    builds, outside the image. The optional secret "ca" is a CA bundle for pip (a proxy that
#    inspects TLS); it is mounted at /run/secrets/ca for this step only.
COPY launch/setup.sh launch/build-horovod.sh launch/
COPY launch/patches/ launch/patches/
COPY setup.py ./
COPY adabatch_hvd/__init__.py adabatch_hvd/
RUN --mount=type=cache,target=/root/.cache \
    --mount=type=secret,id=ca \
    if [ "${FLAVOUR}" = cuda ]; then \
      export HOROVOD_GPU_OPERATIONS=NCCL CUDA_HOME=/usr/local/cuda; \
      if [ -n "${CUDA_ARCHS}" ]; then export HOROVOD_BUILD_CUDA_CC_LIST="${CUDA_ARCHS}"; fi; \
    fi \
 && if [ -s /run/secrets/ca ]; then \
      echo "build: pip uses the CA bundle from the build secret 'ca'"; \
      export PIP_CERT=/run/secrets/ca SSL_CERT_FILE=/run/secrets/ca; \
    fi \
 && launch/setup.sh

# 2) The whole repository; setup.sh finds its finished environment (stamp) and only re-installs
#    the package (editable, seconds). It checks that Horovod's NCCL support matches
#    HOROVOD_GPU_OPERATIONS, so the cuda flavour sets it here too. Then the build proves that Horovod
#    has PyTorch, MPI and Gloo (and NCCL in the cuda flavour).
COPY . .
RUN --mount=type=cache,target=/root/.cache \
    if [ "${FLAVOUR}" = cuda ]; then export HOROVOD_GPU_OPERATIONS=NCCL CUDA_HOME=/usr/local/cuda; fi \
 && launch/setup.sh \
 && horovodrun --check-build | tee /tmp/check-build.txt \
 && grep -q '\[X\] PyTorch' /tmp/check-build.txt \
 && grep -q '\[X\] MPI' /tmp/check-build.txt \
 && grep -q '\[X\] Gloo' /tmp/check-build.txt \
 && if [ "${FLAVOUR}" = cuda ]; then grep -q '\[X\] NCCL' /tmp/check-build.txt; fi \
 && rm /tmp/check-build.txt \
 && adabatch-train --help >/dev/null \
 && mkdir -p runs data \
 && chown adabatch: runs data

LABEL org.opencontainers.image.title="adabatch-hvd" \
      org.opencontainers.image.description="AdaBatch adaptive batch sizes on Horovod 0.28.1 (PyTorch 2.14.1, OpenMPI, Gloo; cuda flavour: CUDA 13 and torch's NCCL)" \
      org.adabatch.flavour="${FLAVOUR}"

# Numeric, so that Kubernetes runAsNonRoot and similar checks can verify it without /etc/passwd.
USER ${USER_UID}

# sshd port used by worker containers in multi-node runs (launch/docker-run.sh); with
# --network host this only documents it.
EXPOSE 12345

# Entrypoint: a cluster user needs both
#   docker run IMG --config configs/x.yaml --epochs 3                 (a plain single-process run)
#   docker run IMG horovodrun -np 4 -H localhost:4 adabatch-train --config configs/x.yaml
#   docker run IMG /usr/sbin/sshd -D ...                               (a multi-node worker)
# so ENTRYPOINT ["adabatch-train"] would be wrong (it would swallow "horovodrun" as an argument)
# and a bare CMD would make the first form long. This tiny dispatcher runs adabatch-train when the
# arguments are options (start with "-") or absent, and otherwise executes them as a command.
# Slurm's pyxis/enroot does not run entrypoints by default; srun gives the command directly.
ENTRYPOINT ["/bin/bash", "-c", "if [ $# -eq 0 ] || [ \"${1#-}\" != \"$1\" ]; then set -- adabatch-train \"$@\"; fi; exec \"$@\"", "adabatch-entrypoint"]
CMD ["--config", "configs/fashion_mnist.yaml"]

"""A machine without a CUDA toolkit builds Horovod: launch/build-horovod.sh (the step of
launch/setup.sh that compiles Horovod) runs in a private mount namespace with an empty directory
over /usr/local, where toolkits live (this machine has CUDA 13 there, a fresh CI box has none), and
with a wheel cache of its own, $ADABATCH_CACHE/nocuda/<key>, never shared with set-up's. The key
hashes everything the build reads (build-horovod.sh, the patch, torch and Python versions): a change
to any of them compiles again (about 5-10 minutes on 2 cores); an unchanged repeat reuses that
no-CUDA wheel and its saved CMake log. The wheel is then checked in the same kind of namespace:
PyTorch + Gloo + MPI built, no CUDA library linked, and 2 ranks allreduce with it under Gloo and
MPI. The build log and its time go to runs/test-nocuda/."""

import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, hvd_env

RECORD = ROOT / "runs" / "test-nocuda"
CUDA_LIBS = re.compile(r"libcuda|libcudart|libnccl|libc10_cuda|libtorch_cuda|libnvrtc|libcublas")
# The Python that builds: this checkout's .venv (torch and pip come from the shared environment).
BUILD_PY = Path(sys.executable)


def hidden_usr_local(cmd, empty_dir, env, timeout):
    """Run cmd in a new mount namespace in which /usr/local is an empty directory. On a timeout the
    whole process group goes (a compiler left behind would load the machine for an hour)."""
    script = ('mount --bind "$0" /usr/local || exit 97\n'
              '[ -z "$(ls -A /usr/local)" ] || { echo "/usr/local is not hidden" >&2; exit 98; }\n'
              'exec "$@"\n')
    args = ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, str(empty_dir),
            *[str(c) for c in cmd]]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} did not end within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def clean_env(base=None, **extra):
    """The environment of a fresh machine: no CUDA variables, no GPU operations asked for."""
    env = {k: v for k, v in (base or os.environ).items()
           if k not in ("CUDA_HOME", "CUDA_PATH", "HOROVOD_CUDA_HOME", "HOROVOD_GPU_OPERATIONS",
                        "HOROVOD_GPU_ALLREDUCE", "HOROVOD_GPU", "PYTHONPATH")}
    env.update(extra)
    return env


def preconditions():
    """One line saying why the namespace cannot stand in for a machine without CUDA, or None."""
    if os.geteuid() != 0:
        return "test_nocuda needs root for 'unshare --mount' (CI runs as root)"
    if not shutil.which("unshare"):
        return "test_nocuda needs unshare (Debian: util-linux)"
    torch_spec = importlib.util.find_spec("torch")
    for what, path in [("the venv's python", os.path.realpath(BUILD_PY)), ("sys.base_prefix", sys.base_prefix),
                       ("torch", torch_spec.origin if torch_spec else "")]:
        if os.path.realpath(path).startswith("/usr/local/"):
            return (f"test_nocuda hides /usr/local, but {what} lives there ({path}); "
                    f"set up with a Python outside /usr/local (PYTHON=/usr/bin/python3 launch/setup.sh)")
    return None


@pytest.fixture(scope="module")
def nocuda(tmp_path_factory):
    """Build the wheel with /usr/local hidden; return (unpacked wheel dir, empty dir, build record)."""
    why = preconditions()
    assert why is None, why
    base = tmp_path_factory.mktemp("nocuda")
    empty, wheels = base / "empty-usr-local", wheel_cache()
    empty.mkdir()
    env = clean_env()
    # Inside the namespace, torch itself must see no toolkit (it looks at CUDA_HOME, nvcc on PATH
    # and /usr/local/cuda): that is what made Horovod call add_cuda() before.
    probe = hidden_usr_local([BUILD_PY, "-c", "from torch.utils import cpp_extension as c; print(c.CUDA_HOME)"],
                             empty, env, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == "None", f"torch still finds a CUDA toolkit: {probe.stdout}"
    start = time.time()
    build = hidden_usr_local([ROOT / "launch" / "build-horovod.sh", BUILD_PY, wheels], empty, env, timeout=7200)
    seconds = time.time() - start
    RECORD.mkdir(parents=True, exist_ok=True)
    log = "".join(p.read_text() for p in wheels.glob("build.log"))  # this build's, or the cached wheel's
    (RECORD / "build.log").write_text(log)
    built = "building the Horovod wheel (CPU flavour" in build.stderr
    summary = (f"build-horovod.sh with /usr/local hidden: rc {build.returncode}, {seconds:.0f} s, "
               f"{'compiled' if built else 'reused the cached no-CUDA wheel'} {build.stdout.strip() or '-'}\n")
    (RECORD / "summary.txt").write_text(summary)
    print(summary, end="")
    assert build.returncode == 0, f"{summary}{build.stderr[-3000:]}"
    wheel = Path(build.stdout.strip().splitlines()[-1])
    assert wheel.parent == wheels and wheel.exists(), build.stdout
    unpacked = base / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    return {"unpacked": unpacked, "empty": empty, "log": log, "stderr": build.stderr, "built": built}


def wheel_cache() -> Path:
    """$ADABATCH_CACHE/nocuda/<hash of what the build reads>: never set-up's wheels/ (built with a toolkit)."""
    import torch

    h = hashlib.sha256()
    for path in [ROOT / "launch" / "build-horovod.sh", *sorted((ROOT / "launch" / "patches").glob("*.patch"))]:
        h.update(path.read_bytes())
    h.update(f"{torch.__version__} {sys.version_info[:2]}".encode())
    cache = Path(os.environ.get("ADABATCH_CACHE", Path.home() / ".cache" / "adabatch-hvd"))
    return cache / "nocuda" / h.hexdigest()[:12]


def test_build_is_the_cpu_flavour_and_compiles(nocuda):
    # compiled now, or by an earlier run of this test from the same inputs, its CMake log kept beside it
    assert nocuda["built"] or "using cached wheel" in nocuda["stderr"], nocuda["stderr"]
    assert nocuda["log"], "no build.log beside the wheel"
    # CMake's own report: MPI found, and the torch extension built without CUDA
    assert re.search(r"Found MPI_CXX", nocuda["log"]), "CMake did not find MPI"
    # Horovod's CMakeLists probes for a CUDA compiler on every build; here the probe must find none
    # ("Looking for a CUDA compiler - NOTFOUND", "Could not find nvcc"), and nothing CUDA is compiled.
    assert "Looking for a CUDA compiler - NOTFOUND" in nocuda["log"], "CMake's CUDA probe is not in the log"
    assert not re.search(r"Found CUDAToolkit|HAVE_CUDA|HAVE_GPU|bin/nvcc", nocuda["log"]), \
        "the CPU build found or used a CUDA toolkit"


def test_wheel_has_pytorch_gloo_and_mpi_and_no_cuda(nocuda):
    unpacked = nocuda["unpacked"]
    env = clean_env(PYTHONPATH=str(unpacked))
    code = ("import horovod, horovod.torch as hvd; "
            "print(horovod.__file__); print(hvd.gloo_built(), hvd.mpi_built(), hvd.nccl_built(), hvd.cuda_built())")
    proc = hidden_usr_local([BUILD_PY, "-c", code], nocuda["empty"], env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, flags = proc.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(unpacked)), f"imported {where}, not the fresh wheel"
    assert flags == "True True 0 False", flags
    check = hidden_usr_local([BUILD_PY, "-c", "from horovod.runner.launch import run_commandline; run_commandline()",
                              "--check-build"], nocuda["empty"], env, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    for line, count in [("[X] PyTorch", 1), ("[X] MPI", 2), ("[X] Gloo", 2), ("[ ] NCCL", 1)]:
        assert check.stdout.count(line) == count, check.stdout
    libs = sorted(unpacked.glob("horovod/torch/mpi_lib_v2*.so"))
    assert libs, "the wheel has no horovod/torch/mpi_lib_v2*.so"
    needed = subprocess.run(["readelf", "-d", libs[0]], capture_output=True, text=True, check=True).stdout
    assert "NEEDED" in needed and "libtorch" in needed, needed
    assert not CUDA_LIBS.search(needed), f"the CPU wheel links CUDA: {CUDA_LIBS.findall(needed)}"


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_wheel_allreduces_on_two_ranks_without_cuda(nocuda, controller):
    # one write per line: mpirun tags (and interleaves) every write of an unbuffered stdout
    code = ("import sys, torch, horovod.torch as hvd; hvd.init(); "
            "t = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum); "
            "sys.stdout.write(f'ALLREDUCE {hvd.rank()} {hvd.size()} {t.item()} {hvd.__file__}\\n')")
    cmd = [BUILD_PY, "-c", "from horovod.runner.launch import run_commandline; run_commandline()",
           "-np", "2", "-H", "localhost:2", f"--{controller}", *(["--mpi-args=--oversubscribe"] if controller == "mpi" else []), BUILD_PY, "-c", code]
    env = clean_env(hvd_env(), PYTHONPATH=str(nocuda["unpacked"]))
    proc = hidden_usr_local(cmd, nocuda["empty"], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = sorted(re.findall(r"ALLREDUCE (\d) 2 3\.0 (\S+)", proc.stdout))
    assert [r for r, _ in lines] == ["0", "1"], proc.stdout
    assert all(path.startswith(str(nocuda["unpacked"])) for _, path in lines), lines


def test_setup_wheel_links_no_cuda():
    """The set-up's own wheel (CPU flavour; on this machine built with a toolkit present) links no CUDA
    library either: HOROVOD_CPU_ONLY keeps torch's CUDA build from pulling in add_cuda()."""
    spec = importlib.util.find_spec("horovod")
    assert spec and spec.origin, "horovod is not installed (run launch/setup.sh)"
    libs = sorted(Path(spec.origin).parent.glob("torch/mpi_lib_v2*.so"))
    assert libs, f"no mpi_lib_v2*.so under {Path(spec.origin).parent}/torch"
    needed = subprocess.run(["readelf", "-d", libs[0]], capture_output=True, text=True, check=True).stdout
    assert "libtorch" in needed, needed
    assert not CUDA_LIBS.search(needed), f"the CPU set-up's Horovod links CUDA: {CUDA_LIBS.findall(needed)}"

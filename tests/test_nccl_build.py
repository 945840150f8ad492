"""The NCCL flavour of Horovod, compiled and linked on this machine (no GPU needed): launch/build-horovod.sh
with HOROVOD_GPU_OPERATIONS=NCCL and this checkout's .venv Python, so NCCL is torch's own (its wheel's
nvidia/nccl), linked shared. The wheel is cached in $ADABATCH_CACHE/nccl/<key>/, never set-up's wheels/;
the key hashes what the build reads (build-horovod.sh, the patch, torch and Python versions, nvcc's
version) and build-horovod.sh adds nccl<NCCL_VERSION_CODE>-torch-shared-sm<archs>/ from the nccl.h it
compiles against. A change to any of them compiles again (3.5 to 9 minutes on 2 cores); an unchanged
repeat reuses the wheel and its saved CMake log. The wheel, unpacked and put first on PYTHONPATH, must
list NCCL in `horovodrun --check-build`, need libnccl.so.2 and libcudart.so.<major> and get torch's
files for both, and import and allreduce in one process without a GPU.

A machine without nvcc at $CUDA_HOME (default /usr/local/cuda) fails these tests with one line saying
so; ADABATCH_NO_NVCC=1 declares a machine known to have none, and then they skip with that reason
(where nvcc exists they run regardless). The build log, its time and the check-build output go to
runs/test-nccl/."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from conftest import BIN, ROOT, hvd_env

RECORD = ROOT / "runs" / "test-nccl"
BUILD_PY = Path(sys.executable)
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
NVCC = CUDA_HOME / "bin" / "nvcc"
# build-horovod.sh's defaults are what is tested: no NCCL, architecture or library path from outside.
NOT_PASSED = ("HOROVOD_NCCL_HOME", "NCCL_HOME", "HOROVOD_NCCL_LINK", "HOROVOD_NCCL_INCLUDE", "HOROVOD_NCCL_LIB",
              "HOROVOD_BUILD_CUDA_CC_LIST", "CUDAARCHS", "PYTHONPATH", "LD_LIBRARY_PATH")


def torch_side():
    """What torch's wheel brings: its CUDA major version, NCCL files and version, libcudart, architectures."""
    import torch

    site = Path(torch.__file__).resolve().parent.parent
    nccl = site / "nvidia" / "nccl"
    major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    cudart = sorted(site.glob(f"nvidia/*/lib/libcudart.so.{major}"))  # nvidia/cu13/lib, nvidia/cuda_runtime/lib
    header = nccl / "include" / "nccl.h"
    code = re.search(r"^#define NCCL_VERSION_CODE (\d+)", header.read_text(), re.M) if header.exists() else None
    return {"major": major, "nccl_include": nccl / "include", "libnccl": nccl / "lib" / "libnccl.so.2",
            "cudart": cudart[0] if cudart else None, "code": code and code.group(1),
            "archs": [str(n) for n in sorted({int(m[1]) for m in map(re.compile(r"sm_(\d+)").match,
                                                                        torch.cuda.get_arch_list()) if m})],
            "lib_dirs": [nccl / "lib", *(p.parent for p in cudart[:1]), site / "torch" / "lib"]}


def missing(torch_libs):
    """One line saying what this machine lacks for the NCCL build, or None."""
    if not NVCC.exists():
        return (f"test_nccl_build needs nvcc at {NVCC} (CUDA_HOME={CUDA_HOME}); install a CUDA toolkit there, "
                f"or set ADABATCH_NO_NVCC=1 on a machine known to have none")
    if torch_libs["major"] is None:
        return "test_nccl_build needs a CUDA build of torch; this one is CPU-only"
    if not (torch_libs["code"] and torch_libs["libnccl"].exists()):
        return ("test_nccl_build needs torch's wheel's NCCL (nvidia/nccl: include/nccl.h, lib/libnccl.so.2); "
                "this torch has none")
    if not torch_libs["cudart"]:
        return f"test_nccl_build needs torch's wheel's CUDA runtime (nvidia/*/lib/libcudart.so.{torch_libs['major']})"
    return None


def nvcc_version() -> str:
    return subprocess.run([NVCC, "--version"], capture_output=True, text=True, check=True).stdout


def wheel_cache() -> Path:
    """$ADABATCH_CACHE/nccl/<hash of what the build reads>; build-horovod.sh adds the NCCL level."""
    import torch

    h = hashlib.sha256()
    for path in [ROOT / "launch" / "build-horovod.sh", *sorted((ROOT / "launch" / "patches").glob("*.patch"))]:
        h.update(path.read_bytes())
    h.update(f"{torch.__version__} {sys.version_info[:2]} {nvcc_version()}".encode())
    cache = Path(os.environ.get("ADABATCH_CACHE", Path.home() / ".cache" / "adabatch-hvd"))
    return cache / "nccl" / h.hexdigest()[:12]


def run(cmd, env, timeout):
    """Run cmd in a session of its own; on a timeout the whole group goes (no compiler left behind)."""
    proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd="/")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(map(str, cmd))} did not end within {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def wheel_env(unpacked, **extra):
    env = {k: v for k, v in hvd_env().items() if k not in NOT_PASSED}
    env.update(PYTHONPATH=str(unpacked), **extra)
    return env


@pytest.fixture(scope="module")
def torch_libs():
    return torch_side()


@pytest.fixture(scope="module")
def nccl(torch_libs, tmp_path_factory):
    """Build (or reuse) the NCCL wheel; return its unpacked dir, CMake log and build-horovod.sh's stderr."""
    why = missing(torch_libs)
    if why and not NVCC.exists() and os.environ.get("ADABATCH_NO_NVCC") == "1":
        pytest.skip(f"ADABATCH_NO_NVCC=1: this machine has no nvcc ({NVCC})")
    if why:
        pytest.fail(why, pytrace=False)
    cache = wheel_cache()
    env = {k: v for k, v in os.environ.items() if k not in NOT_PASSED}
    env.update(HOROVOD_GPU_OPERATIONS="NCCL", CUDA_HOME=str(CUDA_HOME))
    start = time.time()
    build = run([ROOT / "launch" / "build-horovod.sh", BUILD_PY, cache], env, timeout=7200)
    seconds = time.time() - start
    built = "building the Horovod wheel (NCCL flavour" in build.stderr
    summary = (f"build-horovod.sh NCCL flavour: rc {build.returncode}, {seconds:.0f} s, "
               f"{'compiled' if built else 'reused the cached NCCL wheel'} {build.stdout.strip() or '-'}\n")
    RECORD.mkdir(parents=True, exist_ok=True)
    (RECORD / "summary.txt").write_text(summary)
    print(summary, end="")
    assert build.returncode == 0, f"{summary}{build.stderr[-3000:]}"
    wheel = Path(build.stdout.strip().splitlines()[-1])
    assert wheel.exists() and wheel.parent.parent == cache, build.stdout
    log = (wheel.parent / "build.log").read_text()
    (RECORD / "build.log").write_text(log)
    unpacked = tmp_path_factory.mktemp("nccl") / "unpacked"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(unpacked)
    libs = sorted(unpacked.glob("horovod/torch/mpi_lib_v2*.so"))
    assert libs, "the wheel has no horovod/torch/mpi_lib_v2*.so"
    return {"wheel": wheel, "unpacked": unpacked, "log": log, "stderr": build.stderr, "built": built, "lib": libs[0]}


def test_build_compiles_against_torchs_nccl(nccl, torch_libs):
    # compiled now, or by an earlier run from the same inputs, its CMake log kept beside it
    assert nccl["built"] or "using cached wheel" in nccl["stderr"], nccl["stderr"]
    archs = torch_libs["archs"]
    assert nccl["wheel"].parent.name == f"nccl{torch_libs['code']}-torch-shared-sm{'.'.join(archs)}", nccl["wheel"]
    log = nccl["log"]
    release = re.search(r"release [\d.]+, V([\d.]+)", nvcc_version()).group(1)
    assert f"The CUDA compiler identification is NVIDIA {release}" in log, "CMake did not use this nvcc"
    assert "Linking against shared NCCL library" in log
    assert f"NCCL_VERSION_CODE: {torch_libs['code']}" in log
    found = re.search(r"Found NCCL \(include: (\S+), library: (\S+)\)", log)
    assert found, "CMake did not report the NCCL it found"
    assert Path(found.group(1)).resolve() == torch_libs["nccl_include"], found.group(0)
    assert Path(found.group(2)).resolve() == torch_libs["libnccl"], found.group(0)
    # the kernels' architectures are torch's, from Horovod's -gencode flags alone (CUDAARCHS=OFF)
    flags = re.search(r"HVD_NVCC_COMPILE_FLAGS = (.*)", log)
    assert flags and sorted(set(re.findall(r"arch=compute_(\d+)", flags.group(1))), key=int) == archs, flags
    assert "CUDA_ARCHITECTURES is empty" not in log


def test_check_build_lists_nccl(nccl):
    check = run([BIN / "horovodrun", "--check-build"], wheel_env(nccl["unpacked"]), timeout=300)
    (RECORD / "check-build.txt").write_text(check.stdout)
    assert check.returncode == 0, check.stderr[-3000:]
    for line, count in [("[X] PyTorch", 1), ("[X] MPI", 2), ("[X] Gloo", 2), ("[X] NCCL", 1)]:
        assert check.stdout.count(line) == count, check.stdout


def test_links_torchs_nccl_and_cuda_runtime(nccl, torch_libs):
    needed = set(re.findall(r"\(NEEDED\).*\[(.+)\]",
                            subprocess.run(["readelf", "-d", nccl["lib"]], capture_output=True, text=True,
                                           check=True).stdout))
    assert {"libnccl.so.2", f"libcudart.so.{torch_libs['major']}"} <= needed, sorted(needed)
    # with torch's library directories, as a process that imported torch has them
    ldd = resolved(nccl["lib"], LD_LIBRARY_PATH=":".join(map(str, torch_libs["lib_dirs"])))
    assert ldd["libnccl.so.2"] == torch_libs["libnccl"], ldd
    assert ldd[f"libcudart.so.{torch_libs['major']}"] == torch_libs["cudart"].resolve(), ldd
    # and through the library's own RUNPATH (nccl-home/lib beside the wheel)
    assert resolved(nccl["lib"])["libnccl.so.2"] == torch_libs["libnccl"]


def resolved(lib, **env):
    """ldd's first answer for each NEEDED name, as a real path ("not found" stays as it is)."""
    env = {**{k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}, **env}
    out = subprocess.run(["ldd", lib], capture_output=True, text=True, env=env, check=True).stdout
    found = {}
    for name, path in re.findall(r"^\s*(\S+) => (.+?)(?: \(0x[0-9a-f]+\))?$", out, re.M):
        found.setdefault(name, Path(path).resolve() if path.startswith("/") else path)
    return found


def test_imports_and_allreduces_without_a_gpu(nccl, torch_libs, tmp_path):
    code = ("import json, torch, horovod, horovod.torch as hvd\n"
            "hvd.init()\n"
            "t = hvd.allreduce(torch.tensor([1.0, 2.0]), op=hvd.Sum)\n"
            "maps = {l.split()[-1] for l in open('/proc/self/maps') if '/lib' in l}\n"
            "print(json.dumps({'file': horovod.__file__, 'nccl': hvd.nccl_built(), 'cuda': hvd.cuda_built(),\n"
            "                  'size': hvd.size(), 'sum': t.tolist(), 'gpu': torch.cuda.is_available(),\n"
            "                  'libnccl': sorted(m for m in maps if 'libnccl' in m),\n"
            "                  'libcudart': sorted(m for m in maps if 'libcudart' in m)}))\n")
    proc = run([BUILD_PY, "-c", code], wheel_env(nccl["unpacked"]), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(nccl["unpacked"])), f"imported {got['file']}, not the fresh wheel"
    assert (got["nccl"], got["cuda"], got["size"], got["sum"]) == (int(torch_libs["code"]), True, 1, [1.0, 2.0]), got
    # one NCCL and one CUDA runtime in the process, both torch's
    assert [Path(p).resolve() for p in got["libnccl"]] == [torch_libs["libnccl"]], got["libnccl"]
    assert [Path(p).resolve() for p in got["libcudart"]] == [torch_libs["cudart"].resolve()], got["libcudart"]

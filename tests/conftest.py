"""Shared helpers: run a worker script under horovodrun with 2 ranks (Gloo or MPI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
BIN = Path(sys.executable).parent


def hvd_env(**extra):
    env = dict(os.environ)
    # OpenMPI refuses root unless told; CI runs as root.
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def horovodrun(args, controller="gloo", np=2, timeout=300, env=None, check=True):
    """Run `horovodrun -np N -H localhost:N --gloo|--mpi ARGS...` and return the CompletedProcess."""
    cmd = [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}", f"--{controller}"]
    if controller == "mpi":
        cmd += ["--mpi-args=--oversubscribe"]
    cmd += [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or hvd_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def run_worker(name, out_dir, *args, controller="gloo", np=2, timeout=300):
    """Run tests/workers/NAME.py under horovodrun; each rank writes OUT/rank{r}.json."""
    horovodrun([sys.executable, WORKERS / f"{name}.py", out_dir, *args], controller=controller, np=np,
               timeout=timeout)
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(np)]


@pytest.fixture(params=["gloo", "mpi"])
def controller(request):
    return request.param


@pytest.fixture(scope="module")
def make_cluster():
    """make_cluster(n_hosts=2, bandwidth=None, second_net=False, slurm=False) -> a running
    tests/cluster.py Cluster, torn down after the module (or by its watcher if pytest is killed).
    Where it cannot be made (not root, no network namespaces), the test fails with one line."""
    from cluster import Cluster, ClusterError

    made = []

    def make(**kw):
        try:
            made.append(Cluster(**kw).up())
        except ClusterError as e:
            pytest.fail(f"test cluster: {e}", pytrace=False)
        return made[-1]

    yield make
    for c in made:
        c.down()

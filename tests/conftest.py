"""Shared helpers: run a worker script under horovodrun with 2 ranks (Gloo or MPI)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"
BIN = Path(sys.executable).parent


# The run the launcher tests train (test_signals, test_multinode, test_slurm): 2048 Fashion-MNIST samples,
# an MLP, 2 stages (global batch 32, then 64 as 2 micro-batches of 16 per worker), a checkpoint every 8
# steps and 1 thread a rank: 96 optimizer steps, a few seconds on 2 cores.
SMALL = ["--config", "configs/fashion_mnist.yaml", "--train-samples", "2048", "--test-samples", "256",
         "--epochs", "2", "--interval", "1", "--initial-batch", "32", "--max-micro-batch", "16",
         "--model.name", "mlp", "--every-steps", "8", "--quiet", "true", "--threads", "1"]
SMALL_STEPS = 64 + 32
TIMING = ("epoch_seconds", "samples_per_second", "allreduce_wait_share")


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


def processes_with(text):
    """PIDs whose command line mentions `text` (the run dir), with their HOROVOD_RANK."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if text in cmd:
            rank = next((e.split(b"=")[1].decode() for e in env if e.startswith(b"HOROVOD_RANK=")), None)
            found[int(pid)] = rank
    return found


def wait_for(predicate, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


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


def records(run_dir):
    """metrics.jsonl of a run, one dict per epoch."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    from adabatch_hvd import checkpoint

    state, _ = checkpoint.load("latest", Path(run_dir) / "checkpoints")
    return state["model"]


def weight_difference(a, b) -> float:
    """The largest absolute difference between two state dicts' tensors (0.0: bit-identical)."""
    assert a.keys() == b.keys()
    return max((x.double() - y.double()).abs().max().item() for x, y in ((a[k], b[k]) for k in a))


def assert_same_records(got, want):
    """The same epochs, batches and learning rates, and losses and accuracies to 1e-6 (timings aside)."""
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for g, w in zip(got, want):
        for key in w:
            if key in TIMING:
                continue
            if isinstance(w[key], float):
                assert g[key] == pytest.approx(w[key], abs=1e-6), (key, g, w)
            else:
                assert g[key] == w[key], (key, g, w)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """SMALL trained straight through by 2 processes on one host (launch/run-local.sh, Gloo): the run that
    every launcher test (other hosts, other launchers, interrupted and resumed) must reproduce."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run([ROOT / "launch/run-local.sh", "2", "--threads", "1", "--", *SMALL, "--run-dir", run],
                          cwd=ROOT, env=hvd_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert records(run)[-1]["global_step"] == SMALL_STEPS
    return run

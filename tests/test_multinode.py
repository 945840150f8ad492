"""Multi-node for real: launch/run-multinode.sh across the hosts of a test cluster (tests/cluster.py)."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, hvd_env

LAUNCH = ROOT / "launch"
# Tiny: 2 stages (global batch 32, then 64 as 2 micro-batches of 16 per worker), an MLP, 1 thread a rank.
TINY = ["--config", "configs/fashion_mnist.yaml", "--train-samples", "512", "--test-samples", "256",
        "--epochs", "2", "--interval", "1", "--initial-batch", "32", "--max-micro-batch", "16",
        "--model.name", "mlp", "--quiet", "true", "--threads", "1"]
TIMING = ("epoch_seconds", "samples_per_second", "allreduce_wait_share")
GRADIENT_BYTES = 24 * 50890 * 4  # 24 optimizer steps x the MLP's 50,890 float32 parameters


def records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got, want):
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


@pytest.fixture(scope="module")
def hosts(make_cluster):
    return make_cluster(n_hosts=2, second_net=True)


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
    """The reference: the same config as 2 processes on one host (launch/run-local.sh)."""
    run = tmp_path_factory.mktemp("one-host") / "run"
    proc = subprocess.run([LAUNCH / "run-local.sh", "2", "--threads", "1", "--", *TINY, "--run-dir", run], cwd=ROOT,
                          env=hvd_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return records(run)


@pytest.mark.parametrize("controller,hostspec,iface", [
    ("gloo", "-H", None),
])
def test_two_hosts_train_like_one_host(hosts, one_host, tmp_path, controller, hostspec, iface):
    """run-multinode.sh from node1 puts a rank on each host; the records equal the one-host run's, and
    the gradients crossed the chosen network (eth0 unless -i says otherwise) and not the other one."""
    run = tmp_path / "run"
    if hostspec == "-hostfile":
        (tmp_path / "hosts").write_text("# the two test hosts\nnode1 slots=1\n\nnode2 slots=1\n")
        spec = ["-hostfile", tmp_path / "hosts"]
    else:
        spec = ["-H", "node1:1,node2:1"]
    before = hosts.counters("node2")
    proc = hosts.run("node1", [LAUNCH / "run-multinode.sh", *spec, f"--{controller}", "--threads", "1",
                               *(["-i", iface] if iface else []), "--", *TINY, "--run-dir", run],
                     cwd=ROOT, env=hvd_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    after = hosts.counters("node2")
    assert f"2 processes on node1:1,node2:1 ({controller}" in proc.stderr
    assert_same_run(records(run), one_host)
    sent = {i: after[i][1] - before[i][1] for i in ("eth0", "eth1")}
    chosen, other = (iface or "eth0"), ("eth0" if iface == "eth1" else "eth1")
    print(f"{controller} {hostspec} -i {iface}: node2 sent {sent} bytes")
    assert sent[chosen] > GRADIENT_BYTES, sent  # the allreduce went over the chosen network
    assert sent[other] < GRADIENT_BYTES / 10, sent  # and not over the other one

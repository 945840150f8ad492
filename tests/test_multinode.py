"""Multi-node for real: launch/run-multinode.sh across the hosts of a test cluster (tests/cluster.py)."""

import signal
import subprocess
import time

import pytest

from adabatch_hvd import checkpoint
from conftest import (ROOT, SMALL, SMALL_STEPS, assert_same_records, hvd_env, records, wait_for)

RUN_MULTINODE = ROOT / "launch/run-multinode.sh"
GRADIENT_BYTES = SMALL_STEPS * 50890 * 4  # every optimizer step allreduces the MLP's 50,890 float32 parameters


@pytest.fixture(scope="module")
def hosts(make_cluster):
    return make_cluster(n_hosts=2, second_net=True)


def checkpoint_at_least(run, step):
    return lambda: any(checkpoint.position(p)[1] >= step for p in checkpoint.list_checkpoints(run / "checkpoints"))


def leftovers(cluster):
    """Processes still running on any host, besides the cluster's own daemons."""
    return {h: cluster.describe(cluster.processes(h)) for h in cluster.hosts if cluster.processes(h)}


@pytest.mark.parametrize("controller,hostspec,iface", [
    ("gloo", "-H", None),
    ("mpi", "-hostfile", None),
    ("gloo", "-hostfile", "eth1"),  # needs the gloo_context.cc fix in launch/patches (README "The Horovod patch")
    ("mpi", "-H", "eth1"),
])
def test_two_hosts_train_like_one_host(hosts, reference_run, tmp_path, controller, hostspec, iface):
    """run-multinode.sh from node1 puts a rank on each host; the records equal the one-host run's, the
    gradients crossed the network, and with -i IF the chosen network and not the other one."""
    run = tmp_path / "run"
    if hostspec == "-hostfile":
        (tmp_path / "hosts").write_text("# the two test hosts\nnode1 slots=1\n\nnode2 slots=1\n")
        spec = ["-hostfile", tmp_path / "hosts"]
    else:
        spec = ["-H", "node1:1,node2:1"]
    before = hosts.counters("node2")
    proc = hosts.run("node1", [RUN_MULTINODE, *spec, f"--{controller}", "--threads", "1",
                               *(["-i", iface] if iface else []), "--", *SMALL, "--run-dir", run],
                     cwd=ROOT, env=hvd_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    after = hosts.counters("node2")
    assert f"2 processes on node1:1,node2:1 ({controller}" in proc.stderr
    assert_same_records(records(run), records(reference_run))
    sent = {i: after[i][1] - before[i][1] for i in ("eth0", "eth1")}
    print(f"{controller} {hostspec} -i {iface}: node2 sent {sent} bytes")
    if iface is None:  # horovodrun's Gloo takes any common network (a set's first); OpenMPI stripes over both
        assert sum(sent.values()) > GRADIENT_BYTES, sent
    else:
        other = "eth0" if iface == "eth1" else "eth1"
        assert sent[iface] > GRADIENT_BYTES, sent  # the allreduce went over the chosen network
        assert sent[other] < GRADIENT_BYTES / 10, sent  # and not over the other one
    assert not leftovers(hosts)


def test_ctrl_c_stops_every_host(hosts, tmp_path):
    """SIGINT to run-multinode.sh (MPI): both hosts' ranks stop at the same step with a checkpoint, and
    nothing of the job (mpirun, orted, ranks) is left on either host."""
    run = tmp_path / "run"
    job = hosts.popen("node1", [RUN_MULTINODE, "-H", "node1:1,node2:1", "--mpi", "--threads", "1", "--", *SMALL,
                                "--run-dir", run], cwd=ROOT, env=hvd_env(), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    wait_for(checkpoint_at_least(run, 16), 300, "a checkpoint at step >= 16")
    job.send_signal(signal.SIGINT)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 75, err[-4000:]
    assert err.strip().splitlines()[-1] == ("run-multinode: stopped by SIGINT: every rank stopped at the same step, "
                                            "with a checkpoint; the same command with --resume auto continues")
    assert 16 <= checkpoint.position(checkpoint.latest(run / "checkpoints"))[1] < SMALL_STEPS
    assert not leftovers(hosts)


def test_a_host_dies_mid_epoch(hosts, reference_run, tmp_path):  # last: node2 stays dead
    """Every process of node2 is killed (its sshd too) in the middle of an epoch: the job ends with a
    non-zero exit and nothing left on any host; a resume on node1 alone keeps the global batch."""
    run = tmp_path / "run"
    job = hosts.popen("node1", [RUN_MULTINODE, "-H", "node1:1,node2:1", "--threads", "1", "--", *SMALL,
                                "--run-dir", run], cwd=ROOT, env=hvd_env(), stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE, text=True)
    wait_for(checkpoint_at_least(run, 16), 300, "a checkpoint at step >= 16")
    hosts.kill_host("node2")
    t0 = time.monotonic()
    out, err = job.communicate(timeout=300)
    seconds = time.monotonic() - t0
    print(f"node2 killed: the job exited with code {job.returncode} after {seconds:.1f} s")
    print("\n".join(err.strip().splitlines()[-3:]))
    assert job.returncode not in (0, None), err[-4000:]
    assert "Traceback" not in err, err[-4000:]  # horovodrun's and the surviving rank's: one line each
    assert not leftovers(hosts)
    epoch, step = checkpoint.position(checkpoint.latest(run / "checkpoints"))
    assert 16 <= step < SMALL_STEPS

    alone = hosts.run("node1", [RUN_MULTINODE, "-H", "node1:1", "--threads", "1", "--", *SMALL, "--run-dir", run,
                                "--resume", "auto"], cwd=ROOT, env=hvd_env(), timeout=600)
    assert alone.returncode == 0, alone.stderr[-4000:]
    assert f"step {step} (saved with world size 2)" in alone.stderr
    got, want = records(run), records(reference_run)
    assert [r["global_batch"] for r in got] == [r["global_batch"] for r in want] == [32, 64]
    assert [r["world_size"] for r in got] == [2] * epoch + [1] * (2 - epoch)  # the resumed run wrote the rest
    assert [r["per_worker_batch"] for r in got] == [32, 64]

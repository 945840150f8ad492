"""Slurm for real on the test cluster (tests/cluster.py): slurmctld, a slurmd per host and munge.
launch/slurm.sbatch trains across 2 nodes with mpirun, srun and horovodrun; a job signalled before its time limit
stops with a checkpoint, requeues itself and ends with bit-identical weights."""

import os
import signal

import pytest

from adabatch_hvd import checkpoint
from conftest import (ROOT, SMALL, assert_same_records, final_weights, hvd_env, records, wait_for,
                      weight_difference)

# The #SBATCH defaults are for GPU nodes; the test nodes have 2 CPUs and no GPUs.
SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=30"]


@pytest.fixture(scope="module")
def slurm(make_cluster):
    return make_cluster(n_hosts=2, slurm=True)


def submit(cluster, tmp_path, launcher, *train_args):
    out = tmp_path / "slurm-%j.out"
    job = cluster.sbatch("node1", [*SBATCH, f"--output={out}", "launch/slurm.sbatch", *SMALL, *train_args],
                         cwd=ROOT, env=hvd_env(LAUNCHER=launcher))
    return job, tmp_path / f"slurm-{job}.out"


# srun: Slurm's mpi/pmix starts the ranks and Horovod uses its MPI controller (the test nodes get their
# own TmpFS for PMIx, see tests/cluster.py). horovodrun, the default, trains in the test below.
@pytest.mark.parametrize("launcher", ["mpirun", "srun"])
def test_sbatch_trains_on_two_nodes(slurm, reference_run, tmp_path, launcher):
    run = tmp_path / "run"
    job, out = submit(slurm, tmp_path, launcher, "--run-dir", run)
    info = slurm.wait_job(job, timeout=600)
    log = out.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-4000:]
    assert f"slurm.sbatch: job {job} (restart 0), 2 ranks on node1:1,node2:1, launcher {launcher}" in log
    assert info["NodeList"] == "node[1-2]"
    assert_same_records(records(run), records(reference_run))


def test_time_limit_signal_stops_requeues_and_ends_bit_identical(slurm, reference_run, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@180 does before the time limit): every rank stops
    at the same step with a checkpoint, the job requeues itself and the rerun of the same command
    (--resume auto) finishes the run with the weights of an uninterrupted one."""
    run = tmp_path / "run"
    job, out = submit(slurm, tmp_path, "horovodrun", "--run-dir", run, "--resume", "auto")

    def mid_run():
        found = checkpoint.list_checkpoints(run / "checkpoints")
        return any(checkpoint.position(p)[1] >= 16 for p in found)
    wait_for(mid_run, 300, "a checkpoint at step >= 16")
    # --signal=B:USR1 signals the batch shell alone (scancel --batch would signal every process of the
    # batch step, horovodrun included, which SIGUSR1 kills)
    shell = [p for p in slurm.processes("node1") if b"slurm_script" in open(f"/proc/{p}/cmdline", "rb").read()]
    assert len(shell) == 1, slurm.describe(slurm.processes("node1"))
    os.kill(shell[0], signal.SIGUSR1)
    info = slurm.wait_job(job, timeout=600)
    log = out.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-4000:]
    assert f"slurm.sbatch: job {job} (restart 0), 2 ranks on node1:1,node2:1, launcher horovodrun" in log
    assert f"slurm.sbatch: requeued job {job}" in log
    assert f"slurm.sbatch: job {job} (restart 1), 2 ranks on node1:1,node2:1, launcher horovodrun" in log
    assert info["NodeList"] == "node[1-2]"
    stopped = next(line for line in log.splitlines() if "stop requested (SIGTERM): stopped at" in line)
    resumed = next(line for line in log.splitlines() if "resuming from" in line)
    step = int(stopped.split("step ")[1].split(",")[0])
    assert 16 <= step < 96 and f"step {step} (saved with world size 2)" in resumed, (stopped, resumed)
    diff = weight_difference(final_weights(run), final_weights(reference_run))
    print(f"stopped at step {step}, requeued, resumed; weight difference: {diff}")
    assert diff == 0.0
    assert_same_records(records(run), records(reference_run))

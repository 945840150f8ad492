"""Signals and mistakes under launch/run-local.sh: one line and exit code 2 for a bad flag; Ctrl-C,
SIGTERM and SIGHUP stop every rank at the same step with a checkpoint, exit 75 (a second one, a second
or more later, kills the job: 128 + the signal), nothing of the job is left running, and the same
command with --resume auto then ends with bit-identical weights."""

import os
import signal
import subprocess
import time

import pytest

from adabatch_hvd import checkpoint
from conftest import (ROOT, SMALL, SMALL_STEPS, assert_same_records, final_weights, hvd_env, processes_with,
                      records, wait_for, weight_difference)

RUN_LOCAL = ROOT / "launch/run-local.sh"


def run_local(run_dir, controller):
    """The command of these tests: the same every time, so that --resume auto is what continues it."""
    return [RUN_LOCAL, "2", f"--{controller}", "--threads", "1", "--", *SMALL, "--run-dir", run_dir,
            "--resume", "auto"]


def checkpoint_at_least(run, step):
    return lambda: any(checkpoint.position(p)[1] >= step for p in checkpoint.list_checkpoints(run / "checkpoints"))


def rank_pids(run):
    """The training processes of the run (Gloo ranks have HOROVOD_RANK, MPI ones OMPI_COMM_WORLD_RANK)."""
    pids = []
    for pid in processes_with(str(run)):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if any(e.startswith((b"HOROVOD_RANK=", b"OMPI_COMM_WORLD_RANK=")) for e in env):
            pids.append(pid)
    return pids


def test_bad_flag_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run([RUN_LOCAL, "2", "--", *SMALL, "--run-dir", tmp_path / "run", "--epochz", "3"],
                          cwd=ROOT, env=hvd_env(), capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "run-local: error: unrecognized arguments: --epochz 3 (see --help)\n"
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


@pytest.mark.parametrize("controller,sig,stuck", [
    ("gloo", signal.SIGINT, False),   # Ctrl-C: a clean stop at the next step
    ("mpi", signal.SIGTERM, False),
    ("mpi", signal.SIGHUP, True),     # ranks that cannot stop (SIGSTOPped): the second signal kills the job
], ids=["gloo-SIGINT", "mpi-SIGTERM", "mpi-SIGHUP-twice-stuck"])
def test_signal_stops_the_whole_job_then_resume_is_exact(reference_run, tmp_path, controller, sig, stuck):
    run = tmp_path / "run"
    job = subprocess.Popen(run_local(run, controller), cwd=ROOT, env=hvd_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        wait_for(checkpoint_at_least(run, 16), 300, "the second checkpoint")
        if stuck:  # ranks that never reach their next step, as in a hung collective
            for pid in rank_pids(run):
                os.kill(pid, signal.SIGSTOP)
        job.send_signal(sig)
        seen = ""
        if stuck:
            while "again kills it now" not in seen:  # the launcher took the first signal: send the second
                seen += job.stderr.readline()
            time.sleep(1.5)  # (within a second it would be the same request delivered twice)
            job.send_signal(sig)
        out, err = job.communicate(timeout=120)
        err = seen + err
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == (128 + sig if stuck else 75), err[-4000:]
    assert not processes_with(str(run)), "processes of the job are still running"
    lines = err.strip().splitlines()
    how = ("the job was killed before its ranks stopped; the same command with --resume auto continues from the "
           "last checkpoint written, if there is one") if stuck else \
        "every rank stopped at the same step, with a checkpoint; the same command with --resume auto continues"
    assert lines[-1] == f"run-local: stopped by {sig.name}: {how}"
    assert "Traceback" not in err and "-----" not in err, err[-4000:]  # no horovodrun traceback, no mpirun banner
    epoch, stopped_at = checkpoint.position(checkpoint.latest(run / "checkpoints"))
    assert 16 <= stopped_at < SMALL_STEPS, stopped_at  # it really stopped in the middle

    resumed = subprocess.run(run_local(run, controller), cwd=ROOT, env=hvd_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"step {stopped_at} (saved with world size 2)" in resumed.stderr
    diff = weight_difference(final_weights(run), final_weights(reference_run))
    print(f"{controller} {sig.name}: stopped at step {stopped_at}; weight difference after resume: {diff}")
    assert diff == 0.0
    assert_same_records(records(run), records(reference_run))


def test_ctrl_c_to_a_process_group_with_timeout_in_it_is_a_clean_stop(tmp_path):
    """Issue 17 item 11: a terminal's Ctrl-C reaches the whole process group, and timeout passes it on to
    run-local.sh again; the two are one request, not a stop and then a kill."""
    run = tmp_path / "run"
    job = subprocess.Popen(["timeout", "600", *run_local(run, "gloo")], cwd=ROOT, env=hvd_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for(checkpoint_at_least(run, 16), 300, "the second checkpoint")
        os.killpg(job.pid, signal.SIGINT)
        out, err = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 75, err[-4000:]
    assert err.strip().splitlines()[-1] == ("run-local: stopped by SIGINT: every rank stopped at the same step, "
                                            "with a checkpoint; the same command with --resume auto continues")
    assert not processes_with(str(run)), "processes of the job are still running"
    assert 16 <= checkpoint.position(checkpoint.latest(run / "checkpoints"))[1] < SMALL_STEPS

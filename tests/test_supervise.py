"""adabatch_hvd.supervise with a stand-in launcher (seconds, no Horovod): the line and exit code after a stop
signal say what the ranks did. A Ctrl-C that reaches the process group twice (a wrapper such as timeout passes
it on) is one request; a clean stop is exit 75 however it was asked for; a kill or a start-up death does not
claim a checkpoint."""

import os
import signal
import subprocess
import sys
import time

import pytest

from adabatch_hvd.supervise import Filter
from conftest import ROOT, wait_for

# Two "ranks" (HOROVOD_RANK in their environment) under a launcher that exits with the first failed rank's
# code, as mpirun does. A rank marks itself ready in OUT once it handles SIGTERM as MODE says:
#   stop: exit 75 a moment later (a clean stop)   stuck: ignore it   none: no handler (dies of it)
#   finish: end with 0 a moment later
LAUNCHER = r"""
import os, subprocess, sys, time
out, mode = sys.argv[1], sys.argv[2]
rank = '''
import os, signal, sys, time
out, mode, r = sys.argv[1], sys.argv[2], os.environ["HOROVOD_RANK"]
code = {"stop": 75, "finish": 0}.get(mode)
if mode != "none":
    signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.3), sys.exit(code)) if code is not None else None)
open(os.path.join(out, "ready" + r), "w").close()
end = time.monotonic() + 60
while time.monotonic() < end:
    time.sleep(0.05)
'''
ranks = [subprocess.Popen([sys.executable, "-c", rank, out, mode], env=dict(os.environ, HOROVOD_RANK=str(r)))
         for r in range(2)]
while True:
    codes = [p.poll() for p in ranks]
    bad = [c for c in codes if c not in (None, 0)]
    if bad or all(c == 0 for c in codes):
        for p in ranks:
            p.terminate() if p.poll() is None else None
        sys.exit(128 - bad[0] if bad and bad[0] < 0 else bad[0] if bad else 0)
    time.sleep(0.05)
"""


def supervised(tmp_path, mode, wrapper=()):
    """The stand-in job under `python -m adabatch_hvd.supervise job --`, in a process group of its own."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    cmd = [*wrapper, sys.executable, "-m", "adabatch_hvd.supervise", "job", "--", sys.executable, launcher,
           tmp_path, mode]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"):
        env.pop(var, None)
    job = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: all((tmp_path / f"ready{r}").exists() for r in range(2)), 60, "the ranks")
    return job


def last_line(job):
    out, err = job.communicate(timeout=120)
    return err.strip().splitlines()[-1]


def test_ctrl_c_to_a_process_group_with_timeout_is_one_clean_stop(tmp_path):
    """timeout passes the group's SIGINT on to its child: supervise gets it twice within a millisecond."""
    job = supervised(tmp_path, "stop", wrapper=["timeout", "120"])
    os.killpg(job.pid, signal.SIGINT)
    assert last_line(job) == ("job: stopped by SIGINT: every rank stopped at the same step, with a checkpoint; "
                              "the same command with --resume auto continues")
    assert job.returncode == 75


def test_a_signal_again_after_a_second_kills_and_claims_no_checkpoint(tmp_path):
    job = supervised(tmp_path, "stuck")
    job.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    job.send_signal(signal.SIGTERM)
    assert last_line(job) == ("job: stopped by SIGTERM: the job was killed before its ranks stopped; the same "
                              "command with --resume auto continues from the last checkpoint written, if there is one")
    assert job.returncode == 128 + signal.SIGTERM


def test_ranks_that_die_of_the_stop_signal_are_not_a_clean_stop(tmp_path):
    """A rank still starting up (no handler yet) dies of the SIGTERM: not a stop with a checkpoint."""
    job = supervised(tmp_path, "none")
    job.send_signal(signal.SIGINT)
    assert last_line(job) == ("job: stopped by SIGINT: the job ended with code 143 before its ranks stopped "
                              "together; the same command with --resume auto continues from the last checkpoint "
                              "written, if there is one")
    assert job.returncode == 130


def test_a_job_that_finishes_anyway_exits_0(tmp_path):
    job = supervised(tmp_path, "finish")
    job.send_signal(signal.SIGHUP)
    assert last_line(job) == "job: SIGHUP came as the job finished: nothing was stopped"
    assert job.returncode == 0


@pytest.mark.parametrize("lines,rank,code", [
    (["srun: error: node2: task 1: Exited with exit code 75\n"], "1", 75),
    (["srun: error: node1: tasks 0-1: Exited with exit code 2\n"], "0-1", 2),
    (["Process 1 exit with status code 75.\n"], "1", 75),
    (["Traceback (most recent call last):\n", '  File "x", line 1\n',
      "RuntimeError: Horovod detected that one or more processes exited with non-zero status, thus causing\n",
      "Process name: 0\n", "Exit code: 75\n", "\n"], "0", 75),
])
def test_filter_finds_the_failed_rank(lines, rank, code, capsys):
    filt = Filter(sys.stderr)
    for line in lines:
        filt.feed(line)
    filt.close()
    assert (filt.rank, filt.code) == (rank, code)
    assert ("srun: error" in capsys.readouterr().err) == lines[0].startswith("srun")  # srun's line is kept

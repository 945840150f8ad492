"""adabatch_hvd.supervise with a stand-in launcher (seconds, no Horovod): the line and exit code after a stop
signal say what the ranks did. A Ctrl-C that reaches the process group twice (a wrapper such as timeout passes
it on) is one request; a clean stop is exit 75 however it was asked for; a kill or a start-up death does not
claim a checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from adabatch_hvd import exitstatus
from adabatch_hvd.exitstatus import JOB_VAR, RANK_VARS, run_dir_of
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


# ---- the decision comes from the status files the ranks write (exitstatus.py), not from the launcher's text ----
# A stand-in launcher: runs one "rank" per entry of SPEC["ranks"], one after the other (so that the first to fail
# is the first listed), with HOROVOD_RANK and HOROVOD_SIZE set, then writes SPEC["text"] to stderr (horovodrun's
# and mpirun's reports, as misleading as a test wants them) and exits SPEC["rc"]. A rank is adabatch-train's
# exit path (exitstatus.recorded) around a main that returns the code given, or, for "kill", dies of SIGKILL,
# or, for "stop", waits for SIGTERM and then returns 75 ("late": waits for a second SIGTERM, the kill's). The
# run dir comes last in the command, after "adabatch-train --run-dir", where the supervisor reads it.
STATUS_LAUNCHER = r"""
import json, os, subprocess, sys
spec, out, run_dir = json.loads(sys.argv[1]), sys.argv[2], sys.argv[-1]
rank = '''
import os, signal, sys, time
from adabatch_hvd import exitstatus
run_dir, what, out = sys.argv[1], sys.argv[2], sys.argv[3]

@exitstatus.recorded
def main(argv):
    exitstatus.note(run_dir=run_dir)
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what in ("stop", "late"):
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        open(os.path.join(out, "ready" + os.environ["HOROVOD_RANK"]), "w").close()
        while len(stop) < (1 if what == "stop" else 2):
            time.sleep(0.05)
        exitstatus.note(message="stopped on request (SIGTERM)")
        return 75
    exitstatus.note(message="said by rank " + os.environ["HOROVOD_RANK"])
    return int(what)

sys.exit(main(None))
'''
size = len(spec["ranks"])
procs = [subprocess.Popen([sys.executable, "-c", rank, run_dir, what, out],
                          env=dict(os.environ, HOROVOD_RANK=str(r), HOROVOD_SIZE=str(size)))
         for r, what in enumerate(spec["ranks"]) if what in ("stop", "late")]
for r, what in enumerate(spec["ranks"]):
    if what not in ("stop", "late"):
        subprocess.run([sys.executable, "-c", rank, run_dir, what, out],
                       env=dict(os.environ, HOROVOD_RANK=str(r), HOROVOD_SIZE=str(size)))
for p in procs:
    p.wait()
sys.stderr.write("".join(spec["text"]))
sys.exit(spec["rc"])
"""


def status_job(tmp_path, run, ranks, text=(), rc=1):
    """The stand-in job under supervise, training (as far as supervise can tell) in run dir `run`."""
    launcher = tmp_path / "status_launcher.py"
    launcher.write_text(STATUS_LAUNCHER)
    spec = json.dumps({"ranks": ranks, "text": list(text), "rc": rc})
    cmd = [sys.executable, "-m", "adabatch_hvd.supervise", "job", "--", sys.executable, launcher, spec, tmp_path,
           "adabatch-train", "--run-dir", run]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for var in (*RANK_VARS, "HOROVOD_SIZE", JOB_VAR):
        env.pop(var, None)
    return subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished(job):
    out, err = job.communicate(timeout=120)
    return job.returncode, (err.strip().splitlines() or [""])[-1], err


HOST = socket.gethostname()


def test_status_files_decide_over_misleading_launcher_text(tmp_path):
    """horovodrun's report names rank 1 and code 75 (a clean stop); the ranks wrote that rank 0 failed on bad
    input and rank 1 only lost its peers after it: the job's code is rank 0's 2."""
    text = ["Traceback (most recent call last):\n", '  File "x", line 1\n',
            "RuntimeError: Horovod detected that one or more processes exited with non-zero status, thus causing\n",
            "Process name: 1\n", "Exit code: 75\n", "\n"]
    code, last, err = finished(status_job(tmp_path, tmp_path / "run", ["2", "1"], text))
    assert (code, last) == (2, f"job: rank 0 ({HOST}) exited with code 2 (user_error: said by rank 0)"), err
    assert "Traceback" not in err and "Exit code" not in err  # the filter still tidies the output


def test_a_rank_that_stopped_is_a_clean_stop_whatever_the_text_says(tmp_path):
    code, last, err = finished(status_job(tmp_path, tmp_path / "run", ["0", "75"],
                                          ["Process 0 exit with status code 2.\n"]))
    assert (code, last) == (75, f"job: rank 1 ({HOST}) exited with code 75 (stopped: said by rank 1)"), err


def test_a_rank_without_a_status_was_killed(tmp_path):
    """Rank 1 dies of SIGKILL and writes nothing; rank 0 lost its peers. The ranks' statuses (world size 2)
    say which rank was killed; the number is the launcher's for that rank (137), else its own code."""
    code, last, err = finished(status_job(tmp_path, tmp_path / "run", ["1", "kill"],
                                          ["Process 1 exit with status code 137.\n"]))
    assert (code, last) == (137, "job: rank 1 ended without writing its exit status: killed (SIGKILL, the "
                                 "out-of-memory killer) or its host lost; the launcher ended with code 137"), err
    # a report about another rank does not lend its number
    code, last, err = finished(status_job(tmp_path, tmp_path / "run", ["1", "kill"],
                                          ["Process 0 exit with status code 1.\n"], rc=9))
    assert (code, last) == (9, "job: rank 1 ended without writing its exit status: killed (SIGKILL, the "
                               "out-of-memory killer) or its host lost; the launcher ended with code 9"), err


def test_lost_peers_alone_and_ranks_that_all_finished(tmp_path):
    code, last, err = finished(status_job(tmp_path, tmp_path / "run", ["1", "1"], rc=5))
    assert (code, last) == (1, f"job: rank 0 ({HOST}) exited with code 1 (lost_peers: said by rank 0)"), err
    code, last, err = finished(status_job(tmp_path, tmp_path / "run", ["0", "0"],
                                          ["Process 1 exit with status code 3.\n"], rc=7))
    assert (code, last) == (7, "job: every rank exited with code 0, but the launcher ended with code 7"), err
    code, last, err = finished(status_job(tmp_path, tmp_path / "run", ["0", "0"],
                                          ["Process 1 exit with status code 3.\n"], rc=0))
    assert (code, err) == (0, "")


def test_stop_signal_decided_from_the_statuses(tmp_path):
    """After SIGTERM, the ranks write that they stopped; the launcher's text claims rank 0 failed with code 2
    and the launcher exits 1: still a clean stop, 75."""
    job = status_job(tmp_path, tmp_path / "run", ["stop", "stop"], ["Process 0 exit with status code 2.\n"])
    wait_for(lambda: all((tmp_path / f"ready{r}").exists() for r in range(2)), 60, "the ranks")
    job.send_signal(signal.SIGTERM)
    code, last, err = finished(job)
    assert (code, last) == (75, "job: stopped by SIGTERM: every rank stopped at the same step, with a checkpoint; "
                                "the same command with --resume auto continues"), err


def test_a_stop_completed_only_while_the_job_is_killed_is_a_kill(tmp_path):
    """Ranks that stop only once the second signal kills the job (as mpirun's SIGCONT before its SIGTERM
    wakes ranks that were stuck) wrote "stopped", but after the kill began: the job was killed."""
    job = status_job(tmp_path, tmp_path / "run", ["late", "late"])
    wait_for(lambda: all((tmp_path / f"ready{r}").exists() for r in range(2)), 60, "the ranks")
    job.send_signal(signal.SIGTERM)
    seen = ""
    while "again kills it now" not in seen:
        seen += job.stderr.readline()
    time.sleep(1.5)
    job.send_signal(signal.SIGTERM)
    code, last, err = finished(job)
    assert (code, last) == (128 + signal.SIGTERM, "job: stopped by SIGTERM: the job was killed before its ranks "
                            "stopped; the same command with --resume auto continues from the last checkpoint "
                            "written, if there is one"), seen + err


def test_without_status_files_the_launcher_text_decides(tmp_path):
    """A run dir that cannot be made (a file stands there): no statuses, and the old way decides."""
    (tmp_path / "file").write_text("x")
    code, last, err = finished(status_job(tmp_path, tmp_path / "file" / "run", ["0", "0"],
                                          ["Process 1 exit with status code 3.\n"], rc=1))
    assert (code, last) == (3, "job: rank 1 exited with code 3"), err
    assert (tmp_path / "file").read_text() == "x"


def test_statuses_leave_nothing_behind_and_stale_ones_are_ignored(tmp_path):
    # a run dir the supervisor made (with its parent) is gone again when nothing else came into it
    finished(status_job(tmp_path, tmp_path / "new" / "run", ["2", "2"]))
    assert not (tmp_path / "new").exists()
    # an existing one keeps what it holds; another job's statuses (a stale one: "stopped") are not read, nor removed
    run = tmp_path / "run"
    stale = run / ".status" / "1-2-old"
    stale.mkdir(parents=True)
    (stale / "rank0.json").write_text(json.dumps({"job": "1-2-old", "rank": 0, "size": 2, "code": 75,
                                                  "cause": "stopped", "time": 0}))
    (run / "metrics.jsonl").write_text("")
    code, last, err = finished(status_job(tmp_path, run, ["3", "1"]))
    assert (code, last) == (3, f"job: rank 0 ({HOST}) exited with code 3 (non_finite: said by rank 0)"), err
    assert sorted(os.listdir(run)) == [".status", "metrics.jsonl"]
    assert os.listdir(run / ".status") == ["1-2-old"]


def test_run_dir_is_read_as_adabatch_train_reads_it():
    assert run_dir_of(["horovodrun", "-np", "2", "/v/bin/adabatch-train", "--run-dir", "runs/x"]) == "runs/x"
    assert run_dir_of(["mpirun", "python", "-m", "adabatch_hvd", "--config", "configs/fashion_mnist.yaml"]) == \
        "runs/fashion_mnist"
    assert run_dir_of(["srun", "adabatch-train", "--config", "configs/fashion_mnist.yaml", "--run-dir", "r"]) == "r"
    for cmd in (["horovodrun", "-np", "2", "python", "worker.py"], ["adabatch-train", "--epochz", "3"],
                ["adabatch-train", "--help"], ["adabatch-train", "--config", "/nonexistent.yaml"]):
        assert run_dir_of(cmd) is None, cmd


# ---- the rank's side: what adabatch-train writes, and that writing never fails an exit ----
@pytest.fixture()
def rank_env(tmp_path, monkeypatch):
    """A rank of job J under a supervisor: RUN/.status/J exists, ADABATCH_JOB_ID=J, HOROVOD_RANK=1 of 2."""
    run = tmp_path / "run"
    (run / ".status" / "J").mkdir(parents=True)
    for var in RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(JOB_VAR, "J")
    monkeypatch.setenv("HOROVOD_RANK", "1")
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    return run


def status_of(run, rank=1):
    return json.loads((run / ".status" / "J" / f"rank{rank}.json").read_text())


def test_recorded_writes_the_rank_status(rank_env):
    @exitstatus.recorded
    def main(argv):
        exitstatus.note(run_dir=str(rank_env), rank=1, size=2, message="no space\nleft")
        return 4

    assert main() == 4
    s = status_of(rank_env)
    assert {k: s[k] for k in ("job", "rank", "size", "code", "cause", "message", "host", "pid")} == \
        {"job": "J", "rank": 1, "size": 2, "code": 4, "cause": "disk_full", "message": "no space left", "host": HOST,
         "pid": os.getpid()}
    assert abs(s["time"] - time.time()) < 60
    assert os.listdir(rank_env / ".status" / "J") == ["rank1.json"]  # atomic: no temp file left

    @exitstatus.recorded
    def crashes(argv):
        exitstatus.note(run_dir=str(rank_env))  # rank and size from HOROVOD_RANK, HOROVOD_SIZE
        raise RuntimeError("a bug. More text")

    with pytest.raises(RuntimeError):
        crashes()
    s = status_of(rank_env)
    assert (s["rank"], s["size"], s["code"], s["cause"], s["message"]) == (1, 2, 1, "crash", "RuntimeError: a bug")


def test_recorded_never_raises_and_creates_nothing(rank_env, monkeypatch, tmp_path):
    from adabatch_hvd import atomic
    from adabatch_hvd.errors import DiskFull

    def full(path, write):
        raise DiskFull(path)

    monkeypatch.setattr(atomic, "atomic_write", full)

    @exitstatus.recorded
    def main(argv):
        exitstatus.note(run_dir=str(rank_env))
        return 0

    assert main() == 0  # a full disk: the clean exit stays clean, no status
    assert os.listdir(rank_env / ".status" / "J") == []
    monkeypatch.undo()
    for run_dir, job in ((tmp_path / "elsewhere", "J"), (rank_env, "K"), (rank_env, "../J")):
        monkeypatch.setenv(JOB_VAR, job)

        @exitstatus.recorded
        def other(argv):
            exitstatus.note(run_dir=str(run_dir))
            return 2

        assert other() == 2
    assert not (tmp_path / "elsewhere").exists()  # no directory made for it: nothing written
    assert sorted(os.listdir(rank_env / ".status")) == ["J"] and os.listdir(rank_env / ".status" / "J") == []
    monkeypatch.delenv(JOB_VAR)  # adabatch-train without a supervisor writes nothing
    assert main() == 0 and os.listdir(rank_env / ".status" / "J") == []


def test_adabatch_train_writes_its_status(rank_env):
    """adabatch-train itself (a schedule mistake, found after the config is read and before Horovod starts)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "adabatch_hvd", "--run-dir", rank_env, "--epochs", "0"], cwd=ROOT,
                          env={k: str(v) for k, v in env.items()}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    s = status_of(rank_env)
    assert (s["rank"], s["size"], s["code"], s["cause"]) == (1, 2, 2, "user_error")
    assert s["message"] == "schedule.epochs must be > 0, got 0"

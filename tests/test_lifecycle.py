"""The life of one run dir as a stateful property test: random sequences of what users and clusters do to
it, with the invariants checked after every operation.

Operations: start, resume, resume auto (each to the end or stopped after a few steps), stop by SIGTERM,
SIGKILL, a second job while one runs, corrupting or deleting a file (the newest checkpoint, the index, the
last line of metrics.jsonl, config.yaml), a full disk, and a resume that changes a setting resume allows
(checkpoint.keep) or refuses (optim.lr). Every operation is the real adabatch-train in a subprocess, on a
small tmpfs of its own (so that it can be filled).

Invariants, after every operation:
- no epoch record is lost or changed (a record may only go where the run went back to an older checkpoint
  because a newer one was damaged by the test, and it comes back the same when that epoch is trained again);
- no checkpoint is lost: each one that existed is still there, or set aside as NAME.bad with its bytes;
- an operation refused with exit 2 changes no file (apart from setting unusable checkpoints aside);
- no process is left, and no lock unless a process was SIGKILLed;
and at the end, resuming to the end gives the weights of the uninterrupted run, bit for bit.

`make test` runs a fixed, derandomized set (LIFECYCLE_EXAMPLES, default 4 sequences of up to 8 operations);
LIFECYCLE_EXAMPLES=N runs N random ones.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from conftest import ROOT, final_weights, hvd_env, processes_with, weight_difference

EXAMPLES = int(os.environ.get("LIFECYCLE_EXAMPLES", "4"))
# 512 samples, epochs 0-1 at batch 16 and epoch 2 at 32: 80 steps, a checkpoint every 4 (keep: none pruned).
ARGS = ["--data", "synthetic", "--synthetic-samples", "512", "--synthetic-shape", "1,8,8", "--model", "mlp",
        "--initial-batch", "16", "--epochs", "3", "--every-steps", "4", "--keep", "1000", "--quiet", "--no-augment",
        "--threads", "1"]
TIMING = ("epoch_seconds", "samples_per_second", "allreduce_wait_share")


def train_cmd(run, *extra):
    return [sys.executable, "-m", "adabatch_hvd", *ARGS, "--run-dir", str(run), *map(str, extra)]


def run_train(run, *extra):
    return subprocess.run(train_cmd(run, *extra), cwd=ROOT, env=hvd_env(), capture_output=True, text=True,
                          timeout=300)


def snapshot(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()} if run.is_dir() else {}


def records(files):
    out = {}
    for line in files.get("metrics.jsonl", b"").decode(errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and isinstance(r.get("epoch"), int):
            out[r["epoch"]] = {k: v for k, v in r.items() if k not in TIMING}
    return out


def checkpoints(files):
    return {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if k.startswith("checkpoints/ckpt-")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("lifecycle-reference") / "run"
    proc = run_train(run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return final_weights(run), records(snapshot(run))


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    mount = tmp_path_factory.mktemp("lifecycle-disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.fail(f"the lifecycle test needs root to mount a small tmpfs: {mounted.stderr.strip()}", pytrace=False)
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


class Lifecycle(RuleBasedStateMachine):
    reference = None  # (weights, records) of the uninterrupted run
    disk = None  # the tmpfs the run dirs are on
    count = 0

    def __init__(self):
        super().__init__()
        Lifecycle.count += 1
        self.run = self.disk / f"run{Lifecycle.count:03d}"
        self.before = {}
        self.killed = False  # a SIGKILL may leave a lock behind (the next start takes it over)
        self.went_back = None  # the epoch a resume went back to, when the test damaged a newer checkpoint
        self.damaged = False  # the test damaged a checkpoint or deleted one: records past the fallback may go

    # ---- helpers ----
    def _check(self, proc, allowed):
        assert proc.returncode in allowed, (proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        if proc.returncode == 2:  # refused: only unusable checkpoints set aside (NAME.bad, same bytes)
            after = snapshot(self.run)
            for name in {k for k in set(after) | set(self.before) if after.get(k) != self.before.get(k)}:
                if ".pt.bad" in name:
                    assert after[name] in self.before.values(), name
                elif name.startswith("checkpoints/ckpt-"):
                    assert name not in after and any(k.startswith(name + ".bad") for k in after), name
                else:  # the index follows; a dead job's lock is taken over, then given back
                    assert name in ("checkpoints/index.json", ".lock"), name
        for line in proc.stderr.splitlines():
            if "resuming from" in line and "epoch" in line:
                self.went_back = int(line.split(": epoch ")[1].split(",")[0])

    def _background(self):
        """A job (resume auto) caught mid-run: SIGSTOPped once it has saved a checkpoint (None: it ended first)."""
        names = lambda: set(p.name for p in (self.run / "checkpoints").glob("ckpt-*.pt"))  # noqa: E731
        seen = names()
        proc = subprocess.Popen(train_cmd(self.run, "--resume", "auto"), cwd=ROOT, env=hvd_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            if names() - seen:
                proc.send_signal(signal.SIGSTOP)
                return proc
            time.sleep(0.005)
        self._check(subprocess.CompletedProcess(proc.args, proc.returncode, *proc.communicate()), {0, 2, 4})
        return None

    def _end(self, proc, how):
        proc.send_signal(how)
        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    # ---- operations ----
    @rule(steps=st.sampled_from([0, 3, 30]))
    def start(self, steps):
        self._check(run_train(self.run, "--stop-after-steps", steps), {0, 2, 4})

    @rule(mode=st.sampled_from(["--resume", "auto"]), steps=st.sampled_from([0, 5, 40]))
    def resume(self, mode, steps):
        extra = ["--resume"] if mode == "--resume" else ["--resume", "auto"]
        self._check(run_train(self.run, *extra, "--stop-after-steps", steps), {0, 2, 4})

    @rule(how=st.sampled_from(["SIGTERM", "SIGKILL"]))
    def stop_by_signal(self, how):
        proc = self._background()
        if proc is None:
            return
        done = self._end(proc, getattr(signal, how))
        if how == "SIGTERM":
            # Under load the SIGSTOP can land after the last step (a short epoch goes on while the new checkpoint is
            # noticed): then the run has ended normally, and said where its files are.
            ended = done.returncode == 0 and "stopped on request" not in done.stderr and "| checkpoints: " in done.stderr
            assert ended or (done.returncode == 75 and "stopped on request (SIGTERM)" in done.stderr), \
                done.stderr[-3000:]
        else:
            self.killed = True

    @rule()
    def second_job(self):
        first = self._background()
        if first is None:
            return
        try:
            self.before = snapshot(self.run)
            second = run_train(self.run, "--resume", "auto")
            assert second.returncode == 2 and f"is in use by another job (host " in second.stderr, second.stderr
            self._check(second, {2})
        finally:
            done = self._end(first, signal.SIGTERM)
        assert done.returncode == 75, done.stderr[-3000:]

    @rule(what=st.sampled_from(["newest checkpoint", "index", "last record", "config", "all checkpoints"]))
    def damage(self, what):
        ckpts = sorted((self.run / "checkpoints").glob("ckpt-*.pt")) if self.run.is_dir() else []
        if what == "newest checkpoint" and ckpts:
            max(ckpts, key=lambda p: p.name).write_bytes(b"garbage")
            self.damaged = True
        elif what == "all checkpoints" and ckpts:
            for p in ckpts:
                p.unlink()
            self.damaged = True
        elif what == "index":
            (self.run / "checkpoints" / "index.json").unlink(missing_ok=True)
        elif what == "last record" and (self.run / "metrics.jsonl").exists():
            text = (self.run / "metrics.jsonl").read_text()
            (self.run / "metrics.jsonl").write_text(text[: max(0, len(text) - 40)])
            self.damaged = True  # the cut record is restored from a checkpoint, or retrained
        elif what == "config":
            (self.run / "config.yaml").unlink(missing_ok=True)
        self.before = snapshot(self.run)

    @rule()
    def full_disk(self):
        filler = self.disk / "filler"
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True)
        try:
            self._check(run_train(self.run, "--resume", "auto"), {0, 2, 4})
        finally:
            filler.unlink()

    def has_checkpoint(self):
        return bool(list((self.run / "checkpoints").glob("ckpt-*.pt")))

    @precondition(has_checkpoint)
    @rule(setting=st.sampled_from([("--keep", "500"), ("--lr", "0.1")]))
    def change_setting(self, setting):
        proc = run_train(self.run, "--resume", "auto", *setting, "--stop-after-steps", 6)
        self._check(proc, {0, 2, 4})
        assert setting[0] == "--keep" or proc.returncode == 2, proc.stderr[-3000:]

    # ---- invariants ----
    @invariant()
    def nothing_lost(self):
        after = snapshot(self.run)
        old, new = records(self.before), records(after)
        for epoch, record in old.items():
            if epoch in new:
                assert new[epoch] == record, (epoch, new[epoch], record)
            else:  # only where a resume went back past a checkpoint this test damaged
                assert self.damaged and self.went_back is not None and epoch >= self.went_back, (epoch, self.went_back)
        for name, digest in checkpoints(self.before).items():
            if name in after:
                continue
            bad = [k for k in after if k.startswith(name + ".bad")]
            assert bad and any(hashlib.sha256(after[k]).hexdigest() == digest for k in bad), name
        for epoch, record in new.items():  # deterministic: every record is the uninterrupted run's
            assert record == self.reference[1][epoch], (epoch, record, self.reference[1][epoch])
        self.before = after

    @invariant()
    def no_process_and_no_lock_left(self):
        assert not processes_with(str(self.run))
        assert self.killed or not (self.run / ".lock").exists()
        self.killed = self.killed and (self.run / ".lock").exists()

    def teardown(self):
        if self.run.exists():
            proc = run_train(self.run, "--resume", "auto")
            assert proc.returncode in (0, 2), proc.stderr[-3000:]
            if proc.returncode == 0:
                assert weight_difference(final_weights(self.run), self.reference[0]) == 0.0
            else:
                assert "cannot be continued" in proc.stderr, proc.stderr


def test_run_dir_lifecycle(reference, disk):
    Lifecycle.reference, Lifecycle.disk = reference, disk
    Lifecycle.TestCase.settings = settings(max_examples=EXAMPLES, stateful_step_count=8, deadline=None,
                                           derandomize="LIFECYCLE_EXAMPLES" not in os.environ, database=None,
                                           phases=[Phase.explicit, Phase.generate],  # no shrinking: minutes a step
                                           suppress_health_check=list(HealthCheck))
    Lifecycle.TestCase().runTest()

"""The run directory (rank 0): its checks, metrics.jsonl, config.yaml with its history, and leaving
nothing behind when a run fails before its first step.

    RUN_DIR/metrics.jsonl          one JSON record per finished epoch
    RUN_DIR/config.yaml            the config the run is going on with
    RUN_DIR/config-history.jsonl   one record per resume that changed it: what changed, and where
    RUN_DIR/timing.jsonl           one record per start that trained: where rank 0's time went (phases.py)
    RUN_DIR/train.log, tb/, checkpoints/
"""

from __future__ import annotations

import errno
import json
import logging
import logging.handlers
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write
from .errors import DiskFull, UserError
from .limits import MAX_METRICS_BYTES, read_limited
from .runlock import RunLock

log = logging.getLogger(__name__)

# The run dir's layout (the module docstring); every other module names these files through here.
METRICS, CONFIG, HISTORY, LOG, TB, CHECKPOINTS, TIMING = ("metrics.jsonl", "config.yaml", "config-history.jsonl",
                                                          "train.log", "tb", "checkpoints", "timing.jsonl")


# ---- what a run dir holds, and whether a start may use it -------------------------------------------
@dataclass
class Contents:
    """A run's history in a run dir: epoch records and checkpoints (config.yaml, train.log and tb/
    alone are a start that saved nothing, which a restart repeats)."""

    epochs: list  # the epochs metrics.jsonl has records of
    lines: int  # its non-empty lines, whole records or not
    checkpoints: list  # checkpoint file names, newest first
    bad: list  # checkpoints set aside as unusable (NAME.bad)

    @classmethod
    def read(cls, run_dir: Path) -> "Contents":
        from . import checkpoint  # here, so that reading metrics (adabatch-report) does not import torch

        ckpts = Path(run_dir) / CHECKPOINTS
        bad = sorted(n for n in os.listdir(ckpts) if ".pt.bad" in n) if ckpts.is_dir() else []
        metrics = Path(run_dir) / METRICS
        lines = sum(1 for line in _metrics_text(metrics).splitlines() if line.strip()) if metrics.is_file() else 0
        return cls([r["epoch"] for r in read_metrics(metrics)], lines,
                   [p.name for p in checkpoint.list_checkpoints(ckpts)], bad)

    @property
    def holds_run(self) -> bool:
        return bool(self.lines or self.checkpoints or self.bad)

    def summary(self) -> str:
        parts = []
        if self.epochs:
            epochs = sorted(set(self.epochs))
            parts.append(f"records of epoch{'s' if len(epochs) > 1 else ''} {_spans(epochs)} in {METRICS}")
        if self.lines > len(self.epochs):
            parts.append(f"{self.lines - len(self.epochs)} unreadable line(s) in {METRICS}")
        if self.checkpoints:
            parts.append(f"{len(self.checkpoints)} checkpoint(s), the newest {self.checkpoints[0]}")
        if self.bad:
            parts.append(f"{len(self.bad)} unusable checkpoint(s) set aside as *.bad")
        return ", ".join(parts)


def _spans(numbers: list) -> str:
    """'0-3, 5' for [0, 1, 2, 3, 5]."""
    spans = []
    for n in numbers:
        if spans and spans[-1][1] == n - 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def cannot_continue(run_dir: Path, contents: "Contents | None" = None) -> UserError:
    """What every start mode says about a run dir whose run has no usable checkpoint to go on from."""
    contents = contents or Contents.read(run_dir)
    return UserError(f"run dir {run_dir} holds a run that cannot be continued ({contents.summary()}; no usable "
                     f"checkpoint); to keep it, choose a new --run-dir; to start over in it, move its files away first")


def decide(run_dir: Path, resume):
    """What a start does with the run dir: None (train from scratch), 'latest' or a checkpoint path.

    --resume auto continues when there is a checkpoint and starts when the run dir holds no run;
    no mode ever starts over a run's history (epoch records or checkpoints): that is one UserError.
    """
    from . import checkpoint

    contents = Contents.read(run_dir)
    if resume not in (None, False, True, "latest", "auto"):
        if not Path(resume).exists():
            raise UserError(f"--resume: {resume} does not exist; give a checkpoint file or a directory of them, "
                            f"or --resume alone for the newest in the run dir")
        return resume
    if resume:
        if contents.checkpoints:
            return "latest"
        if contents.holds_run:
            raise cannot_continue(run_dir, contents)
        if resume == "auto":
            if (run_dir / CONFIG).exists():
                log.warning("run dir %s holds a start that saved nothing (no epoch record, no checkpoint): "
                            "starting it over", run_dir)
            return None
        raise UserError(f"--resume: run dir {run_dir} holds no run to continue (no checkpoint in "
                        f"{run_dir / CHECKPOINTS}); start without --resume, or give --resume auto, which starts "
                        f"a new run dir and continues one with a checkpoint")
    if contents.holds_run:
        if not contents.checkpoints or checkpoint.first_usable(run_dir / CHECKPOINTS) is None:
            raise cannot_continue(run_dir, contents)
        raise UserError(f"run dir {run_dir} already holds a run ({contents.summary()}); continue it with --resume "
                        f"(or --resume auto), or choose a new --run-dir")
    return None


def preflight(run_dir: Path) -> None:
    """Find before the first step whatever would make the first log, record or checkpoint write fail."""
    for name in (CHECKPOINTS, TB, f"{TB}/steps"):
        path = run_dir / name
        if path.exists() and not path.is_dir():
            raise UserError(f"run dir {run_dir} holds a file {path} where a directory goes; move it away")
    for name in (METRICS, CONFIG, HISTORY, LOG, f"{CHECKPOINTS}/index.json"):
        path = run_dir / name
        if path.exists() and not path.is_file():
            raise UserError(f"run dir {run_dir} holds {path}, which is not a regular file; move it away")
    for path in [run_dir] + [run_dir / n for n in (CHECKPOINTS, TB, f"{TB}/steps") if (run_dir / n).is_dir()]:
        try:
            fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=path)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
                os.unlink(tmp)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(path) from None
            raise UserError(f"cannot write in {path}: {e.strerror}; choose another run.run_dir") from None


class RunDir:
    """Rank 0's hold on the run dir for one job: its lock, the checks before the first step, and
    undoing a start that fails before it saved anything."""

    def __init__(self, path, token: str):
        self.path = Path(path)
        self.lock = RunLock(self.path, token)
        self.before = None  # what existed before this process claimed the run dir (None: it did not)

    def claim(self, resume):
        """Make the run dir, lock it and check it; return what to resume from (see `decide`)."""
        before = snapshot(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run dir {self.path} is a file; choose another run.run_dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run dir {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise UserError(f"run dir {self.path} is not writable; choose another run.run_dir")
        try:
            self.lock.acquire()
        except BaseException:
            remove_made(self.path, before[0])  # only directories this start made, and only if empty
            raise
        self.before = before
        preflight(self.path)
        return decide(self.path, resume)

    def release(self, undo: bool = False) -> None:
        """End the hold; `undo`: first remove what this start added (it failed before saving anything)."""
        self.lock.stop()
        if undo and self.before is not None:
            discard(self.path, self.before)
        self.lock.release()


def remove_made(path: Path, missing) -> None:
    """Remove the empty directories a start made, from `path` up to `missing` (the topmost it made)."""
    if missing is None:
        return
    path = Path(path).absolute()
    while path != missing.parent and path != path.parent:
        try:
            path.rmdir()
        except OSError:
            break
        path = path.parent


# ---- a run that fails before its first step leaves nothing behind --------------------------------
def snapshot(run_dir) -> tuple:
    """What exists before a run starts: the topmost missing directory on the way to `run_dir`
    (None when it exists) and the names already in it."""
    path, missing = Path(run_dir).absolute(), None
    while not path.exists() and path != path.parent:
        path, missing = path.parent, path
    names = set(os.listdir(run_dir)) if missing is None and Path(run_dir).is_dir() else set()
    return missing, names


def discard(run_dir, before: tuple) -> None:
    """Remove what a failed run created since `snapshot`: the files it added, or the run dir it made
    (and the parents it made, as long as they are empty: another run may have started in one)."""
    missing, names = before
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        return
    added = set(os.listdir(run_dir)) - names
    if added & {METRICS, CHECKPOINTS}:
        return  # it did save something after all (an elastic restart resets the step count)
    if missing is None:
        for name in added:
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    remove_made(run_dir.parent, missing)


# ---- metrics.jsonl ----------------------------------------------------------------------------------
def read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl; a line that is not a JSON record with an integer epoch (a
    crash mid-write leaves a truncated last line) is skipped with a warning."""
    try:
        lines = _metrics_text(path).splitlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or type(record.get("epoch")) is not int:
            log.warning("%s line %d is not a whole epoch record (%r); skipping it", path, number, line[:60])
            continue
        records.append(record)
    return records


def _metrics_text(path: Path) -> str:
    return read_limited(path, MAX_METRICS_BYTES, "metrics file", "far more than a run's epoch records; is it a run "
                        "dir's metrics.jsonl?").decode("utf-8", errors="replace")


def truncate_metrics(path: Path, epoch: int) -> None:
    """Keep the records of epochs before `epoch` (a crash can land between an epoch's record and its
    checkpoint, or in the middle of a line), so the resumed run appends each epoch exactly once."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r["epoch"] < epoch]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if text != _metrics_text(path):
        atomic_write(path, lambda f: f.write(text.encode()))


class Records:
    """metrics.jsonl of a run dir (rank 0): one record per finished epoch, each written exactly once."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / METRICS

    def append(self, record: dict) -> None:
        """Append an epoch's record, replacing one of the same epoch (written before an elastic reset)."""
        truncate_metrics(self.path, record["epoch"])
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def has(self, epoch: int, global_step: int) -> bool:
        """Whether the record of this epoch, ended at this step, is written (matched by epoch and step,
        not by content: a copy restored from another rank has other timings)."""
        return any((r["epoch"], r.get("global_step")) == (epoch, global_step) for r in read_metrics(self.path))

    def resume_at(self, epoch: int, last: dict | None, source) -> None:
        """A resume at the start of `epoch`: drop later records, and restore the last finished epoch's
        record from the checkpoint (`last`) if a crash came between the checkpoint and the record."""
        truncate_metrics(self.path, epoch)
        if last and all(r["epoch"] != last["epoch"] for r in read_metrics(self.path)):
            self.append(last)
            log.warning("%s lacked the record of epoch %d: restored it from checkpoint %s", self.path, last["epoch"],
                        source)


class RunLog:
    """Rank 0's train.log. A start's lines are buffered until it is known that the start trains (a start
    refused, or with nothing to train, leaves the run dir's files as they were), then written out."""

    def __init__(self):
        self.package = logging.getLogger("adabatch_hvd")
        self.buffer, self.file = None, None

    def hold(self) -> None:
        self.buffer = logging.handlers.MemoryHandler(100000, logging.CRITICAL + 1)
        self.package.addHandler(self.buffer)

    def open(self, path: Path | None) -> None:
        """Write to `path` (with the lines held so far); None: drop what was held, write nothing."""
        if path is not None:
            self.file = logging.FileHandler(path)
            self.file.setFormatter(logging.root.handlers[0].formatter if logging.root.handlers else None)
            self.package.addHandler(self.file)
            if self.buffer is not None:
                self.buffer.setTarget(self.file)
                self.buffer.flush()
        if self.buffer is not None:
            self.package.removeHandler(self.buffer)
            self.buffer = None

    def close(self) -> None:
        if self.file is not None:
            self.package.removeHandler(self.file)
            self.file.close()
            self.file = None


# ---- config.yaml and its history -----------------------------------------------------------------
def write_config(run_dir: Path, text: str, changes: dict, at: dict) -> None:
    """Write config.yaml (when it differs) and, for a resume that changed something, a history record."""
    path = run_dir / CONFIG
    data = text.encode()
    same = False
    if path.exists():
        with open(path, "rb") as f:
            same = f.read(len(data) + 1) == data
    if not same:
        atomic_write(path, lambda f: f.write(data))
    if changes:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **at,
                  "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
        with open(run_dir / HISTORY, "a") as f:
            f.write(json.dumps(record) + "\n")

"""The run directory (rank 0): its checks, metrics.jsonl, config.yaml with its history, and leaving
nothing behind when a run fails before its first step.

    RUN_DIR/metrics.jsonl          one JSON record per finished epoch
    RUN_DIR/config.yaml            the config the run is going on with
    RUN_DIR/config-history.jsonl   one record per resume that changed it: what changed, and where
    RUN_DIR/train.log, tb/, checkpoints/
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from .errors import DiskFull, UserError

log = logging.getLogger(__name__)


class _Recorded:
    """A file that remembers its write error: torch.save reports one as an unrelated RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path: Path, write) -> None:
    """Write `path` through `write(binary_file)` into a temp file beside it, fsync, rename, fsync the dir.

    A crash leaves the old file or the new one, never a mix; on a full disk the temp file is
    removed and `DiskFull` is raised.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Recorded(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = (f.error if f is not None else None) or e
        if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def check(run_dir: Path, resume) -> None:
    """The run dir must be writable, and a fresh run must not mix into an earlier run's files."""
    from . import checkpoint  # here, so that reading metrics (adabatch-report) does not import torch

    if not resume and ((run_dir / "metrics.jsonl").exists() or checkpoint.latest(run_dir / "checkpoints")):
        raise UserError(f"run dir {run_dir} already holds a run (metrics.jsonl, checkpoints/); pass --resume "
                        f"to continue it, or choose a new --run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run dir {run_dir} is a file; choose another run.run_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create run dir {run_dir}: {e.strerror}") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UserError(f"run dir {run_dir} is not writable; choose another run.run_dir")


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
    if added & {"metrics.jsonl", "checkpoints"}:
        return  # it did save something after all (an elastic restart resets the step count)
    if missing is None:
        for name in added:
            path = run_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    path = run_dir.parent
    while path != missing.parent and path != path.parent:
        try:
            path.rmdir()
        except OSError:
            break
        path = path.parent


# ---- metrics.jsonl ----------------------------------------------------------------------------------
def read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl; a line that is not a JSON record with an integer epoch (a
    crash mid-write leaves a truncated last line) is skipped with a warning."""
    try:
        lines = Path(path).read_bytes().decode("utf-8", errors="replace").splitlines()
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


def truncate_metrics(path: Path, epoch: int) -> None:
    """Keep the records of epochs before `epoch` (a crash can land between an epoch's record and its
    checkpoint, or in the middle of a line), so the resumed run appends each epoch exactly once."""
    if not path.exists():
        return
    keep = [r for r in read_metrics(path) if r["epoch"] < epoch]
    text = "".join(json.dumps(r) + "\n" for r in keep)
    if text != path.read_text(errors="replace"):
        atomic_write(path, lambda f: f.write(text.encode()))


# ---- config.yaml and its history -----------------------------------------------------------------
def write_config(run_dir: Path, text: str, changes: dict, at: dict) -> None:
    """Write config.yaml (when it differs) and, for a resume that changed something, a history record."""
    path = run_dir / "config.yaml"
    if not path.exists() or path.read_text(errors="replace") != text:
        atomic_write(path, lambda f: f.write(text.encode()))
    if changes:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **at,
                  "changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}}
        with open(run_dir / "config-history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

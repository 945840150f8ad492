"""Atomic, self-describing checkpoints, and a loader that skips a truncated newest file.

Only plain containers, numbers, strings and tensors are stored, so loading works with
`torch.load(weights_only=True)` and never unpickles arbitrary objects.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .errors import UserError

log = logging.getLogger(__name__)
FORMAT = "adabatch-hvd/1"
_NAME = re.compile(r"^ckpt-e(\d+)-s(\d+)\.pt$")


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{global_step:09d}.pt"


def position(path) -> Tuple[int, int]:
    """(epoch, global_step) from a checkpoint's file name."""
    m = _NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"not a checkpoint name: {path}")
    return int(m.group(1)), int(m.group(2))


def list_checkpoints(directory) -> List[Path]:
    """Checkpoints in a directory, newest (highest step) first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(position(p)[1], p) for p in d.iterdir() if _NAME.match(p.name)]
    return [p for _, p in sorted(found, reverse=True)]


def save(state: dict, directory, keep: int) -> Path:
    """Write atomically (temp file in the same dir, fsync, os.replace), then keep the newest `keep`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / checkpoint_name(state["epoch"], state["global_step"])
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(d)[keep:]:
        old.unlink(missing_ok=True)
    return final


def _read(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"not an adabatch-hvd checkpoint (format {state.get('format') if isinstance(state, dict) else type(state).__name__})")
    return state


def load(target, directory=None) -> Tuple[dict, Path]:
    """Load `target` (a file, a directory, or 'latest' meaning `directory`).

    For a directory the newest readable checkpoint wins; a truncated or corrupt newer one is
    reported with a warning and skipped. A file that is given explicitly must be readable.
    """
    path = Path(directory if target in (None, "latest") else target)
    if path.is_file():
        try:
            return _read(path), path
        except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
            raise UserError(f"cannot load checkpoint {path}: {_short(e)}") from None
    candidates = list_checkpoints(path)
    if not candidates:
        raise UserError(f"--resume: no checkpoint found in {path} (expected ckpt-e*-s*.pt files); "
                        f"start without --resume or give a checkpoint path")
    for p in candidates:
        try:
            return _read(p), p
        except Exception as e:  # noqa: BLE001
            log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", p.name, _short(e))
    raise UserError(f"--resume: every checkpoint in {path} is unreadable ({len(candidates)} tried)")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def latest(directory) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[0] if found else None

"""Atomic, self-describing checkpoints, an index of the order they were written, and a loader
that sets aside unusable files and falls back to the previous checkpoint.

Only plain containers, numbers, strings and tensors are stored, so loading works with
`torch.load(weights_only=True)` and never unpickles arbitrary objects.

`checkpoints/index.json` lists the checkpoints this run wrote, in the order they became current
(a save appends; a resume moves the checkpoint it resumed from to the end). `--resume` takes the
last usable one; pruning deletes only files listed there. A file that cannot be read, is not an
adabatch-hvd checkpoint or holds NaN/Inf is renamed to NAME.bad and dropped from the index, never
trusted for its name. Files the index does not list (copied in, or from before the index) are
never deleted; they are only tried, highest step first, when no listed checkpoint is usable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from . import phases
from .errors import UserError, one_line
from .limits import MAX_INDEX_BYTES, read_limited
from .atomic import atomic_write

log = logging.getLogger(__name__)
FORMAT = "adabatch-hvd/1"
INDEX = "index.json"
_NAME = re.compile(r"^ckpt-e(\d+)-s(\d+)\.pt$")


def checkpoint_name(epoch: int, global_step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{global_step:09d}.pt"


def position(path) -> Tuple[int, int]:
    """(epoch, global_step) from a checkpoint's file name."""
    m = _NAME.match(Path(path).name)
    if not m:
        raise ValueError(f"not a checkpoint name: {path}")
    return int(m.group(1)), int(m.group(2))


# ---- the index --------------------------------------------------------------------------------
def _read_index(d: Path) -> Optional[List[str]]:
    """Checkpoint names in the order they became current (oldest first); None without an index."""
    try:
        data = json.loads(read_limited(d / INDEX, MAX_INDEX_BYTES, "checkpoint index", ""))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # UserError (too large) is a ValueError too
        log.warning("checkpoint index %s is unreadable (%s); ordering checkpoints by step", d / INDEX, one_line(e))
        return None
    names = data.get("order") if isinstance(data, dict) else None
    if not isinstance(names, list):
        log.warning("checkpoint index %s has no 'order' list; ordering checkpoints by step", d / INDEX)
        return None
    return [n for n in names if isinstance(n, str) and _NAME.match(n)]


def _write_index(d: Path, names: List[str]) -> None:
    text = json.dumps({"format": FORMAT, "order": names}, indent=1) + "\n"
    atomic_write(d / INDEX, lambda f: f.write(text.encode()))


def list_checkpoints(directory) -> List[Path]:
    """Checkpoints in a directory, newest first: the index's order, then unlisted files by step."""
    d = Path(directory)
    if not d.is_dir():
        return []
    listed = [n for n in (_read_index(d) or []) if (d / n).is_file()]
    others = sorted((n for n in os.listdir(d) if _NAME.match(n) and n not in listed),
                    key=lambda n: position(n)[1], reverse=True)
    return [d / n for n in reversed(listed)] + [d / n for n in others]


def latest(directory) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[0] if found else None


def make_current(path: Path) -> None:
    """Record that a run resumed from `path`: it becomes the newest entry of its directory's index,
    so a later `--resume` continues this history, not one that was abandoned."""
    d = Path(path).parent
    names = _read_index(d) or []
    if names[-1:] != [path.name]:
        _write_index(d, [n for n in names if n != path.name and (d / n).is_file()] + [path.name])


# ---- save and prune ----------------------------------------------------------------------------
@phases.timed("checkpoint")  # summed over the run: RUN_DIR/timing.jsonl
def save(state: dict, directory, keep: int, protect: Optional[Path] = None) -> Path:
    """Write atomically, append to the index, then keep the newest `keep` listed checkpoints.

    Pruning never deletes the file just written, nor `protect` (the checkpoint this run resumed
    from), nor any file the index does not list.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    final = d / checkpoint_name(state["epoch"], state["global_step"])
    atomic_write(final, lambda f: torch.save({"format": FORMAT, **state}, f))
    names = [n for n in (_read_index(d) or []) if n != final.name and (d / n).is_file()] + [final.name]
    _write_index(d, names)
    kept = set(names[-keep:]) | {final.name}
    if protect is not None and Path(protect).parent.resolve() == d.resolve():
        kept.add(Path(protect).name)
    for name in names:
        if name not in kept:
            (d / name).unlink(missing_ok=True)
    if len(kept) < len(names):
        _write_index(d, [n for n in names if n in kept])
    return final


# ---- load --------------------------------------------------------------------------------------
def _read(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        kind = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not an adabatch-hvd checkpoint (format {kind})")
    bad = _first_non_finite({k: state[k] for k in ("model", "optimizer") if k in state})  # what training goes on from
    if bad:
        raise ValueError(f"it holds NaN/Inf values (in {bad})")
    return state


def _first_non_finite(value, where: str = "") -> Optional[str]:
    """The key path of the first floating tensor or float with a NaN/Inf in it, or None."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return where
        if isinstance(value, float) and not math.isfinite(value):
            return where
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{where}[{key!r}]" if where else str(key))
        if found:
            return found
    return None


def _quarantine(path: Path, reason: str) -> None:
    """Rename an unusable checkpoint to NAME.bad (NAME.bad.1, ...) and drop it from the index."""
    target = path.with_name(path.name + ".bad")
    n = 0
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.bad.{n}")
    try:
        os.replace(path, target)
    except OSError as e:
        log.warning("checkpoint %s is unusable (%s) and could not be renamed (%s); skipping it", path, reason,
                    e.strerror)
        return
    names = _read_index(path.parent)
    if names is not None and path.name in names:
        _write_index(path.parent, [n for n in names if n != path.name])
    log.warning("checkpoint %s is unusable (%s); renamed it to %s and trying the previous one", path, reason,
                target.name)


class NoUsableCheckpoint(UserError):
    """A directory's checkpoints were all tried and none can be used (each set aside as NAME.bad)."""


def first_usable(directory) -> Optional[Path]:
    """The checkpoint `load` would take from `directory`, found without setting anything aside."""
    for p in list_checkpoints(directory):
        try:
            _read(p)
            return p
        except Exception:  # noqa: BLE001 - any failure to read means "not usable"
            continue
    return None


def load(target, directory=None) -> Tuple[dict, Path]:
    """Load `target` (a file, a directory, or 'latest' meaning `directory`).

    For a directory the newest usable checkpoint wins (see the module docstring); an unusable
    newer one is set aside with a warning. A file that is given explicitly must be usable.
    """
    path = Path(directory if target in (None, "latest") else target)
    if not path.exists():
        raise UserError(f"--resume: {path} does not exist; give a checkpoint file or a directory of them")
    if not path.is_dir():
        if not path.is_file():
            raise UserError(f"--resume: {path} is not a regular file; give a checkpoint file or a directory of them")
        try:
            return _read(path), path
        except Exception as e:  # noqa: BLE001 - any failure to read means "not usable"
            raise UserError(f"cannot load checkpoint {path}: {one_line(e)}; give an earlier checkpoint "
                            f"(ls {path.parent}) or --resume alone for the newest usable one") from None
    candidates = list_checkpoints(path)
    if not candidates:
        raise UserError(f"--resume: no checkpoint found in directory {path} (expected ckpt-e*-s*.pt files)")
    for p in candidates:
        try:
            return _read(p), p
        except OSError as e:  # the file may be fine and the storage not: leave it where it is
            log.warning("checkpoint %s cannot be read (%s); trying the previous one", p, one_line(e))
        except Exception as e:  # noqa: BLE001
            _quarantine(p, one_line(e))
    raise NoUsableCheckpoint(f"--resume: no usable checkpoint in {path} ({len(candidates)} tried, see the warnings "
                             f"above)")

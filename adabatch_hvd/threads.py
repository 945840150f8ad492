"""How many torch CPU threads a rank uses: run.threads, else OMP_NUM_THREADS, else the usable cores / local ranks.

N ranks on one host that each use every core thrash it (Horovod's CPU examples use 1 thread a rank).
The usable cores are the fewer of the CPU affinity and the CPU quota of the process's cgroup (v2
`cpu.max`, v1 `cpu.cfs_quota_us`/`cpu.cfs_period_us`): a container started with `docker run
--cpus=4`, or a CPU-limited Slurm step, on a large host has its quota's cores, not the host's.
Pure Python; the file-system root is a parameter, so that tests can build a fake tree.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import NamedTuple

from .config import MAX_THREADS

READ_LIMIT = 65536  # bytes read of a /proc or cgroup file: enough for any real one


class Choice(NamedTuple):
    """The thread count, where it came from (for the log), and a warning about a setting ignored."""

    count: int
    source: str
    warning: str | None = None


def _read(path: Path) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(READ_LIMIT)
    except OSError:
        return None


def _whole(text: str) -> int | None:
    """"400000" -> 400000; anything but 1 to 18 ASCII digits (a sign, "max", a huge number) -> None."""
    return int(text) if re.fullmatch(r"[0-9]{1,18}", text) else None


def _cores(quota: int | None, period: int | None) -> float | None:
    return quota / period if quota is not None and period else None


def _v2_quota(d: Path) -> float | None:
    """cpu.max "400000 100000" -> 4.0 cores; "max 100000", missing or malformed -> None."""
    fields = (_read(d / "cpu.max") or "").split()
    return _cores(*map(_whole, fields)) if len(fields) == 2 else None


def _v1_quota(d: Path) -> float | None:
    """cpu.cfs_quota_us / cpu.cfs_period_us in cores; a quota of -1 (none), missing or malformed -> None."""
    return _cores(*(_whole((_read(d / name) or "").strip()) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")))


def cgroup_quota(root: str | os.PathLike = "/") -> float | None:
    """The CPU quota in cores of this process's cgroup, the tightest from it up to the hierarchy's root
    (a parent's limit binds its children too); None when there is none.

    Paths come from /proc/self/cgroup. A directory that is not there (a container without a cgroup
    namespace sees the host's path, with its own cgroup mounted as the root) is skipped.
    """
    root = Path(root)
    base = root / "sys/fs/cgroup"
    found = []
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2; in a hybrid layout mounted at unified/, usually without the cpu controller
            mounts, quota = [base, base / "unified"], _v2_quota
        elif "cpu" in controllers.split(","):
            mounts, quota = [base / controllers, base / "cpu"], _v1_quota
        else:
            continue
        names = [p for p in path.split("/") if p not in ("", ".", "..")]
        for mount in mounts:
            for depth in range(len(names), -1, -1):
                q = quota(mount.joinpath(*names[:depth]))
                if q is not None:
                    found.append(q)
    return min(found) if found else None


def affine_cores() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose(threads: int, local_size: int, environ=None, root: str | os.PathLike = "/",
           affine: int | None = None) -> Choice:
    """The torch threads of each of `local_size` ranks on this host.

    `threads` > 0 (run.threads) wins, then OMP_NUM_THREADS in `environ` (os.environ by default; a
    value that is not an integer in 1..MAX_THREADS is ignored with a warning), then the usable cores
    (see cgroup_quota) // local_size, at least 1.
    """
    environ = os.environ if environ is None else environ
    if threads > 0:
        return Choice(threads, "from run.threads")
    warning = None
    omp = environ.get("OMP_NUM_THREADS")
    if omp is not None:
        value = _whole(omp.strip())
        if value is not None and 1 <= value <= MAX_THREADS:
            return Choice(value, f"from OMP_NUM_THREADS={value}")
        warning = (f"OMP_NUM_THREADS={omp[:40]!r} is not an integer in 1..{MAX_THREADS}; ignored (set it "
                   f"to a thread count per rank, or give --threads)")
    affine = affine_cores() if affine is None else affine
    quota = cgroup_quota(root)
    usable = affine if quota is None else max(1, min(affine, math.ceil(quota)))
    if quota is None:
        cores = _count(usable, "affine core")
    elif usable < affine:
        cores = f"{_count(usable, 'usable core')} (cgroup quota {quota:g} of {affine} affine)"
    else:
        cores = f"{_count(usable, 'affine core')} (cgroup quota {quota:g})"
    return Choice(max(1, usable // local_size), f"default: {cores} / {_count(local_size, 'local rank')}", warning)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

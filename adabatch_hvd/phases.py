"""Where a rank's wall-clock goes outside the training loop: from its process's start to the first
optimizer step, the evaluations, and from the last step to the end of the run.

    phases.mark("horovod init")    # the phase that just ended, at time.time()
    phases.summary()               # {"phases": {name: seconds}, "marks": {name: unix time}, ...}

Rank 0 logs the start-up once its first step is done, and appends the whole record to
RUN_DIR/timing.jsonl (one line per start) when the run ends. The marks are unix times, so a launcher
on another host (same clock) can add what came before the process: ssh, the interpreter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

_marks: dict = {}  # phase name -> unix time of its end, in order
_totals: dict = {}  # repeated phases (the evaluations) -> seconds in all, count


def process_start() -> float:
    """This process's start as a unix time (Linux: /proc; elsewhere this module's import)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks since boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _imported


_imported = time.time()


def mark(name: str, log=None) -> None:
    """The phase `name` ends now (the first mark of a name counts; a later one is ignored). `log`: a
    logger that gets the start-up line when this is the first mark of `name`."""
    if name not in _marks:
        _marks[name] = time.time()
        if log is not None:
            log.info("start-up: %s", startup_line())


def marked(name: str) -> bool:
    return name in _marks


@contextlib.contextmanager
def timed(name: str):
    """A phase that recurs (each epoch's evaluation, each checkpoint): summed, with its count."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        total, count = _totals.get(name, (0.0, 0))
        _totals[name] = (total + time.perf_counter() - t0, count + 1)


def summary() -> dict:
    """The phases in order, each from the previous mark (the first from the process's start)."""
    start = process_start()
    phases, last = {}, start
    for name, t in _marks.items():
        phases[name] = round(t - last, 3)
        last = t
    return {"process_start": round(start, 3), "marks": {k: round(v, 3) for k, v in _marks.items()},
            "phases": phases, "repeated": {k: {"seconds": round(s, 3), "count": n} for k, (s, n) in _totals.items()}}


def record(path, **extra) -> None:
    """Append this start's summary to `path` (timing.jsonl). The run is done by now: a disk that is full
    costs this record and a warning, not the run's exit status."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps({**summary(), **extra}) + "\n")
    except OSError as e:
        logging.getLogger(__name__).warning("%s not written: %s", path, e.strerror or e)


def startup_line() -> str:
    """'7.41 s from the process's start to the end of the first step: imports 2.90, horovod init 0.61, ...'."""
    s = summary()
    upto = list(s["phases"].items())
    total = sum(v for _, v in upto)
    return f"{total:.2f} s from the process's start to the end of its first step: " + \
        ", ".join(f"{k} {v:.2f}" for k, v in upto)

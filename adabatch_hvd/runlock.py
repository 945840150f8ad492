"""One job per run dir: RUN_DIR/.lock names the job that holds it, and a heartbeat keeps it live.

`flock` is not reliable on the shared file systems that multi-node and Slurm jobs write their run
dirs to, so the lock is a file put in place with link(2), which is atomic on NFS and Lustre too.
It holds the holder's host, pid, process start time, start date and job token. Rank 0 touches it
every HEARTBEAT seconds. A lock is stale, and is taken over, when

- its process is gone: the same host (name, boot id and pid namespace) and no process with that pid
  and start time, which is found at once after a SIGKILL or a crash;
- or, from another host, its heartbeat has stopped: the file's mtime has not moved for STALE
  seconds, by the file system's own clock (a host death, a preempted node). A start that finds a
  fresh heartbeat from another host watches it for up to STALE seconds: if it moves, the holder lives.

An elastic job is one job, however its workers change: every worker keeps the job's token, and
whichever process becomes rank 0 after a reset takes the lock over.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import tempfile
import threading
import time
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)

NAME = ".lock"
HEARTBEAT = float(os.environ.get("ADABATCH_LOCK_HEARTBEAT", "5"))  # seconds between touches
STALE = float(os.environ.get("ADABATCH_LOCK_STALE", "30"))  # a heartbeat this old means the holder is gone
MAX_BYTES = 4096  # a lock file is a few hundred bytes; a larger one is not ours


def new_token() -> str:
    return secrets.token_hex(8)


def _host_id() -> str:
    """The kernel's boot id and this process's pid namespace: a pid means the same process only where
    both match (containers on one host, `--network host` ones included, share the boot id and the
    host name, not the pid namespace)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text()[:64].strip() + "/" + os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _start_time(pid: int):
    """The process's start time in clock ticks since boot (tells a reused pid apart), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _me(token: str) -> dict:
    return {"host": socket.gethostname(), "host_id": _host_id(), "pid": os.getpid(),
            "start_time": _start_time(os.getpid()), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": token}


def _read(path: Path):
    """(holder dict, mtime), or None when there is no lock; an unreadable lock is a holder with no fields."""
    try:
        with open(path, "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(data) if len(data) <= MAX_BYTES else None
    except ValueError:
        holder = None
    return (holder if isinstance(holder, dict) else {}), mtime


def _fs_now(directory: Path) -> float:
    """The file system's clock: the mtime of a file just made there (hosts' clocks may disagree)."""
    fd, tmp = tempfile.mkstemp(prefix=".lock-clock-", dir=directory)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(tmp)


def describe(holder: dict) -> str:
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"
            if holder else "an unreadable lock file")


class RunLock:
    """The run dir's lock, held by rank 0 of one job (see the module docstring)."""

    def __init__(self, run_dir, token: str):
        self.path = Path(run_dir) / NAME
        self.token = token
        self._stop = threading.Event()
        self._thread = None

    def _same_host(self, holder: dict) -> bool:
        return holder.get("host") == socket.gethostname() and holder.get("host_id") == _host_id() != ""

    def _dead(self, holder: dict, mtime: float) -> str | None:
        """Why the holder is gone (watching its heartbeat for up to STALE seconds), or None if it lives."""
        if holder and self._same_host(holder):
            pid = holder.get("pid")
            if not isinstance(pid, int) or _start_time(pid) is None or _start_time(pid) != holder.get("start_time"):
                return f"its process {pid} on this host is gone"
            return None
        age = _fs_now(self.path.parent) - mtime
        while age <= STALE:  # another host: alive if the heartbeat moves
            time.sleep(min(1.0, STALE - age + 0.1))
            seen = _read(self.path)
            if seen is None or seen[1] != mtime:
                return None if seen is not None else "it was released"
            age = _fs_now(self.path.parent) - mtime
        return f"its heartbeat stopped {age:.0f} s ago"

    def acquire(self) -> None:
        """Take the lock (or take it over, for this job or from a dead holder); UserError if a live job holds it."""
        for _ in range(5):  # a race with another starter is retried; more than a few means something is wrong
            seen = _read(self.path)
            if seen is None:
                if self._link():
                    break
                continue
            holder, mtime = seen
            if holder.get("token") == self.token:  # this job (an elastic reset gave rank 0 to another process)
                self._replace()
                break
            why = self._dead(holder, mtime)
            if why is None:
                raise UserError(f"run dir {self.path.parent} is in use by another job ({describe(holder)}); wait "
                                f"for it to end, or choose another --run-dir (a dead job's lock is taken over: at "
                                f"once from this host, {STALE:.0f} s after its last heartbeat from another)")
            if self._take_over(holder):
                log.warning("run dir %s: took over the lock of %s (%s)", self.path.parent, describe(holder), why)
                break
        else:
            raise UserError(f"run dir {self.path.parent}: could not take the lock {self.path} (other jobs keep "
                            f"starting on it); start one job per run dir")
        self._start_heartbeat()

    def _write_tmp(self) -> str:
        fd, tmp = tempfile.mkstemp(prefix=".lock-", dir=self.path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(_me(self.token), f)
        return tmp

    def _link(self) -> bool:
        tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _replace(self) -> None:
        os.replace(self._write_tmp(), self.path)

    def _take_over(self, stale: dict) -> bool:
        """Move the stale lock aside (one starter wins the rename), check that it was the one judged, take ours."""
        aside = self.path.with_name(f"{NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = _read(aside)
        if moved is None or moved[0] != stale:  # another starter put a live lock there in the meantime: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return False
        os.unlink(aside)
        return self._link()

    def holds(self) -> bool:
        seen = _read(self.path)
        return seen is not None and seen[0].get("token") == self.token and seen[0].get("pid") == os.getpid()

    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="run-dir-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            try:
                if self.holds():
                    os.utime(self.path)
            except OSError as e:  # a full disk or a lost mount: the next beat tries again
                log.debug("run dir lock heartbeat: %s", e)

    def stop(self) -> None:
        """Stop the heartbeat (the lock stays)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if this process holds it."""
        self.stop()
        try:
            if self.holds():
                self.path.unlink()
        except OSError as e:
            log.warning("could not remove the run dir lock %s (%s); the next start finds it stale", self.path, e)

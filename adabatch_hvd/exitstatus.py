"""How each rank ended, written down for the launcher's supervisor: the job's exit code comes from
these facts, not from the wording of horovodrun's tracebacks and mpirun's banners.

    RUN_DIR/.status/JOB/rank<N>.json, one JSON object per rank:
    {"job": "1718000000-4242-9f3a0c1e", "rank": 1, "size": 2, "host": "node2", "pid": 5151, "code": 2,
     "cause": "user_error", "message": "UserError: ...", "time": 1718000012.25}

`cause` follows from the code adabatch-train returns (errors.EXIT_*): ok 0, lost_peers 1, user_error 2,
non_finite 3, disk_full 4, stopped 75, interrupted 130; crash is an exception that escaped (a bug,
code 1); exit is any other code.

supervise.py (the launcher side) finds RUN_DIR in the command it runs, makes JOB and RUN_DIR/.status/JOB
before the launcher starts, gives JOB to the ranks as ADABATCH_JOB_ID (horovodrun, horovodrun --mpi and
srun pass the environment on; a bare mpirun needs `-x ADABATCH_JOB_ID`), reads the files once the
launcher has ended, and removes them (and the run dir, when it made it and nothing else came into it).
A directory per job, named by its id, keeps a second job started on the same run dir (which its lock
refuses) from mixing its statuses into the first one's, and leaves any stale directory unread.

A rank writes only into that directory when it exists, so that adabatch-train alone writes nothing and
a rank never creates anything in a run dir (a start that fails leaves it as it was). Writing is atomic
and never raises: a full disk does not turn a clean exit into a traceback. A rank that writes nothing
was killed (SIGKILL, the out-of-memory killer, a lost host) or failed before its config was read.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import (EXIT_DISK_FULL, EXIT_INTERRUPTED, EXIT_LOST_PEERS, EXIT_NON_FINITE, EXIT_STOPPED, EXIT_USER,
                     one_line)

JOB_VAR = "ADABATCH_JOB_ID"
DIR = ".status"
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
SIZE_VARS = ("HOROVOD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
CAUSES = {0: "ok", EXIT_LOST_PEERS: "lost_peers", EXIT_USER: "user_error", EXIT_NON_FINITE: "non_finite",
          EXIT_DISK_FULL: "disk_full", EXIT_STOPPED: "stopped", EXIT_INTERRUPTED: "interrupted"}
CRASH = "crash"
MAX_MESSAGE = 500  # characters of the one-line message kept
MAX_FILE = 64 << 10  # bytes read of a status file (one is well under 1 KiB)


# ---- the rank's side ------------------------------------------------------------------------------
_facts: dict = {}  # what adabatch-train learned so far: run_dir, rank, size, message


def note(**facts) -> None:
    """Remember facts for this rank's status: run_dir (once the config is read), rank and size (once
    Horovod runs), message (the one line an error ends with)."""
    _facts.update(facts)


def recorded(main):
    """Wrap adabatch-train's main(argv) -> exit code: on the way out, write this rank's status."""

    @functools.wraps(main)
    def run(argv=None):
        code, cause = 1, CRASH
        try:
            code = main(argv)
            cause = None
            return code
        except SystemExit as e:  # argparse's exit 2, sys.exit(N)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            cause = None
            raise
        except KeyboardInterrupt:
            code, cause = EXIT_INTERRUPTED, None
            raise
        except BaseException as e:
            _facts.setdefault("message", one_line(e))
            raise
        finally:
            write(code, cause)
            _facts.clear()

    return run


def _env_int(names):
    for n in names:
        try:
            return int(os.environ[n])
        except (KeyError, ValueError):
            pass
    return None


def write(code: int, cause: str | None = None) -> None:
    """Write this rank's status where the supervisor made room for it; nothing without one. Never raises."""
    try:
        job, run_dir = os.environ.get(JOB_VAR), _facts.get("run_dir")
        rank = _facts.get("rank", _env_int(RANK_VARS))
        if not job or run_dir is None or rank is None or not _safe_name(job):
            return
        folder = Path(run_dir) / DIR / job
        if not folder.is_dir():
            return
        code = int(code)
        record = {"job": job, "rank": int(rank), "size": _facts.get("size", _env_int(SIZE_VARS)),
                  "host": socket.gethostname(), "pid": os.getpid(), "code": code,
                  "cause": cause or CAUSES.get(code, "exit"),
                  "message": " ".join(str(_facts.get("message", "")).split())[:MAX_MESSAGE], "time": time.time()}
        data = (json.dumps(record) + "\n").encode()
        from .atomic import atomic_write  # (here: the module loads without it on the supervisor's side)

        atomic_write(folder / f"rank{int(rank)}.json", lambda f: f.write(data))
    except Exception:  # a full disk, a run dir gone: the exit code still says it
        pass


def _safe_name(job: str) -> bool:
    return bool(job) and len(job) <= 100 and all(c.isalnum() or c in "-_." for c in job) and job.strip(".")


# ---- the supervisor's side ------------------------------------------------------------------------
@dataclass
class Status:
    """One rank's status file."""

    rank: int
    code: int
    cause: str
    message: str = ""
    host: str = ""
    size: int | None = None
    time: float = 0.0

    def describe(self) -> str:
        """'rank 1 (node2) exited with code 2 (user_error: UserError: ...)'."""
        where = f" ({self.host})" if self.host else ""
        why = f"{self.cause}: {self.message}" if self.message else self.cause
        return f"rank {self.rank}{where} exited with code {self.code} ({why})"


@dataclass
class Outcome:
    """The statuses the ranks of one job wrote."""

    statuses: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.statuses)

    def _first(self, test):
        found = sorted((s for s in self.statuses if test(s)), key=lambda s: (s.time, s.rank))
        return found[0] if found else None

    @property
    def stopped(self):
        """A rank that stopped on request with a checkpoint (it exits 75 only once every rank has)."""
        return self._first(lambda s: s.cause == "stopped")

    @property
    def failed(self):
        """The first rank to fail for a cause of its own (not the loss of its peers, which follows another's)."""
        return self._first(lambda s: s.code != 0 and s.cause not in ("ok", "stopped", "lost_peers"))

    @property
    def lost_peers(self):
        return self._first(lambda s: s.cause == "lost_peers")

    @property
    def size(self):
        sizes = [s.size for s in self.statuses if isinstance(s.size, int) and s.size > 0]
        return max(sizes) if sizes else None

    @property
    def missing(self) -> list:
        """The ranks (of the world size the statuses give) that wrote none: killed, or their host lost."""
        have = {s.rank for s in self.statuses}
        return [r for r in range(self.size or 0) if r not in have]


class Job:
    """The supervisor's status directory for one job: RUN_DIR/.status/JOB."""

    def __init__(self, run_dir: Path, job: str | None = None):
        self.run_dir = Path(run_dir)
        self.job = job or f"{int(time.time())}-{os.getpid()}-{secrets.token_hex(4)}"
        self.folder = self.run_dir / DIR / self.job
        self.made = None  # the topmost directory that prepare() made on the way to the run dir

    @classmethod
    def prepare(cls, cmd, job: str | None = None) -> "Job | None":
        """Make the status directory for the adabatch-train run in launcher command `cmd`; None when
        the command runs none, or its run dir cannot be found or written. Never raises."""
        try:
            run_dir = run_dir_of(cmd)
            if run_dir is None:
                return None
            self = cls(run_dir, job)
        except Exception:
            return None
        try:
            path = self.run_dir.absolute()
            while not path.exists() and path != path.parent:
                path, self.made = path.parent, path
            self.folder.mkdir(parents=True)
            return self
        except Exception:  # a run dir that is a file, not writable: adabatch-train says so itself
            self.remove()
            return None

    def env(self, base=None) -> dict:
        return dict(os.environ if base is None else base, **{JOB_VAR: self.job})

    def read(self) -> Outcome:
        """The statuses of this job's ranks (a file that is not one, or another job's, is left out)."""
        found = {}
        try:
            names = set(os.listdir(self.folder))
        except OSError:
            return Outcome()
        for name in sorted(names, key=lambda n: (len(n), n)):
            if name.startswith("rank") and name.endswith(".json"):
                status = self._load(self.folder / name)
                if status is not None:
                    found[status.rank] = status
        # A file another host wrote may not be listed yet (a network file system caches directories):
        # look up the other ranks of the world size by name.
        for r in range(Outcome(list(found.values())).size or 0):
            if r not in found:
                status = self._load(self.folder / f"rank{r}.json")
                if status is not None:
                    found[r] = status
        return Outcome([found[r] for r in sorted(found)])

    def _load(self, path: Path):
        try:
            with open(path, "rb") as f:
                d = json.loads(f.read(MAX_FILE))
            if d.get("job") != self.job or path.name != f"rank{d['rank']}.json":
                return None
            size = d.get("size")
            return Status(rank=int(d["rank"]), code=int(d["code"]), cause=str(d["cause"]),
                          message=str(d.get("message") or ""), host=str(d.get("host") or ""),
                          size=size if isinstance(size, int) and not isinstance(size, bool) else None,
                          time=float(d.get("time") or 0.0))
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return None

    def remove(self) -> None:
        """Remove this job's statuses, .status when it is empty then, and the run dir with the parents
        that prepare() made, when nothing else came into them. Never raises."""
        from .rundir import remove_made

        shutil.rmtree(self.folder, ignore_errors=True)
        remove_made(self.run_dir / DIR, self.made if self.made is not None else self.run_dir.absolute() / DIR)


def train_args(cmd) -> list | None:
    """The arguments of adabatch-train in a launcher command (`... adabatch-train ARGS` or
    `... python -m adabatch_hvd ARGS`); None when it runs none."""
    cmd = [str(c) for c in cmd]
    for i, c in enumerate(cmd):
        if os.path.basename(c) == "adabatch-train":
            return cmd[i + 1:]
        if c == "-m" and i + 1 < len(cmd) and cmd[i + 1] in ("adabatch_hvd", "adabatch_hvd.cli"):
            return cmd[i + 2:]
    return None


def run_dir_of(cmd) -> str | None:
    """The run dir that the adabatch-train in launcher command `cmd` trains in, read as adabatch-train
    reads it (its flags over its --config); None when there is none or its arguments are wrong."""
    import contextlib
    import io

    args = train_args(cmd)
    if args is None:
        return None
    from . import config

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            parsed = config.parser("adabatch-train", "").parse_args(args)
            return config.from_args(parsed.config, config.overrides(parsed)).run.run_dir
    except (Exception, SystemExit):
        return None

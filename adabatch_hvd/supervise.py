"""Run a launcher command (horovodrun, mpirun, srun) for the launch scripts: a signal stops the whole
job cleanly, nothing of it is left running, and a failed rank ends in one line with that rank's code.

    python -m adabatch_hvd.supervise NAME -- horovodrun -np 2 -H localhost:2 --gloo adabatch-train ...

- The command runs in a session of its own, so a terminal's Ctrl-C or hang-up reaches only this process.
- The first SIGINT, SIGTERM, SIGHUP or SIGUSR1 asks for a clean stop: SIGTERM to the training processes
  below the command on this host. One rank that gets it is enough: every rank stops at the same
  optimizer step, with a checkpoint (signals.py). Where none is found yet (still starting up, or srun's
  tasks, which Slurm starts), the command itself gets SIGUSR1; mpirun and srun pass it on to the ranks.
- A second signal, or ADABATCH_STOP_GRACE seconds (default 120) without the job ending, kills it:
  SIGTERM to the command's session, then SIGKILL to whatever of the job is left 15 s later. A signal
  within a second of the first is the same request delivered twice, and changes nothing: a Ctrl-C
  reaches the whole process group, and a wrapper in it (timeout, for one) passes it on again.
- What of the job still runs on this host when the command has ended is killed (mpirun and its ranks
  outlive `horovodrun --mpi` when it is killed, for instance).
- horovodrun's traceback and mpirun's banners about a rank that exited non-zero become one line.

The decision comes from what the ranks wrote, not from the launcher's wording: when the command runs
adabatch-train, its run dir (read from the training arguments as adabatch-train reads them) gets
RUN_DIR/.status/JOB/ before the command starts, JOB goes to the ranks as ADABATCH_JOB_ID, and each rank
writes there how it ended (rank, host, exit code, cause, message; exitstatus.py). They are read once
the command has ended, and removed. A rank of the job's world size that wrote none was killed
(SIGKILL, the out-of-memory killer, a lost host). Only where no rank wrote one (a command without
adabatch-train, or ranks that died before they read their config) do horovodrun's and mpirun's
reports, which the filter takes out of the output, give the failed rank and its code.

Exit code, after a signal: 75 when the ranks stopped with a checkpoint (a rank's code 75, which it
returns only once the checkpoint is written), 0 when the job had finished anyway, else 128 + the
signal's number (130 for Ctrl-C). Without one, when the command failed: 75 when a rank stopped on a
request of its own with a checkpoint, else the code of the first rank that failed for a cause of its
own (2: bad input, 3: NaN loss, 4: disk full, 1: a crash), else the launcher's code for a rank that
wrote no status (its report of that rank, else the command's), else a lost rank's 1, else the
command's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import psutil

from . import exitstatus
from .errors import EXIT_STOPPED

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
RANK_VARS = exitstatus.RANK_VARS
KILL_AFTER = 15.0  # seconds from the session's SIGTERM to SIGKILL
REPEAT_WINDOW = 1.0  # seconds after the first signal in which another is the same request delivered twice


def job_processes(root: int) -> list:
    """The processes of the session that `root` leads, and everything below `root`, that still run: a zombie
    (exited, its parent gone and init not yet done reaping it; seconds under some container inits) runs
    nothing and is not waited for."""
    found = {}
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == root:
                found[p.pid] = p
        except OSError:
            pass
    try:
        top = psutil.Process(root)
        found[root] = top
        found.update((c.pid, c) for c in top.children(recursive=True))
    except psutil.Error:
        pass
    found.pop(os.getpid(), None)
    return [p for p in found.values() if _running(p)]


def _running(p) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:  # gone
        return False


def _has_rank(p) -> bool:
    try:
        env = p.environ()
    except psutil.Error:
        return False
    return any(v in env for v in RANK_VARS)


def training_processes(root: int) -> list:
    """The ranks of the job on this host: the topmost processes with a rank in their environment (not
    the data-loader workers below them)."""
    procs = job_processes(root)
    ranks = []
    for p in procs:
        try:
            parent = p.parent()
        except psutil.Error:
            continue
        if _has_rank(p) and not (parent and _has_rank(parent)):
            ranks.append(p)
    return ranks


def _signal_all(procs, sig) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


class Filter:
    """Passes the command's stderr on, except horovodrun's traceback and mpirun's banners about a rank
    that exited non-zero; remembers that rank and its exit code instead (and srun's, from its line)."""

    GLOO = "Horovod detected that one or more processes exited with non-zero status"
    MPI = ("exited with non-zero status", "Primary job  terminated normally", "mpirun noticed that process",
           "an MPI process is aborting", "MPI_ABORT was invoked")

    def __init__(self, out):
        self.out, self.block, self.kind = out, [], None
        self.rank = self.code = None

    def feed(self, line: str) -> None:
        bare = line.rstrip("\n")
        if self.kind is None:
            self._srun_report(bare)
            if bare == "Traceback (most recent call last):":
                self.kind, self.block = "traceback", [line]
            elif re.fullmatch(r"-{20,}", bare):
                self.kind, self.block = "banner", [line]
            elif not (self._details(bare) or self._gloo_report(bare) or not bare):
                self.out.write(line)  # (horovodrun's own blank lines are dropped; ranks' lines are prefixed)
            return
        self.block.append(line)
        if self.kind == "traceback" and bare and not bare.startswith((" ", "\t")):
            if self.GLOO in bare:
                self.kind = "details"  # "Process name: 1" and "Exit code: 75" follow
            else:
                self._flush()
        elif self.kind == "details":
            if not self._details(bare):
                self._flush(keep=False)
                self.feed(line)
        elif self.kind == "banner" and re.fullmatch(r"-{20,}", bare) and len(self.block) > 1:
            text = "".join(self.block)
            if any(m in text for m in self.MPI):
                for b in self.block:
                    self._details(b.strip())
                self._flush(keep=False)
            else:
                self._flush()

    def _gloo_report(self, bare: str) -> bool:
        """horovodrun's "Process 1 exit with status code 75." and "Terminating remaining workers ..."."""
        m = re.fullmatch(r"Process (\d+) exit with status code (\d+)\.", bare)
        if m and m.group(2) != "0" and self.code is None:
            self.rank, self.code = m.group(1), int(m.group(2))
        return bool(m) or bare.startswith("Terminating remaining workers after failure of Process")

    def _srun_report(self, bare: str) -> None:
        """srun's "srun: error: node1: task 1: Exited with exit code 75" (passed on as it is)."""
        m = re.fullmatch(r"srun: error: \S+: tasks? ([\d,-]+): Exited with exit code (\d+)", bare)
        if m and self.code is None:
            self.rank, self.code = m.group(1), int(m.group(2))

    def _details(self, bare: str) -> bool:
        m = re.match(r"\s*(Process name|Exit code):\s*(.*)", bare)
        if not m:
            return False
        if m.group(1) == "Exit code":
            self.code = self.code if self.code is not None else int(m.group(2).split()[0])
        else:
            mpi = re.search(r"\[\[\d+,\d+\],(\d+)\]", m.group(2))
            self.rank = self.rank if self.rank is not None else (mpi.group(1) if mpi else m.group(2).strip())
        return True

    def _flush(self, keep: bool = True) -> None:
        if keep:
            self.out.write("".join(self.block))
        self.block, self.kind = [], None

    def close(self) -> None:
        if self.kind in ("traceback", "banner"):
            self._flush()
        self.block, self.kind = [], None
        self.out.flush()


class Supervisor:
    def __init__(self, name: str, cmd: list):
        self.name, self.cmd = name, cmd
        self.stop_signal = self.signalled_at = None
        self.deadline = None  # when to escalate: the grace period, then the kill
        self.killing = False  # signal handlers and the wait loop both run in the main thread: no lock
        self.killed_at = None  # time.time() of the kill (a second signal, or the grace period's end)

    def say(self, text: str) -> None:
        print(f"{self.name}: {text}", file=sys.stderr, flush=True)

    def run(self) -> int:
        self.status = exitstatus.Job.prepare(self.cmd)  # None: no adabatch-train run dir in the command
        try:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         start_new_session=True, bufsize=0,
                                         env=self.status.env() if self.status else None)
        except OSError as e:
            self.say(f"cannot run {self.cmd[0]}: {e.strerror}")
            if self.status:
                self.status.remove()
            return 127
        for s in STOP_SIGNALS:
            signal.signal(s, self._on_signal)
        filt = Filter(sys.stderr)
        reader = threading.Thread(target=self._pump, args=(filt,), daemon=True)
        reader.start()
        while True:
            try:
                rc = self.proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                self._escalate_if_due()
        reader.join(10)
        filt.close()
        left = job_processes(self.proc.pid)
        end = time.monotonic() + 5  # helpers (multiprocessing's resource tracker) exit right after
        while left and time.monotonic() < end:
            time.sleep(0.1)
            left = job_processes(self.proc.pid)
        if left:
            _signal_all(left, signal.SIGKILL)
            self.say(f"killed {len(left)} process(es) of the job still running after it ended: "
                     f"{', '.join(sorted({_name(p) for p in left}))}")
        rc = 128 - rc if rc < 0 else rc
        facts = exitstatus.Outcome()
        if self.status:
            facts = self.status.read()
            self.status.remove()
        if self.stop_signal is not None:
            return self._stopped(rc, filt, facts)
        if rc == 0:
            return 0
        code, line = self._failure(rc, filt, facts)
        if line:
            self.say(line)
        return code

    @staticmethod
    def _failure(rc: int, filt: Filter, facts: exitstatus.Outcome):
        """(exit code, line) for a command that ended with `rc` != 0: from the ranks' statuses, or,
        where there are none, from the launcher's report that the filter found (else its code alone)."""
        if not facts:
            if filt.code is not None:
                return filt.code, f"rank {filt.rank} exited with code {filt.code}"
            return rc, None
        first = facts.stopped or facts.failed
        if first:
            return first.code, first.describe()
        missing = facts.missing
        if missing:
            # The ranks' statuses say who ended without one; only the number is the launcher's (the
            # code it reports for that rank, e.g. 255 for a lost host, else its own).
            code = filt.code if filt.code is not None and str(filt.rank) in map(str, missing) else rc
            many = len(missing) > 1
            return code, (f"rank{'s' if many else ''} {', '.join(map(str, missing))} ended without writing "
                          f"{'their' if many else 'its'} exit status: killed (SIGKILL, the out-of-memory killer) "
                          f"or {'their hosts' if many else 'its host'} lost; the launcher ended with code {code}")
        if facts.lost_peers:
            return facts.lost_peers.code, facts.lost_peers.describe()
        return rc, f"every rank exited with code 0, but the launcher ended with code {rc}"

    def _stopped(self, rc: int, filt: Filter, facts: exitstatus.Outcome) -> int:
        """The line and exit code after a stop signal, from what the ranks did rather than what was asked.

        A rank exits 75 only after the stop's checkpoint is written and every rank has passed the
        barrier behind it, so one rank's 75 (its status; without statuses, horovodrun's report; or
        mpirun's and srun's own exit code) means every rank stopped there, even if a repeated signal
        killed the rest afterwards.
        """
        name = self.stop_signal.name
        if facts:
            # A stop that a rank completed only once the job was being killed (mpirun, for one, wakes
            # stopped ranks with SIGCONT before its SIGTERM) does not count: the job was killed.
            stop = facts.stopped
            told = stop is not None and (self.killed_at is None or stop.time <= self.killed_at)
        else:
            told = filt.code == EXIT_STOPPED
        if told or rc == EXIT_STOPPED:
            self.say(f"stopped by {name}: every rank stopped at the same step, with a checkpoint; the same "
                     f"command with --resume auto continues")
            return EXIT_STOPPED
        if rc == 0:
            self.say(f"{name} came as the job finished: nothing was stopped")
            return 0
        failed = (facts.failed or facts.lost_peers) if facts else None
        if self.killing:
            how = "the job was killed before its ranks stopped"
        elif failed is not None:
            how = f"{failed.describe()} before the ranks stopped together"
        elif facts and facts.missing:
            how = f"rank {facts.missing[0]} was killed before the ranks stopped together"
        elif filt.code is not None and not facts:
            how = f"rank {filt.rank} exited with code {filt.code} before the ranks stopped together"
        else:
            how = f"the job ended with code {rc} before its ranks stopped together"
        self.say(f"stopped by {name}: {how}; the same command with --resume auto continues from the last "
                 f"checkpoint written, if there is one")
        return 128 + self.stop_signal

    def _pump(self, filt: Filter) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            filt.feed(raw.decode(errors="replace"))
            sys.stderr.flush()

    def _on_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:
            if time.monotonic() - self.signalled_at >= REPEAT_WINDOW:
                self._kill()
            return
        self.stop_signal, self.signalled_at = signal.Signals(signum), time.monotonic()
        name = self.stop_signal.name
        ranks = training_processes(self.proc.pid)
        if ranks:
            self.say(f"{name}: the job stops at its next step, with a checkpoint ({name} again kills it now)")
            _signal_all(ranks, signal.SIGTERM)
        else:
            self.say(f"{name}: stopping the job ({name} again kills it now)")
            _signal_all([psutil.Process(self.proc.pid)], signal.SIGUSR1)
        self.deadline = time.monotonic() + float(os.environ.get("ADABATCH_STOP_GRACE", "120"))

    def _escalate_if_due(self) -> None:
        if self.deadline is None or time.monotonic() < self.deadline:
            return
        if self.killing:
            _signal_all(job_processes(self.proc.pid), signal.SIGKILL)
            self.deadline = None
        else:
            self.say("the job did not stop in time; killing it")
            self._kill()

    def _kill(self) -> None:
        if not self.killing:
            self.killing, self.killed_at = True, time.time()
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except OSError:
                pass
            _signal_all(training_processes(self.proc.pid), signal.SIGTERM)
            self.deadline = time.monotonic() + KILL_AFTER
        else:
            _signal_all(job_processes(self.proc.pid), signal.SIGKILL)


def _name(p) -> str:
    try:
        return p.name()
    except psutil.Error:
        return str(p.pid)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m adabatch_hvd.supervise NAME -- COMMAND...", file=sys.stderr)
        return 2
    return Supervisor(argv[0], argv[2:]).run()


if __name__ == "__main__":
    sys.exit(main())

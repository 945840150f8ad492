"""Stop requests: SIGTERM or SIGUSR1 asks a run to stop cleanly, agreed by every rank at a step boundary.

Slurm sends these before a time limit or a preemption (`sbatch --signal`), schedulers and `kill`
send SIGTERM, and the launch scripts pass Ctrl-C on as SIGTERM. adabatch-train installs the handler
before anything else (`install`), so a signal during set-up stops the run at its first step; only one
that arrives while the interpreter itself starts (tens of milliseconds) ends the process with the
signal's default action. The handler only sets a flag; every optimizer step adds up the ranks' flags
in the step's own gradient exchange (accumulation.py), so a signal that reached a single rank (on any
host) stops all of them at the same step, and no step pays a round trip of its own for it. The trainer then writes a checkpoint and the process exits with
errors.EXIT_STOPPED (75); the same command with `--resume auto` continues exactly there.
"""

from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received = None  # the first stop signal's name in this process


def _handle(signum, frame) -> None:
    global _received
    if _received is None:
        _received = signal.Signals(signum).name


def install() -> None:
    """Catch the stop signals for the rest of the process (a launcher's SIGTERM while it exits changes nothing)."""
    for s in SIGNALS:
        signal.signal(s, _handle)


class StopRequest:
    """The flag the signal handlers set, and the collective that makes every rank agree on it."""

    def __init__(self):
        import torch

        from . import dist

        install()
        self._dist, self._torch = dist, torch
        self.agreed = False

    @property
    def received(self):
        return _received

    def flag(self):
        """This rank's flag, to be summed over the ranks with a step's gradients (Accumulator.step's scalars)."""
        return self._torch.tensor([0.0 if _received is None else 1.0])

    def agree(self, summed) -> bool:
        """True on every rank once the summed flags show that any rank received a stop signal."""
        self.agreed = self.agreed or summed[0].item() > 0
        return self.agreed

    def check(self) -> bool:
        """The same agreement as a collective of its own (call on all ranks); for where no step is taken."""
        if not self.agreed:
            self.agree(self._dist.allreduce_sum(self.flag(), name="stop_request"))
        return self.agreed

"""Stop requests: SIGTERM or SIGUSR1 asks a run to stop cleanly, agreed by every rank at a step boundary.

Slurm sends these before a time limit or a preemption (`sbatch --signal`), schedulers and `kill`
send SIGTERM, and the launch scripts pass Ctrl-C on as SIGTERM. The handler only sets a flag; after
each optimizer step every rank adds up the flags with one tiny allreduce, so a signal that reached a
single rank (on any host) stops all of them at the same step. The trainer then writes a checkpoint and
the process exits with errors.EXIT_STOPPED (75); the same command with `--resume auto` continues exactly there.
"""

from __future__ import annotations

import signal

import torch

from . import dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The flag the signal handlers set, and the collective that makes every rank agree on it."""

    def __init__(self):
        self.received = None  # the first signal's name on this rank
        self.agreed = False
        for s in SIGNALS:  # for the rest of the process: a launcher's SIGTERM while it exits changes nothing
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def check(self) -> bool:
        """True on every rank once any rank has received a stop signal (a collective: call on all ranks)."""
        if not self.agreed:
            flag = torch.tensor([0.0 if self.received is None else 1.0])
            self.agreed = dist.allreduce_sum(flag, name="stop_request").item() > 0
        return self.agreed

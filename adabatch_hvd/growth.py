"""schedule.mode=noise: the batch grows when the measured gradient noise scale says it pays.

The noise scale B_noise (noise.py) is measured every step in every mode. In mode noise it is checked
at every quarter of an epoch (fixed sample offsets, the same on every rank and after any resume):
a check passes when the estimator has seen at least `noise_half_life` samples and the smoothed
B_noise is at least `noise_multiple` times the next global batch. At the end of an epoch whose last
`noise_checks` checks all passed, the batch grows by `growth_factor` from the next epoch on (never
beyond max_batch, never shrinking), and the LR scales with the batch by the same rule as a timetable's
while its step decay comes every `interval` epochs, as the timetable's and the fixed baseline's do
(Schedule.decays): a noise-driven run and a timetable run differ only in *when* they grow.

Rank 0 decides and broadcasts, so every rank takes the same decision even on mixed hardware. Each
decision is a record in the train state (checkpoints, elastic commits): a resume replays the
recorded decisions (Schedule.grow_at) and never recomputes them; the streak of passed checks is in
the state too, so a stop in the middle of a decision window resumes exactly.
"""

from __future__ import annotations

import logging

from . import dist
from .schedule import CHECKS_PER_EPOCH, Schedule

log = logging.getLogger(__name__)


def replay(base: Schedule, decisions: list) -> Schedule:
    """The schedule with the recorded decisions applied (the base itself outside mode noise)."""
    for d in decisions:
        base = base.grow_at(d["epoch"])
    return base


def check_offsets(n: int) -> list:
    """The sample offsets of an epoch of `n` samples at which the noise scale is checked."""
    return [-(-q * n // CHECKS_PER_EPOCH) for q in range(1, CHECKS_PER_EPOCH + 1)]


class Growth:
    """The checks and decisions of mode noise; does nothing in the other modes."""

    def __init__(self, base: Schedule, n_train: int):
        self.base, self.n_train = base, n_train
        self.active = base.mode == "noise"
        self.offsets = check_offsets(n_train)

    def after_step(self, state, schedule: Schedule, start: int, end: int) -> None:
        """A step trained samples [start, end) of the epoch: run the checks whose offsets it crossed."""
        if not self.active:
            return
        for offset in self.offsets:
            if start < offset <= end:
                state.noise_streak = state.noise_streak + 1 if self.passes(state, schedule) else 0

    def passes(self, state, schedule: Schedule) -> bool:
        nxt = state.epoch + 1
        if not schedule.can_grow(nxt) or state.noise.samples < self.base.noise_half_life:
            return False
        b_noise = state.noise.b_noise
        return b_noise is not None and b_noise >= self.base.noise_multiple * schedule.grow_at(nxt).global_batch(nxt)

    def at_epoch_end(self, state, schedule: Schedule, main: bool) -> dict | None:
        """The end of epoch `state.epoch`: grow from the next epoch on if the checks say so. Returns the
        decision (also appended to state.growth), or None."""
        if not self.active:
            return None
        nxt = state.epoch + 1
        grow = main and state.noise_streak >= self.base.noise_checks and schedule.can_grow(nxt)
        if not dist.broadcast_object(grow, name="noise_growth"):
            return None
        grown = schedule.grow_at(nxt)
        decision = {"epoch": nxt, "global_step": state.global_step, "samples_seen": state.noise.samples,
                    "b_noise": state.noise.b_noise, "checks": state.noise_streak,
                    "from_batch": schedule.global_batch(state.epoch), "to_batch": grown.global_batch(nxt),
                    "lr": grown.lr_at(nxt)}
        decision = dist.broadcast_object(decision, name="noise_growth_decision")  # rank 0's numbers everywhere
        state.growth.append(decision)
        state.noise_streak = 0
        if main:
            log.info("noise scale %.1f >= %g x %d for %d checks: the global batch grows %d -> %d from epoch %d "
                     "(step %d), lr %.5g", decision["b_noise"], self.base.noise_multiple, decision["to_batch"],
                     decision["checks"], decision["from_batch"], decision["to_batch"], nxt, decision["global_step"],
                     decision["lr"])
        return decision

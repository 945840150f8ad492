"""schedule.max_micro_batch = auto: a micro-batch chosen per stage for speed, bounded by memory.

Composer's automatic micro-batching takes the largest micro-batch that fits. On a CPU, or on a GPU
with a small model, a smaller one can be faster (benchmarks/RESULTS.md (a) shows the curve bending).
So at the start of each stage a few divisors of the per-worker batch are each timed over a few real
optimizer steps, and the fastest one that fitted is kept. Nothing is wasted on the probe: the update
does not depend on how the batch is split. A CUDA out-of-memory error during a step halves the
micro-batch and the step is redone (accumulation.py); from then on only sizes up to half of the one
that ran out are tried.

Pure Python: every rank calls the same methods at the same steps, so they switch candidates in
step; the trainer gathers the timings, rank 0 decides and broadcasts the choice.
"""

from __future__ import annotations

import statistics

from .errors import UserError
from .schedule import _divisors


def candidates(per_worker: int, below: int | None = None, count: int = 4) -> list:
    """Divisors of `per_worker` to try, largest first: each at most half the one before, all under `below`.
    Found in at most 2^20 steps for any batch up to schedule.MAX_BATCH (2^40), not by counting down."""
    out = []
    for d in _divisors(per_worker, per_worker if below is None else below - 1):
        if not out or 2 * d <= out[-1]:
            out.append(d)
            if len(out) == count:
                break
    return out


class MicroBatchTuner:
    """The per-stage choice, and the probe in progress; `state_dict` holds what a resume keeps."""

    def __init__(self, probe_steps: int = 3, warmup_steps: int = 1):
        self.probe_steps, self.warmup_steps = probe_steps, warmup_steps
        self.chosen = {}  # "stage:per_worker_batch" -> micro-batch
        self.tried = {}  # "stage:per_worker_batch" -> {micro-batch: slowest rank's seconds per sample}
        self.too_big = None  # the smallest micro-batch that ran out of memory (in any stage: same model)
        self.probe = None  # {"key", "per_worker", "sizes", "index", "steps", "seconds": {size: [s/sample]}}

    @staticmethod
    def key(stage: int, per_worker: int) -> str:
        # The per-worker batch is part of the key: after a world-size change the choice no longer applies.
        return f"{stage}:{per_worker}"

    def size(self, stage: int, per_worker: int) -> int:
        """The micro-batch for the next step of this stage (starting a probe if the stage has no choice)."""
        key = self.key(stage, per_worker)
        if key in self.chosen:
            return self.chosen[key]
        if self.probe is None or self.probe["key"] != key:
            sizes = candidates(per_worker, self._limit())
            if not sizes:
                raise UserError(f"no micro-batch of the per-worker batch {per_worker} fits in memory "
                                f"(micro-batch {self.too_big} ran out); use a smaller model or more memory")
            self.probe = {"key": key, "per_worker": per_worker, "sizes": sizes, "index": 0, "steps": 0,
                          "seconds": {}}
        p = self.probe
        return p["sizes"][p["index"]]

    @property
    def probing(self) -> bool:
        return self.probe is not None

    def record(self, seconds_per_sample: float) -> bool:
        """Count one step of the size under probe; True once every candidate has been timed."""
        p = self.probe
        size = p["sizes"][p["index"]]
        p["steps"] += 1
        if p["steps"] > self.warmup_steps:
            p["seconds"].setdefault(size, []).append(seconds_per_sample)
        if p["steps"] == self.warmup_steps + self.probe_steps:
            p["index"], p["steps"] = p["index"] + 1, 0
        return p["index"] == len(p["sizes"])

    def timings(self) -> dict:
        """This rank's median seconds per sample of every size timed in the current probe."""
        return {size: statistics.median(s) for size, s in self.probe["seconds"].items()} if self.probe else {}

    @staticmethod
    def slowest(timings_of_ranks: list) -> dict:
        """{size: the slowest rank's seconds per sample} (a step waits for the slowest rank), largest size first."""
        sizes = set.intersection(*(set(t) for t in timings_of_ranks))
        return {m: max(t[m] for t in timings_of_ranks) for m in sorted(sizes, reverse=True)}

    @staticmethod
    def decide(slowest: dict) -> int:
        """The fastest size (the larger one on a tie)."""
        return min(slowest, key=lambda m: (slowest[m], -m))

    def choose(self, size: int, tried: dict) -> None:
        """Keep `size` for the stage under probe (every rank, with rank 0's decision and what it was based on)."""
        self.chosen[self.probe["key"]], self.tried[self.probe["key"]] = size, tried
        self.probe = None

    def out_of_memory(self, stage: int, per_worker: int, size: int) -> int:
        """A step at `size` ran out of memory: from now on only sizes up to half of it. Returns the size to
        redo the step with: the stage's choice halved, or the first candidate of a probe started over."""
        self.too_big = size if self.too_big is None else min(self.too_big, size)
        key = self.key(stage, per_worker)
        if key in self.chosen:
            self.chosen[key] = (candidates(per_worker, self._limit(), count=1) or [None])[0]
            if self.chosen[key] is None:
                del self.chosen[key]  # size() says why nothing fits
        self.probe = None
        return self.size(stage, per_worker)

    def _limit(self):
        """Candidates must be below this: at most half the smallest size that ran out of memory."""
        return None if self.too_big is None else self.too_big // 2 + 1

    def state_dict(self) -> dict:
        return {"chosen": dict(self.chosen), "tried": dict(self.tried), "too_big": self.too_big}

    def load_state_dict(self, state: dict) -> None:
        self.chosen, self.tried = dict(state.get("chosen", {})), dict(state.get("tried", {}))
        self.too_big = state.get("too_big")
        self.probe = None

"""The steps of an epoch on this rank: which samples, in which micro-batches, and one optimizer step each.

A step's samples come from the epoch's permutation (sampler.py), its micro-batch size from the plan
or, with schedule.max_micro_batch=auto, from the tuner (microbatch.py), which this module feeds
with timings and asks again after an out-of-memory error. The optimizer step itself, with its
gradient allreduce, is accumulation.py's.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import torch

from . import dist, phases, sampler
from .errors import NonFiniteLoss
from .microbatch import MicroBatchTuner

log = logging.getLogger(__name__)

@dataclass
class Step:
    """One optimizer step of this rank: the global step's place, its micro-batch size, this rank's
    sample ids, and its micro-batches (loaded lazily)."""

    step: sampler.Step
    size: int
    samples: list
    micro: object


@dataclass
class Result:
    loss: float  # the step's mean loss over this rank's samples
    sums: torch.Tensor  # this rank's (loss_sum, correct, count, sample digest), float64
    flags: torch.Tensor | None  # the step's scalars summed over all ranks


class Stepper:
    """Runs the epoch's steps for one rank; `bind` after every change of world."""

    def __init__(self, cfg, train_set, n_train: int, acc, state, device, ckpt_dir):
        self.cfg, self.train_set, self.n_train = cfg, train_set, n_train
        self.acc, self.state, self.device, self.ckpt_dir = acc, state, device, ckpt_dir
        self.auto = cfg.schedule.max_micro_batch == "auto"
        self.rank, self.world, self.monitor = 0, 1, None

    def bind(self, rank: int, world: int, monitor) -> None:
        self.rank, self.world, self.monitor = rank, world, monitor

    def micro_batch(self, plan) -> int:
        return self.state.micro.size(plan.stage, plan.per_worker_batch) if self.auto else plan.micro_batch

    def accum_steps(self, plan) -> int:
        return -(-plan.per_worker_batch // self.micro_batch(plan)) if self.auto else plan.accum_steps

    def remaining(self, plan):
        """The epoch's remaining steps. When the micro-batch size changes, or a step is to be redone,
        the rest is split anew."""
        n, st = self.n_train, self.state
        order = sampler.permutation(n, self.cfg.run.seed, st.epoch)
        while st.offset < n:
            size = self.micro_batch(plan)
            steps = sampler.steps(n, plan.global_batch, self.world, st.offset)
            shares = [sampler.micro_batches(sampler.rank_slice(s, self.world, self.rank), size) for s in steps]
            batches = self.train_set.iterate([[order[i] for i in m] for share in shares for m in share], st.epoch,
                                             self.cfg.data.workers)
            for step, share in zip(steps, shares):
                yield Step(step, size, [order[i] for m in share for i in m], (
                    to_device(batch, self.device) for batch in itertools.islice(batches, len(share))))
                if st.offset != step.start + step.size or self.micro_batch(plan) != size:
                    break

    def run(self, plan, item: Step, lr: float, scalars: torch.Tensor | None) -> Result | None:
        """One optimizer step at `lr`, with `scalars` summed over the ranks in its exchange. None: a rank
        ran out of memory and nothing was updated; the caller's `remaining` redoes the step smaller."""
        for group in self.acc.optimizer.param_groups:
            group["lr"] = lr
        measure = self.state.global_step % self.cfg.schedule.noise_every == 0  # the same on every rank and resume
        result = self.acc.step(item.micro, item.step.size, sampler.passes_per_step(item.step, self.world, item.size),
                               scalars, measure)
        if result is None:
            self._out_of_memory(plan, item.size)
            return None
        loss_sum, correct, count, flags = result
        if self.acc.skipped and self.rank == 0:  # fp16: the same step on every rank (the averaged gradients)
            log.info("fp16: inf/NaN in the gradients of step %d (epoch %d): skipped, loss scale now %g (%d "
                     "skipped in this process)", self.state.global_step, self.state.epoch, self.acc.scaler.get_scale(),
                     self.acc.skipped_steps)
        if self.acc.noise_inputs is not None:  # the same allreduced numbers on every rank: the same estimate
            self.state.noise.update(*self.acc.noise_inputs)
        elif not self.acc.skipped:  # unmeasured: the next estimate stands for these samples too
            self.state.noise.skip(item.step.size)
        loss = float(loss_sum) / max(count, 1)
        if not math.isfinite(loss):
            st = self.state
            raise NonFiniteLoss(f"training loss is {loss} at epoch {st.epoch}, step {st.global_step} "
                                f"(lr {lr:.4g}, global batch {plan.global_batch}); lower the learning rate "
                                f"(optim.lr={self.cfg.optim.lr}) or lengthen the warmup; the last good checkpoint "
                                f"in {self.ckpt_dir} is kept")
        digest = sampler.sample_digest(item.samples, self.state.epoch)
        sums = torch.tensor([float(loss_sum), float(correct), float(count), digest], dtype=torch.float64)
        return Result(loss, sums, flags)

    def tune(self, plan, seconds: float, size: int) -> None:
        """schedule.max_micro_batch=auto: time the candidate; once all are timed, all ranks pick one."""
        if self.auto and self.state.micro.probing and self.state.micro.record(seconds / size):
            slowest = MicroBatchTuner.slowest(dist.allgather_object(self.state.micro.timings(),
                                                                    name="micro_batch_timings"))
            choice = dist.broadcast_object(MicroBatchTuner.decide(slowest) if self.rank == 0 else None,
                                           name="micro_batch_choice")
            self.state.micro.choose(choice, slowest)
            self.monitor.micro_batch_choice(plan, slowest, choice)

    def _out_of_memory(self, plan, size: int) -> None:
        smaller = self.state.micro.out_of_memory(plan.stage, plan.per_worker_batch, size)
        if self.rank == 0:
            log.warning("out of memory at micro-batch %d (stage %d, %d per worker): the step is redone with "
                        "micro-batch %d", size, plan.stage, plan.per_worker_batch, smaller)

    def tried(self, plan) -> dict | None:
        """What the stage's micro-batch was chosen from (auto), for the epoch's record."""
        tried = self.state.micro.tried.get(MicroBatchTuner.key(plan.stage, plan.per_worker_batch))
        return {str(m): t for m, t in tried.items()} if self.auto and tried else None


def to_device(batch, device: torch.device):
    """A CPU batch on `device`, for training and evaluation alike. On CUDA each tensor is pinned first (a no-op for
    a DataLoader's pinned batch), so that its copy is asynchronous and the next batch is prepared meanwhile; on the
    CPU the batch itself comes back."""
    if device.type != "cuda":
        return batch
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)


@phases.timed("evaluation")  # summed over the run: RUN_DIR/timing.jsonl
@torch.no_grad()
def evaluate(model, test_set, n_test: int, rank: int, world: int, eval_batch: int, workers: int, device):
    """Test loss and accuracy from allreduced sums over every test sample exactly once."""
    model.eval()
    mine = list(range(rank, n_test, world))
    chunks = [mine[i : i + eval_batch] for i in range(0, len(mine), eval_batch)]
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for batch in test_set.iterate(chunks, 0, workers):
        x, y = to_device(batch, device)
        out = model(x)
        sums[0] += torch.nn.functional.cross_entropy(out, y, reduction="sum").double()
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
    loss_sum, correct, count = dist.allreduce_sum(sums.cpu(), name="eval_sums").tolist()
    return loss_sum / count, correct / count

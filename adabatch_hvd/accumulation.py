"""One optimizer step over micro-batches with one Horovod allreduce per parameter.

Horovod's DistributedOptimizer counts backward passes per gradient and starts the allreduce on the
k-th (k = backward_passes_per_step), averaging over ranks but never dividing by k. So each
micro-batch's mean loss is scaled by n_micro * world / step_size: summed over micro-batches and
averaged over ranks, the update is then exactly the gradient of the mean loss over the step's
global batch, also for a short last step or ranks with unequal shares.
BatchNorm breaks this exactness: it normalizes each micro-batch, not the global batch.

With `oom_guard` (schedule.max_micro_batch = auto on CUDA), a CUDA out-of-memory error on any rank
makes every rank drop the step: the allreduces some ranks already started are completed and thrown
away, nothing is updated, and the caller redoes the step with smaller micro-batches. The update
does not depend on the split, so the redone step is the one that would have been taken.

Per-step scalars that every rank needs summed (the stop flag; see signals.py) ride on the step's own
exchange: their allreduce is started right after the backward passes, while the last gradients are
still in flight, with the gradients' op and dtype (an average of float32), so that Horovod negotiates
it in the same cycle and fuses it into their buffer; it is waited for after `optimizer.step()` and
scaled back to a sum. No step pays a round trip of its own for them.

Mixed precision (`precision` bf16 or fp16): each micro-batch's forward pass and loss run under
autocast (the model's device type; the weights, gradients and optimizer state stay float32).
fp16 also has a `torch.amp.GradScaler`: every micro-batch's loss is scaled before its backward
pass; after the last one the allreduces are completed once (`optimizer.synchronize()`), the
gradients unscaled and checked for inf/NaN, and the step taken under `skip_synchronize()`, or
skipped. The check sees the *averaged* gradients, identical on every rank (an inf on one rank is an
inf or NaN in the average everywhere), so every rank skips the same steps and backs off to the same
scale: the ranks stay in lockstep. fp32 runs exactly the code it ran before there was a choice.

The gradient noise scale (`noise`, see noise.py): on a measured step (`measure`; the trainer measures every
schedule.noise_every-th) a tensor hook per parameter takes each backward pass's squared gradient norm before
it is accumulated (and before Horovod's hook starts the allreduce); the step's three small-batch numbers ride
on the same exchange as the scalars, and the averaged gradient's norm is taken after the step.
`noise_inputs` then holds what `NoiseScale.update` takes, or None (not measured, or an fp16 step skipped).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable, Tuple

import torch

from . import dist
from .noise import PassNorms, grad_sqr_norm, local_estimate_inputs, small_stats

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32: no autocast


class Accumulator:
    """Runs optimizer steps made of micro-batches; owns the optimizer's backward_passes_per_step."""

    def __init__(self, model: torch.nn.Module, optimizer, world_size: int, loss_fn: Callable = None,
                 oom_guard: bool = False, precision: str = "fp32", noise: bool = False, fuse: bool = True):
        """`noise`: measure the gradient noise scale's inputs every step; `fuse`: the step's scalars ride on the
        gradients' exchange (else they get a blocking allreduce of their own after the step: elastic runs)."""
        self.model = model
        self.optimizer = optimizer  # a horovod DistributedOptimizer (or a plain one for size 1)
        self.world_size = world_size
        self.loss_fn = loss_fn or torch.nn.functional.cross_entropy
        self.passes = getattr(optimizer, "backward_passes_per_step", 1)
        self.sync_seconds = 0.0  # time of the last optimizer.step(): waiting for the allreduces
        self.oom_guard = oom_guard  # agree on out-of-memory errors after the backward passes (one small allreduce)
        self.precision = precision
        device_type = next(model.parameters(), torch.empty(0)).device.type
        dtype = AUTOCAST_DTYPES.get(precision)
        self.autocast = (lambda: torch.autocast(device_type, dtype=dtype)) if dtype else contextlib.nullcontext
        # fp16 only; its state (scale, growth tracker) is checkpointed and committed with the train state
        self.scaler = torch.amp.GradScaler(device_type) if precision == "fp16" else None
        self.skipped = False  # fp16: the last step found inf/NaN gradients and updated nothing
        self.skipped_steps = 0  # ... how many steps this process skipped
        self.fuse = fuse
        self.norms = PassNorms(model.parameters()) if noise else None
        self.noise_inputs = None  # the last step's (small_sqr_sum, count, b_small, big_sqr, b_big), or None

    def set_passes(self, passes: int) -> None:
        """Change k; only called between steps, where Horovod's counters may be reset."""
        if passes != self.passes and hasattr(self.optimizer, "set_backward_passes_per_step"):
            self.optimizer.set_backward_passes_per_step(passes)
        self.passes = passes

    def step(self, micro_batches: Iterable[Tuple[torch.Tensor, torch.Tensor]], step_size: int, passes: int,
             scalars: torch.Tensor | None = None, measure: bool = True):
        """Forward/backward every micro-batch of this rank, then one optimizer step.

        Returns (loss_sum, correct, count, summed) over this rank's samples; the first two stay detached
        tensors on the model's device (no .item() per micro-step, which would sync a GPU); `summed` is
        `scalars` (a small float32 CPU tensor) summed over all ranks with the step's gradients, or None.
        `measure` (with `noise`): take this step's noise-scale inputs; every rank must pass the same value (an
        unmeasured step sends zeros in their place, so the exchange keeps its size) and the hooks then do nothing.
        Returns None, on every rank, when a rank ran out of memory under `oom_guard`: nothing was
        updated, and the scalars were not exchanged.
        """
        self.set_passes(passes)
        self.model.train()
        self.noise_inputs = None
        if self.norms is not None:
            self.norms.clear()
            self.norms.enabled = measure
        out_of_memory = False
        try:
            loss_sum, correct, count, sizes = self._backward(micro_batches, step_size)
        except torch.cuda.OutOfMemoryError:
            if not self.oom_guard:
                raise
            out_of_memory = True
        if self.oom_guard and dist.allreduce_sum(torch.tensor([float(out_of_memory)]), name="out_of_memory").item():
            dist.discard_gradients(self.optimizer)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        n_scalars = 0 if scalars is None else len(scalars)
        if self.norms is not None:  # this rank's [sum |g_m|^2, sum 1/b_m, count] join the scalars
            local = local_estimate_inputs(self.norms.take(), sizes, step_size, self.world_size,
                                          None if self.scaler is None else self.scaler._scale) if measure else \
                torch.zeros(3, dtype=torch.float32)
            scalars = local if scalars is None else torch.cat([scalars.to(local.device, torch.float32), local])
        handle = None
        if scalars is not None and self.fuse:
            handle = dist.allreduce_mean_async(scalars.float(), name="step_scalars")
        t0 = time.perf_counter()
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.skipped = dist.scaled_step(self.optimizer, self.scaler)
            self.skipped_steps += self.skipped
        if scalars is None:
            summed = None
        elif self.fuse:
            summed = dist.wait(handle) * self.world_size
        else:
            summed = dist.allreduce_sum(scalars.float(), name="step_scalars")
        self.sync_seconds = time.perf_counter() - t0
        if self.norms is not None:
            if measure and not self.skipped:
                big = grad_sqr_norm(self.model.parameters())  # the averaged (fp16: unscaled) gradient
                self.noise_inputs = (*small_stats(summed[n_scalars:]), big, step_size)
            summed = summed[:n_scalars] if n_scalars else None
        self.optimizer.zero_grad()
        return loss_sum, correct, count, summed

    def _backward(self, micro_batches, step_size: int):
        # A function of its own, so that an exception frees the micro-batch's activations with its frame.
        loss_sum, correct, count, sizes = 0.0, 0, 0, []
        for x, y in micro_batches:
            with self.autocast():
                out = self.model(x)
                loss = self.loss_fn(out, y)
            scaled = loss * (len(y) * self.world_size / step_size)
            (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
            loss_sum = loss_sum + loss.detach().double() * len(y)
            correct = correct + (out.argmax(1) == y).sum()
            count += len(y)
            sizes.append(len(y))
        if count == 0:
            # A rank with no samples in this step (a tiny tail after a world-size change) still
            # has to join every allreduce: contribute zero gradients.
            (sum(p.sum() for p in self.model.parameters()) * 0.0).backward()
        return loss_sum, correct, count, sizes

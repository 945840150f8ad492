"""The gradient noise scale B_noise = tr(Σ)/|G|² (McCandlish et al., arXiv 1812.06162), measured while training.

G is the true (expected) gradient of the per-sample loss and Σ the covariance of one sample's gradient, so the mean
gradient g_B of a batch of B independent samples has E|g_B|² = |G|² + tr(Σ)/B. Two batch sizes give two equations:

    |G|²  ≈ (B_big·|g_big|² − B_small·|g_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

both unbiased (each is a linear combination of unbiased moments). Their ratio is not, so each is smoothed on its own
(`NoiseScale`) and only the smoothed values are divided. Everything here is per sample: |G|² and tr(Σ) do not depend on
the batch, the world size or the micro-batch, so the state carries over when any of them changes.

Several small batches. |g_small|² is the mean over `count` small batches i of |g_i|², the squared norm of *that batch's
mean gradient*. With sizes B_i its expectation is |G|² + tr(Σ)·mean(1/B_i), so B_small is the *harmonic* mean
count / Σ 1/B_i: exact for unequal sizes (shares that differ by a sample, a short last step), equal to B_i when all
are equal. (The arithmetic mean B_a would scale tr(Σ) up by (1/B_small − 1/B_big)/(1/B_a − 1/B_big).) Nothing is
estimated when B_small equals B_big: one worker with no accumulation gives no second batch size (`estimate` returns
None).

How it maps onto this package's step (accumulation.py), for rank r of W, micro-batch m of b_m samples, global step
batch S (`step_size`), per-sample gradients g_i and fp16 loss scale s (1 without a GradScaler):

* Each micro-batch's *mean* loss is multiplied by b_m·W/S (and by s), so its backward pass produces
      h_m = s·(W/S)·Σ_{i∈m} g_i = s·(W·b_m/S)·ḡ_m          (ḡ_m: the micro-batch's mean gradient)
* p.grad accumulates the passes: the local gradient before the allreduce is
      L_r = Σ_m h_m = s·(W/S)·Σ_{i∈share r} g_i = s·(W·n_r/S)·ḡ_r,
  a scaled *sum*: W·n_r/S times the share's mean gradient, which is the mean itself only when n_r = S/W.
  But Horovod starts the in-place allreduce of p.grad inside the k-th backward pass, so L_r is never available whole.
* Horovod averages over ranks (never dividing by k): p.grad after the step is s·(1/S)·Σ_all g_i = s·ḡ_S, and
  GradScaler.unscale_ (dist.scaled_step) removes the s in place. So

      B_big = S,   |g_big|² = |p.grad|² after optimizer.step() (fp16: already unscaled), before zero_grad().

* The small batches are the micro-batches, one per backward pass, taken by `PassNorms`: a tensor hook on each
  parameter sees the pass's own gradient h_m before it is accumulated into p.grad, and so before Horovod's hook (a
  post-hook of the same AccumulateGrad node) can start the allreduce. (AdaptDL does the same.) Hence

      |ḡ_m|² = |h_m|² · (S / (W·b_m))² / s²,   B_small = harmonic mean of all ranks' b_m,  count = Σ_r (passes of r)

  `local_estimate_inputs(PassNorms.take(), sizes, S, W, s)` computes this rank's [Σ_m |ḡ_m|², Σ_m 1/b_m, count]
  as a float32 tensor of 3 on the gradients' device, without a sync; summed over ranks (they can ride on the step's
  scalars, Accumulator.step: its allreduce is started right after the backward passes) they give `small_stats`:
  (small_sqr_sum, count, B_small). A rank with no samples (its dummy zero pass) contributes zeros. Accumulator's
  scalars are a float32 CPU tensor: on a GPU, `local.cpu()` waits for the backward passes (or keep them on the GPU).

  Integration, per optimizer step:
      norms = PassNorms(model.parameters())            # once
      ... the micro-batches' backward passes (sizes b_m) ...
      local = local_estimate_inputs(norms.take(), sizes, step_size, world, scaler._scale if fp16 else None)
      ... (local rides with the step's scalars; summed = the sum over ranks) ... optimizer.step() ...
      big = grad_sqr_norm(model.parameters())          # after the step, before zero_grad
      if not skipped: noise.update(*small_stats(summed), big, step_size)
  A dropped step (out of memory) must `norms.clear()`. Take `scaler._scale` before `scaler.update()` changes it;
  `local_estimate_inputs` enqueues its division at once, so calling it before the step is enough.

  With W = 1 and k = 1 there is no estimate; W = 1 and k ≥ 2 gives one from the micro-batches alone.

Caveats: BatchNorm makes a sample's gradient depend on its micro-batch, and the samples of one epoch are drawn without
replacement, so the model of independent samples holds only approximately (the latter is negligible for S ≪ the data
set). Weight decay added inside the optimizer is not in p.grad, so G here is the loss's gradient alone. Every rank gets
the same allreduced sums and the same averaged gradients, so every rank computes the same estimate on identical
hardware; a schedule should still decide from rank 0's value, broadcast, to be safe on mixed hardware.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

DEFAULT_HALF_LIFE = 50_000  # samples


def _grads(tensors) -> list:
    """The gradients of parameters (those that have one), or the tensors themselves."""
    out = []
    for t in tensors:
        if isinstance(t, torch.nn.Parameter) or (t.requires_grad and t.is_leaf):
            if t.grad is not None:
                out.append(t.grad.detach())
        else:
            out.append(t.detach())
    return out


def _scale_sqr(loss_scale, device) -> torch.Tensor:
    """s² as a 0-d float32 tensor (a GradScaler's `_scale` has shape (1,)); no sync."""
    return torch.as_tensor(loss_scale, dtype=torch.float32).to(device).reshape(()).square()


def grad_sqr_norm(tensors: Iterable[torch.Tensor], loss_scale=None) -> torch.Tensor:
    """Σ |t|² over the gradients of `tensors` (parameters: their .grad; other tensors: themselves), in float32.

    One fused op (torch._foreach_norm) over all of them, returned as a 0-d float32 tensor on their device, without a
    .item(), so a GPU does not sync: put it into a small tensor that rides on an allreduce, or convert it later.
    `loss_scale` s (a float or a tensor, e.g. a GradScaler's `_scale`): the gradients were taken of a loss scaled by
    s, so the result is divided by s². After GradScaler.unscale_ the gradients are unscaled already: pass None.
    """
    grads = _grads(tensors)
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = grads[0].device
    norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
    total = torch.stack([n.to(device) for n in norms]).square().sum()
    if loss_scale is not None:
        total = total / _scale_sqr(loss_scale, device)
    return total


class PassNorms:
    """Squared gradient norms of each backward pass on its own, before they are accumulated into p.grad.

    A tensor hook per parameter takes the norm of the pass's incoming gradient (it runs before AccumulateGrad, and so
    before Horovod's post-hook can start the in-place allreduce); at the end of the pass (an autograd engine
    callback) the parameters' norms are combined into one 0-d float32 tensor. No sync. `take()` returns the passes
    since the last take, in order; their sizes are the caller's business (`local_estimate_inputs`).

    Cost: one small reduction per parameter and pass, plus one stack at the end of the pass. Every backward pass
    through the parameters counts, torch.autograd.grad included; set `enabled = False` around passes that are not
    micro-batches of a step. `remove()` takes the hooks off.
    """

    def __init__(self, params: Iterable[torch.Tensor]):
        self._parts = []  # this pass's per-parameter norms
        self._passes = []  # one 0-d tensor per finished pass
        self.enabled = True
        self._handles = [p.register_hook(self._hook) for p in params if p.requires_grad]

    def _hook(self, grad):
        if not self.enabled:
            return None
        if not self._parts:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)
        self._parts.append(torch.linalg.vector_norm(grad.detach(), dtype=torch.float32))
        return None

    def _end_pass(self):
        if not self._parts:  # cleared during the pass
            return
        device = self._parts[0].device
        self._passes.append(torch.stack([n.to(device) for n in self._parts]).square().sum())
        self._parts = []

    def take(self) -> list:
        """The squared norms of the backward passes since the last take (or clear), oldest first."""
        passes, self._passes = self._passes, []
        return passes

    def clear(self) -> None:
        """Forget the recorded passes, also a pass cut short by an exception (call it when a step is dropped)."""
        self._passes, self._parts = [], []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def local_estimate_inputs(pass_sqr_norms: Sequence[torch.Tensor], sizes: Sequence[int], step_size: int,
                          world_size: int, loss_scale=None) -> torch.Tensor:
    """This rank's part of the small-batch statistics, float32 [Σ_m |ḡ_m|², Σ_m 1/b_m, count], no sync.

    `pass_sqr_norms`: |h_m|² of each backward pass m (PassNorms.take()); `sizes`: the passes' micro-batch sizes
    b_m; the loss of pass m was its mean loss times b_m·world_size/step_size (accumulation.py), times `loss_scale`
    s under fp16 (a float, or the GradScaler's `_scale` tensor taken before the scaler's update). Then the mean
    gradient of micro-batch m has |ḡ_m|² = |h_m|²·(step_size/(world_size·b_m))²/s². Sum the result over ranks and
    pass it to `small_stats`. A rank with no samples (sizes empty; its one zero pass is ignored) gives zeros.
    """
    sizes = [int(b) for b in sizes]
    device = pass_sqr_norms[0].device if len(pass_sqr_norms) else torch.device("cpu")
    if not sizes:
        return torch.zeros(3, dtype=torch.float32, device=device)
    if len(pass_sqr_norms) != len(sizes):
        raise ValueError(f"{len(pass_sqr_norms)} backward passes recorded for {len(sizes)} micro-batches")
    if min(sizes) <= 0:
        raise ValueError(f"micro-batch sizes must be positive: {sizes}")
    factors = torch.tensor([(step_size / (world_size * b)) ** 2 for b in sizes], dtype=torch.float32)
    sqr = (torch.stack([n.to(device, torch.float32) for n in pass_sqr_norms]) * factors.to(device)).sum()
    if loss_scale is not None:
        sqr = sqr / _scale_sqr(loss_scale, device)
    rest = torch.tensor([sum(1.0 / b for b in sizes), float(len(sizes))], dtype=torch.float32, device=device)
    return torch.cat([sqr.reshape(1), rest])


def small_stats(summed) -> tuple:
    """(small_sqr_sum, count, b_small) from the sum over ranks of `local_estimate_inputs`:
    b_small = count / Σ 1/b (the harmonic mean of the small batches' sizes; None when there are none)."""
    sqr, inv, count = (float(v) for v in (summed.tolist() if hasattr(summed, "tolist") else summed))
    return sqr, count, (count / inv if inv > 0 else None)


def estimate(small_sqr_sum, small_count, b_small, big_sqr, b_big):
    """One step's unbiased estimates (|G|², tr(Σ)), per sample, or None when there are none.

    `small_sqr_sum`: Σ_i |g_i|² over `small_count` small batches, g_i each batch's *mean* gradient; `b_small`: their
    size (the harmonic mean count/Σ1/B_i when sizes differ, see the module docstring); `big_sqr`: |g_big|², the squared
    norm of the mean gradient over all b_big samples. None when b_small equals b_big (one worker, no accumulation:
    the two batches are the same), when there is no small batch, or when an input is not finite (an fp16 overflow).
    The estimates can be negative on a single step; only their averages are meaningful.
    """
    small_count = float(small_count)
    if not small_count or b_small is None or not b_big:
        return None
    small_sqr_sum, b_small, big_sqr, b_big = float(small_sqr_sum), float(b_small), float(big_sqr), float(b_big)
    if not all(math.isfinite(v) for v in (small_sqr_sum, small_count, b_small, big_sqr, b_big)):
        return None
    inv_small, inv_big = 1.0 / b_small, 1.0 / b_big
    if math.isclose(inv_small, inv_big, rel_tol=1e-5):  # float32 sums of 1/b_m carry ~1e-7 of rounding
        return None
    small_sqr = small_sqr_sum / small_count
    grad_sqr = (inv_small * big_sqr - inv_big * small_sqr) / (inv_small - inv_big)  # = (Bb·big − Bs·small)/(Bb − Bs)
    variance = (small_sqr - big_sqr) / (inv_small - inv_big)
    return grad_sqr, variance


class NoiseScale:
    """Smoothed |G|² and tr(Σ) (per sample) and their ratio B_noise = tr(Σ)/|G|².

    Each of the two estimates has its own exponential moving average, with one decay per *sample*: a step of B_big
    samples multiplies the old averages by 0.5 ** (B_big / half_life), so the window covers the same amount of data
    whatever the batch, the world size or the accumulation (a doubling of the batch halves the steps per window), and a
    step weighs in proportion to its samples. The default half-life, 50,000 samples, is about an epoch of
    CIFAR-10 or Fashion-MNIST: about 390 steps at a batch of 128, 49 at 1024; keep it well above the largest global
    batch (a step of B_big ≥ half_life keeps less than half of the old average). Like Adam's, the averages are
    bias-corrected: divided by the total weight 1 − Π decay, so from the first step they are weighted means of the
    estimates seen, not pulled towards zero.

    The state is plain Python floats and ints (`state_dict`), exact through JSON, pickle and broadcast_object;
    `samples` counts the samples the averages stand for and `steps` the estimates in them (steps without an
    estimate are not counted; unmeasured steps' samples wait in `pending` for the next estimate).
    """

    def __init__(self, half_life: float = DEFAULT_HALF_LIFE):
        if not half_life > 0:
            raise ValueError(f"half_life must be a positive number of samples, not {half_life}")
        self.half_life = float(half_life)
        self.grad_sqr_avg = 0.0  # biased (not yet corrected) averages
        self.variance_avg = 0.0
        self.weight = 0.0  # 1 − Π decay: the bias correction
        self.samples = 0
        self.steps = 0
        self.pending = 0  # samples of the steps trained since the last estimate, not measured (`skip`)

    def skip(self, samples: int) -> None:
        """A step of `samples` samples trained without a measurement (only every N-th step is measured): the next
        estimate stands for them too."""
        self.pending += int(samples)

    def update(self, small_sqr_sum, small_count, b_small, big_sqr, b_big):
        """Fold in one optimizer step (arguments as `estimate`); returns the step's raw (|G|², tr(Σ)), or None,
        in which case only `pending` changed (as for `skip`). Converts its arguments to Python floats (for
        tensors: one sync).

        The estimate stands for its own b_big samples and the `pending` ones of the unmeasured steps before it: the
        old averages decay by 0.5 ** (covered / half_life) and the estimate takes the rest of the weight, so
        measuring one step in N keeps the window at the same number of samples (each estimate then weighs N
        steps' worth; the averages are as unbiased, with more variance)."""
        est = estimate(small_sqr_sum, small_count, b_small, big_sqr, b_big)
        if est is None:
            self.skip(b_big)
            return None
        grad_sqr, variance = est
        covered = int(b_big) + self.pending
        decay = 0.5 ** (covered / self.half_life)
        self.grad_sqr_avg = decay * self.grad_sqr_avg + (1.0 - decay) * grad_sqr
        self.variance_avg = decay * self.variance_avg + (1.0 - decay) * variance
        self.weight = decay * self.weight + (1.0 - decay)
        self.samples += covered
        self.pending = 0
        self.steps += 1
        return est

    @property
    def grad_sqr(self):
        """Smoothed |G|² (per sample), or None before the first estimate."""
        return self.grad_sqr_avg / self.weight if self.weight > 0 else None

    @property
    def variance(self):
        """Smoothed tr(Σ) (per sample), or None before the first estimate."""
        return self.variance_avg / self.weight if self.weight > 0 else None

    @property
    def b_noise(self):
        """tr(Σ)/|G|² from the smoothed values (a negative tr(Σ) counts as 0). None before the first estimate and
        while the smoothed |G|² is ≤ 0: the gradient is not resolved from the noise, so there is no number to act on
        (a schedule should not grow on None)."""
        g, v = self.grad_sqr, self.variance
        if g is None or not g > 0:
            return None
        return max(v, 0.0) / g

    def state_dict(self) -> dict:
        return {"grad_sqr_avg": float(self.grad_sqr_avg), "variance_avg": float(self.variance_avg),
                "weight": float(self.weight), "samples": int(self.samples), "steps": int(self.steps),
                "pending": int(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.grad_sqr_avg = float(state["grad_sqr_avg"])
        self.variance_avg = float(state["variance_avg"])
        self.weight = float(state["weight"])
        self.samples = int(state["samples"])
        self.steps = int(state["steps"])
        self.pending = int(state.get("pending", 0))  # not in checkpoints before noise_every

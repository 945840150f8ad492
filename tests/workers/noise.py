"""Worker: the noise estimator's inputs taken from real steps (Accumulator + Horovod's DistributedOptimizer).

Linear regression, so every per-sample gradient is known exactly: g_i = (w·x_i − y_i)·x_i. Each rank runs its share of
each step's global batch through Accumulator.step with PassNorms on the model; after the step it reduces
local_estimate_inputs over the ranks and takes grad_sqr_norm of the averaged gradient (captured in optimizer.zero_grad,
which Accumulator.step calls right after the step). Both are compared with the same statistics computed in float64 from
the per-sample gradients of the whole global batch at the weights before the step. Each rank writes OUT/rank{r}.json:
per case and step the relative errors, the counts, and its NoiseScale state.
"""

import json
import sys

import torch

from adabatch_hvd import dist
from adabatch_hvd.accumulation import Accumulator
from adabatch_hvd.noise import NoiseScale, PassNorms, grad_sqr_norm, local_estimate_inputs, small_stats

D = 16
# name -> (micro-batch sizes of rank 0, of rank 1), backward passes per step, precision
CASES = {
    "one_pass": (([16], [16]), 1, "fp32"),
    "uneven_two_passes": (([8, 7], [7, 6]), 2, "fp32"),
    "fp16_two_passes": (([8, 8], [8, 8]), 2, "fp16"),
    "empty_rank": (([8, 8], []), 2, "fp32"),
}

out = sys.argv[1]
dist.init(threads=1)
r, world = dist.rank(), dist.size()
assert world == 2
results = {}
for name, (shares, passes, precision) in CASES.items():
    torch.manual_seed(0)  # the same weights and data on every rank
    model = torch.nn.Linear(D, 1, bias=False)
    w_star = torch.randn(D)
    opt = dist.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.01), model, passes)
    # noise=True: the accumulator's own measurement (fused with the step's exchange) is checked against the one here
    acc = Accumulator(model, opt, world, loss_fn=lambda out, y: 0.5 * (out.squeeze(1) - y).square().mean(),
                      precision=precision, noise=True)
    if acc.scaler is not None:  # a scale at which these gradients stay finite in fp16
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    norms = PassNorms(model.parameters())
    big = []
    real_zero_grad = opt.zero_grad

    def zero_grad(*args, **kwargs):
        big.append(grad_sqr_norm(model.parameters()))  # the averaged (and unscaled) gradient, after the step
        return real_zero_grad(*args, **kwargs)

    opt.zero_grad = zero_grad
    estimator = NoiseScale()
    steps = []
    S = sum(map(sum, shares))
    for step in range(3):
        X = torch.randn(S, D)
        y = X @ w_star + 0.5 * torch.randn(S)
        w = model.weight.detach().double().reshape(-1).clone()
        start = sum(map(sum, shares[:r]))
        mine, offsets = [], [start]
        for b in shares[r]:
            mine.append((X[offsets[-1]:offsets[-1] + b], y[offsets[-1]:offsets[-1] + b]))
            offsets.append(offsets[-1] + b)
        scale = None if acc.scaler is None else acc.scaler.get_scale()  # the scale of these backward passes
        flag = torch.tensor([float(r)])  # a scalar of the caller's rides along: summed 0 + 1
        *_, flags = acc.step(mine, S, passes, flag)
        own = acc.noise_inputs  # (small_sqr_sum, count, b_small, big_sqr, b_big) from the fused exchange
        local = local_estimate_inputs(norms.take(), shares[r], S, world, scale)
        summed = dist.allreduce_sum(local, name=f"noise_{name}_{step}")
        # float64 truth from the per-sample gradients of the whole global batch
        g = (X.double() @ w - y.double())[:, None] * X.double()
        sqr, inv, count, i = 0.0, 0.0, 0, 0
        for sizes in shares:
            for b in sizes:
                sqr += float(g[i:i + b].mean(0).square().sum())
                inv += 1.0 / b
                count += 1
                i += b
        true_big = float(g.mean(0).square().sum())
        small_sqr_sum, small_count, b_small = small_stats(summed)
        steps.append({
            "skipped": bool(acc.skipped),
            "small_sqr_error": abs(small_sqr_sum / sqr - 1),
            "count": small_count, "true_count": count,
            "b_small_error": abs(b_small / (count / inv) - 1),
            "big_error": abs(float(big[-1]) / true_big - 1),
            "estimate": estimator.update(small_sqr_sum, small_count, b_small, big[-1], S),
            "fused_flags": flags.tolist(),
            "fused_error": max(abs(float(a) / float(b) - 1) for a, b in
                               zip(own, (small_sqr_sum, small_count, b_small, big[-1], S))),
        })
    norms.remove()
    results[name] = {"steps": steps, "state": estimator.state_dict()}
with open(f"{out}/rank{r}.json", "w") as f:
    json.dump(results, f)

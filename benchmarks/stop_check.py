"""The cost per optimizer step of the stop-request agreement (adabatch_hvd.signals), run under Horovod, e.g.

    .venv/bin/horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python benchmarks/stop_check.py
    .venv/bin/horovodrun -np 2 -H localhost:2 --mpi .venv/bin/python benchmarks/stop_check.py

For the fmnist_cnn and MLP models at the default config's first-stage batch (64 per worker), one
Accumulator step is timed each way, interleaved in rounds (each in a fresh order) so that load changes hit
all alike:
- none: no agreement at all;
- separate: the agreement as a collective of its own after the step (StopRequest.check, as before);
- fused: the flag riding on the step's gradient exchange (Accumulator.step's scalars, as now);
- fused+noise/1: that, plus the gradient noise scale's measurement on every step (Accumulator(noise=True):
  per-pass norm hooks, three more scalars in the same exchange, the averaged gradient's norm,
  NoiseScale.update); its cost against `fused` is the noise scale's own (issue 20: goal <= 1% of a step);
- fused+noise/N: the same, measured on every N-th step as the trainer does at its default
  schedule.noise_every (the other steps send zeros in the scalars and NoiseScale.skip).
Rank 0 prints each one's median step time and what the agreement adds to a step (median over rounds
of the per-round difference), in microseconds and as a share of the step.
"""

import random
import statistics
import sys
import time

import torch

from adabatch_hvd import dist
from adabatch_hvd.accumulation import Accumulator
from adabatch_hvd.data import DatasetInfo
from adabatch_hvd.models import build_model
from adabatch_hvd.noise import NoiseScale
from adabatch_hvd.schedule import ScheduleConfig
from adabatch_hvd.signals import StopRequest


def timed(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main(rounds=30, steps=24, every=ScheduleConfig.noise_every):
    dist.init(1)
    stop = StopRequest()
    info = DatasetInfo(num_classes=10, in_channels=1, image_size=28)
    lines = []
    for name in ("mlp", "fmnist_cnn"):
        torch.manual_seed(0)
        model = build_model(name, info)
        opt = dist.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.01), model)
        acc = Accumulator(model, opt, dist.size())
        measured = Accumulator(model, opt, dist.size(), noise=True)  # the same model and optimizer, hooks on
        measured.norms.enabled = False
        estimate = NoiseScale()
        count = [0]

        def with_noise(every):
            measure = count[0] % every == 0
            count[0] += 1
            stop.agree(measured.step(batch, size, 1, stop.flag(), measure)[3])
            measured.norms.enabled = False
            if measure:
                estimate.update(*measured.noise_inputs)
            else:
                estimate.skip(size)
        batch = [(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))]
        size = 64 * dist.size()

        def separate():
            acc.step(batch, size, 1)
            stop.agreed = False
            stop.check()

        ways = {"none": lambda: acc.step(batch, size, 1), "separate": separate,
                "fused": lambda: stop.agree(acc.step(batch, size, 1, stop.flag())[3]),
                "fused+noise/1": lambda: with_noise(1), f"fused+noise/{every}": lambda: with_noise(every)}
        for fn in ways.values():
            timed(fn, steps)  # warm up
        times = {k: [] for k in ways}
        order = random.Random(0)
        for _ in range(rounds):  # each round in a fresh order: no way always runs after another
            for k in order.sample(list(ways), len(ways)):
                times[k].append(timed(ways[k], steps))
        base = statistics.median(times["none"])
        added = {k: statistics.median(a - b for a, b in zip(times[k], times["none"])) for k in ("separate", "fused")}
        noise = {n: statistics.median(a - b for a, b in zip(times[f"fused+noise/{n}"], times["fused"]))
                 for n in (1, every)}
        lines.append(f"  {name}: step {base * 1e3:.2f} ms; agreement adds: separate {added['separate'] * 1e6:.0f} us "
                     f"({added['separate'] / base:.1%}), fused {added['fused'] * 1e6:.0f} us "
                     f"({added['fused'] / base:.1%}); the noise scale adds {noise[1] * 1e6:.0f} us "
                     f"({noise[1] / base:.1%}) measured every step, {noise[every] * 1e6:.0f} us "
                     f"({noise[every] / base:.1%}) every {every}th (B_noise {estimate.b_noise})")
    if dist.is_main():
        print(f"world size {dist.size()}, {rounds} rounds of {steps} steps each way:")
        print("\n".join(lines))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))

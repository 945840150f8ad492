"""The cost of the stop-request agreement (adabatch_hvd.signals.StopRequest.check): one 1-element
allreduce after every optimizer step. Run under Horovod, e.g.

    .venv/bin/horovodrun -np 2 -H localhost:2 --gloo .venv/bin/python benchmarks/stop_check.py
    .venv/bin/horovodrun -np 2 -H localhost:2 --mpi .venv/bin/python benchmarks/stop_check.py

Rank 0 prints the median time of one check over N calls, next to the time of one optimizer step of the
fmnist_cnn and MLP models at the default config's first-stage batch (64 per worker), for scale.
"""

import statistics
import sys
import time

import torch

from adabatch_hvd import dist
from adabatch_hvd.data import DatasetInfo
from adabatch_hvd.models import build_model
from adabatch_hvd.signals import StopRequest


def median_seconds(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(n=2000):
    dist.init(1)
    stop = StopRequest()
    check = median_seconds(lambda: (setattr(stop, "agreed", False), stop.check()), n)
    info = DatasetInfo(num_classes=10, in_channels=1, image_size=28)
    steps = {}
    for name in ("mlp", "fmnist_cnn"):
        model = build_model(name, info)
        opt = dist.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.01), model)
        x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))

        def step():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        step()
        steps[name] = median_seconds(step, 50)
    if dist.is_main():
        print(f"world size {dist.size()}: stop check {check * 1e6:.0f} us (median of {n}); one optimizer step: "
              + ", ".join(f"{k} {v * 1e3:.1f} ms ({check / v:.1%})" for k, v in steps.items()))


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))

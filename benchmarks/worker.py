"""Benchmark worker: runs under `horovodrun -np N`; rank 0 writes one JSON result file.

Modes (the first argument):
  throughput  samples/s of the project's trainer at fixed global batches (fixed mode, one run
              per batch, the first epoch is warm-up, the median of the rest is reported)
  minimal     a hand-written Horovod loop in the style of Horovod's PyTorch examples, at one batch
  comm        gradient allreduce calls and bytes per optimizer step in every stage of an AdaBatch run
  profile     torch.profiler over a few optimizer steps at a given batch: where the time goes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from adabatch_hvd import dist
from adabatch_hvd.config import CommConfig, Config
from adabatch_hvd.trainer import Trainer


def make_config(a, batch: int, epochs: int, run_dir: str, mode: str = "fixed") -> Config:
    cfg = Config()
    cfg.data.name, cfg.model.name = a.data, a.model
    cfg.data.train_samples, cfg.data.test_samples, cfg.data.augment = a.samples, 1000, not a.no_augment
    cfg.data.synthetic_samples, cfg.data.synthetic_shape = a.samples, [3, 32, 32]
    s = cfg.schedule
    s.mode, s.initial_batch, s.epochs, s.max_micro_batch, s.interval = mode, batch, epochs, a.cap, a.interval
    cfg.optim.lr = a.lr
    cfg.comm = comm_config(a)
    cfg.run.run_dir, cfg.run.quiet, cfg.run.threads = run_dir, True, a.threads
    return cfg


def comm_config(a) -> CommConfig:
    return CommConfig(compression=a.compression, fusion_threshold_mb=a.fusion_mb, cycle_time_ms=a.cycle_ms,
                      autotune=a.autotune or None)


def records(run_dir) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def throughput(a) -> dict:
    points = []
    for batch in a.batches:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = dist.broadcast_object(tmp, name=f"dir{batch}")
            trainer = Trainer(make_config(a, batch, 1 + a.repeats, run_dir))
            trainer.fit()
            recs = records(run_dir) if dist.is_main() else []
            dist.barrier()
        if recs:
            timed = [r["samples_per_second"] for r in recs[1:]]
            points.append({"global_batch": batch, "micro_batch": recs[0]["micro_batch"],
                           "accum_steps": recs[0]["accum_steps"], "samples_per_second": statistics.median(timed),
                           "repeats": timed, "epoch_seconds": statistics.median(r["epoch_seconds"] for r in recs[1:])})
            print(f"B={batch}: {points[-1]['samples_per_second']:.0f} samples/s", file=sys.stderr, flush=True)
    return {"model": a.model, "data": a.data, "cap": a.cap, "samples": a.samples, "points": points}


def minimal(a) -> dict:
    """Horovod's PyTorch example loop: shard, forward, backward, DistributedOptimizer step.

    --plain: plain PyTorch instead (torch.optim.SGD, no Horovod), for one process on one device; under
    several ranks each trains on its own slice with no communication at all.
    --lockstep (with --plain): and a 1-element allreduce after every step, so the ranks wait for each other
    as they do in data-parallel training, but move no gradients.
    """
    from adabatch_hvd.data import build_dataset
    from adabatch_hvd.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_dataset(a.data, None, True, augment=not a.no_augment, synthetic_samples=a.samples,
                         synthetic_shape=(3, 32, 32))
    torch.manual_seed(0)
    model = build_model(a.model, data.info).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=0.9, weight_decay=5e-4)
    if not a.plain:
        optimizer = dist.distributed_optimizer(optimizer, model, compression=a.compression)
        dist.broadcast_state(model, optimizer)
    per_worker = a.batches[0] // dist.size()
    n = a.samples - a.samples % a.batches[0]
    rates = []
    for epoch in range(1 + a.repeats):
        order = torch.randperm(a.samples, generator=torch.Generator().manual_seed(epoch))[:n]
        mine = order.view(-1, dist.size(), per_worker)[:, dist.rank()]  # each step: this rank's slice
        batches = data.iterate(list(mine), epoch)
        model.train()
        t0 = time.perf_counter()
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            optimizer.step()
            if a.lockstep:
                dist.allreduce_sum(torch.zeros(1), name="lockstep")
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return {"model": a.model, "data": a.data, "global_batch": a.batches[0], "samples": n, "plain": a.plain,
            "lockstep": a.lockstep, "device": str(device), "samples_per_second": statistics.median(rates[1:]), "repeats": rates[1:]}


def comm(a) -> dict:
    """Count what DistributedOptimizer hands to Horovod per optimizer step, stage by stage."""
    import horovod.torch.optimizer as hvd_optimizer

    from adabatch_hvd import accumulation

    calls = {"n": 0, "bytes": 0}
    real_allreduce = hvd_optimizer.allreduce_async_

    def counting_allreduce(tensor, *args, **kwargs):
        calls["n"] += 1
        calls["bytes"] += tensor.numel() * tensor.element_size()
        return real_allreduce(tensor, *args, **kwargs)

    hvd_optimizer.allreduce_async_ = counting_allreduce
    steps = []
    real_step = accumulation.Accumulator.step

    def counted_step(self, micro_batches, step_size, passes, *rest):
        before = dict(calls)
        out = real_step(self, micro_batches, step_size, passes, *rest)
        steps.append({"size": step_size, "passes": passes, "calls": calls["n"] - before["n"],
                      "bytes": calls["bytes"] - before["bytes"]})
        return out

    accumulation.Accumulator.step = counted_step
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = dist.broadcast_object(tmp, name="comm_dir")
        trainer = Trainer(make_config(a, a.batches[0], a.epochs, run_dir, mode="adaptive"))
        trainer.fit()
        recs = records(run_dir) if dist.is_main() else []
        dist.barrier()
    params = sum(1 for p in trainer.model.parameters() if p.requires_grad)
    param_bytes = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    stages, start, prev_step = [], 0, 0
    for r in recs:  # split the per-step log by epoch (global_step is cumulative), then merge stages
        chunk = steps[start:start + r["global_step"] - prev_step]
        start, prev_step = start + len(chunk), r["global_step"]
        if stages and stages[-1]["stage"] == r["stage"]:
            stages[-1]["steps"] += chunk
        else:
            stages.append({"stage": r["stage"], "global_batch": r["global_batch"], "accum_steps": r["accum_steps"],
                           "steps": chunk})
    for s in stages:
        chunk = s.pop("steps")
        s["optimizer_steps"] = len(chunk)
        s["allreduce_calls_per_step"] = sorted({c["calls"] for c in chunk})
        s["bytes_per_step"] = sorted({c["bytes"] for c in chunk})
        s["bytes_per_sample"] = sum(c["bytes"] for c in chunk) / sum(c["size"] for c in chunk)
        s["backward_passes"] = sorted({c["passes"] for c in chunk})
    return {"model": a.model, "parameters": params, "parameter_bytes": param_bytes, "stages": stages}


def profile(a) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out = {}
    for batch in a.batches:
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = dist.broadcast_object(tmp, name=f"prof{batch}")
            cfg = make_config(a, batch, 1, run_dir)
            cfg.run.stop_after_steps = a.steps
            trainer = Trainer(cfg)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.fit()
            dist.barrier()
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        groups = {"convolution": ("conv",), "linear/matmul": ("addmm", "mm", "linear"),
                  "pooling/activation": ("max_pool", "relu", "threshold"),
                  "loss": ("cross_entropy", "log_softmax", "nll"),
                  "optimizer.step (SGD + allreduce wait)": ("sgd", "_foreach", "add_", "mul_", "lerp"),
                  "horovod allreduce wait": ("horovod", "allreduce", "synchronize"),
                  "data (index/augment/normalize)": ("index_select", "gather", "where", "flip", "sub", "div",
                                                     "to", "copy_", "_to_copy", "randint", "cat", "stack")}
        shares = {k: 0.0 for k in groups}
        shares["other"] = 0.0
        for e in prof.key_averages():
            key = next((g for g, words in groups.items() if any(w in e.key.lower() for w in words)), "other")
            shares[key] += e.self_cpu_time_total
        top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        out[str(batch)] = {"shares": {k: v / total for k, v in shares.items()},
                           "top": [(e.key, e.self_cpu_time_total / total) for e in top]}
    return {"model": a.model, "steps": a.steps, "profiles": out}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["throughput", "minimal", "comm", "profile"])
    p.add_argument("out")
    p.add_argument("--model", default="fmnist_cnn")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[128])
    p.add_argument("--cap", type=int, default=None)
    p.add_argument("--samples", type=int, default=60000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--interval", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--compression", default="none")
    p.add_argument("--fusion-mb", type=float, default=None)
    p.add_argument("--cycle-ms", type=float, default=None)
    p.add_argument("--autotune", action="store_true")
    p.add_argument("--plain", action="store_true", help="minimal: plain PyTorch, no Horovod optimizer")
    p.add_argument("--lockstep", action="store_true", help="minimal --plain: a 1-element allreduce per step")
    a = p.parse_args()
    dist.init(a.threads, comm_config(a).horovod_env())
    result = {"throughput": throughput, "minimal": minimal, "comm": comm, "profile": profile}[a.mode](a)
    if dist.is_main():
        result["world_size"] = dist.size()
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The measuring half of benchmarks/gpu_check.sh: runs under `horovodrun -np N --gloo`; rank 0 writes one JSON.

Modes (the first argument; the second is the JSON file):
  libs        what Horovod was built with, which libnccl/libcudart the process loaded, and (on a GPU)
              allreduces of CUDA tensors: correctness and time per size (with one rank NCCL copies
              locally: this proves the NCCL path runs, it measures no link)
  devmap      each rank's device when every rank sees only its own GPU (run it with
              CUDA_VISIBLE_DEVICES set to one device for every rank): trainer.pick_device per rank
  throughput  for each model:shape:micro-batch and precision, samples/s of the project's Trainer (fixed
              mode, one micro-batch per step) against a plain PyTorch loop (torch.optim.SGD, autocast,
              the same data, model, micro-batch and precision) in the same process; goal >= 0.9
  oom         --max-micro-batch auto under a capped CUDA memory fraction: the run must survive real
              CUDA out-of-memory errors and settle on a smaller micro-batch
On a machine without a GPU every mode runs on the CPU (gpu_check.sh --rehearse), to find mistakes
before a lease is spent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from adabatch_hvd import dist
from adabatch_hvd.config import Config

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync():
    if CUDA:
        torch.cuda.synchronize()


def records(run_dir) -> list:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ---- libs ----------------------------------------------------------------------------------------
def libs(a) -> dict:
    import horovod.torch as hvd

    maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "/" in line})
    out = {"horovod": __import__("horovod").__version__, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "nccl_built": hvd.nccl_built(), "cuda_built": hvd.cuda_built(), "gloo_built": hvd.gloo_built(),
           "mpi_built": hvd.mpi_built(), "gpu": torch.cuda.get_device_name() if CUDA else None,
           "torch_nccl": ".".join(map(str, torch.cuda.nccl.version())) if CUDA else None,
           "loaded": [m for m in maps if any(k in m for k in ("libnccl", "libcudart", "mpi_lib_v2"))],
           "allreduce": []}
    for mib in a.sizes:
        n = max(1, int(mib * 2**20) // 4)
        x = torch.full((n,), float(dist.rank() + 1), device=DEVICE)
        want = dist.size() * (dist.size() + 1) / 2
        got = dist.allreduce_sum(x, name=f"check_{mib}")
        ok = bool(torch.all(got == want).item())
        for i in range(3):  # warm-up
            dist.allreduce_sum(x, name=f"warm_{mib}_{i}")
        sync()
        t0 = time.perf_counter()
        for i in range(a.iters):
            dist.allreduce_sum(x, name=f"timed_{mib}_{i}")
        sync()
        seconds = (time.perf_counter() - t0) / a.iters
        out["allreduce"].append({"MiB": mib, "device": str(x.device), "correct": ok, "ms": seconds * 1e3,
                                 "algbw_GBps": n * 4 / seconds / 1e9})
        print(f"allreduce {mib} MiB on {x.device}: correct={ok} {seconds * 1e3:.3f} ms", file=sys.stderr, flush=True)
    return out


# ---- devmap --------------------------------------------------------------------------------------
def devmap(a) -> dict:
    from adabatch_hvd.trainer import pick_device

    mine = {"rank": dist.rank(), "local_rank": dist.local_rank(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device_count": torch.cuda.device_count() if CUDA else 0}
    try:
        device = pick_device("auto")
        x = torch.ones(4, device=device) * 2  # the device really works
        mine.update(device=str(device), ok=bool(x.sum().item() == 8))
    except Exception as e:  # reported, not raised: the check goes on
        mine.update(device=None, ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
    ranks = dist.allgather_object(mine, name="devmap")
    return {"ranks": ranks, "ok": all(r["ok"] for r in ranks)}


# ---- throughput ----------------------------------------------------------------------------------
def point_config(model, shape, classes, micro, precision, samples, epochs, run_dir) -> Config:
    cfg = Config()
    cfg.data.name, cfg.model.name = "synthetic", model
    cfg.data.synthetic_samples, cfg.data.synthetic_shape, cfg.data.synthetic_classes = samples, list(shape), classes
    cfg.data.augment, cfg.data.test_samples, cfg.data.eval_batch = False, min(samples, 2 * micro), micro
    s = cfg.schedule
    s.mode, s.initial_batch, s.epochs, s.max_micro_batch, s.interval = "fixed", micro * dist.size(), epochs, micro, epochs
    cfg.optim.lr, cfg.optim.precision = 0.01, precision
    cfg.run.run_dir, cfg.run.quiet, cfg.run.log_every_steps = run_dir, True, 0
    return cfg


def trainer_rate(model, shape, classes, micro, precision, samples, repeats) -> dict:
    from adabatch_hvd.trainer import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = dist.broadcast_object(tmp, name="tp_dir")
        trainer = Trainer(point_config(model, shape, classes, micro, precision, samples, 1 + repeats, run_dir))
        trainer.fit()
        recs = records(run_dir) if dist.is_main() else []
        dist.barrier()
    del trainer
    timed = [r["samples_per_second"] for r in recs[1:]]
    return {"samples_per_second": statistics.median(timed) if timed else None, "repeats": timed,
            "micro_batch": recs[0]["micro_batch"] if recs else None, "accum_steps": recs[0]["accum_steps"] if recs else None}


def plain_rate(model, shape, classes, micro, precision, samples, repeats) -> dict:
    """The same data, model, micro-batch and precision in a plain loop: no Horovod, no accumulation."""
    from adabatch_hvd.data import build_dataset
    from adabatch_hvd.models import build_model

    data = build_dataset("synthetic", None, True, augment=False, synthetic_samples=samples,
                         synthetic_shape=tuple(shape), synthetic_classes=classes)
    torch.manual_seed(0)
    net = build_model(model, data.info).to(DEVICE)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    dtype = DTYPES[precision]
    autocast = (lambda: torch.autocast(DEVICE.type, dtype=dtype)) if dtype else contextlib.nullcontext
    n = samples - samples % micro
    rates = []
    net.train()
    for epoch in range(1 + repeats):
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(epoch))[:n].view(-1, micro)
        sync()
        t0 = time.perf_counter()
        for x, y in data.iterate(list(order), epoch):
            x, y = x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync()
        rates.append(n / (time.perf_counter() - t0))
    del net, opt, data
    return {"samples_per_second": statistics.median(rates[1:]), "repeats": rates[1:]}


def throughput(a) -> dict:
    points = []
    for spec in a.models:  # name:C,H,W:classes:micro:samples
        model, shape, classes, micro, samples = spec.split(":")
        shape, classes, micro, samples = [int(v) for v in shape.split(",")], int(classes), int(micro), int(samples)
        for precision in a.precisions:
            p = {"model": model, "shape": shape, "classes": classes, "micro_batch": micro, "samples": samples,
                 "precision": precision}
            t0 = time.perf_counter()
            p["trainer"] = trainer_rate(model, shape, classes, micro, precision, samples, a.repeats)
            p["cudnn_benchmark"] = torch.backends.cudnn.benchmark  # as the trainer set it; the plain loop keeps it
            if CUDA:
                torch.cuda.empty_cache()
            p["plain"] = plain_rate(model, shape, classes, micro, precision, samples, a.repeats) \
                if dist.is_main() else None
            dist.barrier()
            if CUDA:
                p["max_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.empty_cache()
            if dist.is_main() and p["trainer"]["samples_per_second"]:
                p["ratio"] = p["trainer"]["samples_per_second"] / p["plain"]["samples_per_second"]
            p["seconds"] = time.perf_counter() - t0
            points.append(p)
            if dist.is_main():
                print(f"{model} {precision} micro {micro}: trainer {p['trainer']['samples_per_second']:.0f}, plain "
                      f"{p['plain']['samples_per_second']:.0f} samples/s, ratio {p.get('ratio', 0):.3f} "
                      f"({p['seconds']:.0f} s)", file=sys.stderr, flush=True)
    return {"device": str(DEVICE), "gpu": torch.cuda.get_device_name() if CUDA else None, "points": points}


# ---- oom -----------------------------------------------------------------------------------------
class Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        if "out of memory" in record.getMessage():
            self.lines.append(record.getMessage())


def oom(a) -> dict:
    from adabatch_hvd.trainer import Trainer

    out = {"device": str(DEVICE), "memory_GiB_cap": None, "global_batch": a.batch}
    if CUDA:
        total = torch.cuda.get_device_properties(DEVICE).total_memory
        fraction = min(1.0, a.cap_gib * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        out.update(memory_GiB_cap=a.cap_gib, fraction=fraction, total_GiB=total / 2**30)
    seen = Count()
    logging.getLogger().addHandler(seen)
    logging.getLogger().setLevel(logging.INFO)
    model, shape, classes = a.model.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = dist.broadcast_object(tmp, name="oom_dir")
        cfg = point_config(model, [int(v) for v in shape.split(",")], int(classes), a.batch, a.precision,
                           a.samples, a.epochs, run_dir)
        cfg.schedule.max_micro_batch = "auto"
        t0 = time.perf_counter()
        try:
            Trainer(cfg).fit()
            out["finished"] = True
        except Exception as e:  # reported: the check goes on with the next step
            out.update(finished=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        out["seconds"] = time.perf_counter() - t0
        recs = records(run_dir) if dist.is_main() and (Path(run_dir) / "metrics.jsonl").exists() else []
        dist.barrier()
    out["epochs"] = [{k: r.get(k) for k in ("epoch", "micro_batch", "accum_steps", "micro_batch_tried", "train_loss",
                                            "samples_per_second")} for r in recs]
    out["out_of_memory_warnings"] = seen.lines[:10]
    out["out_of_memory_count"] = len(seen.lines)
    if CUDA:
        out["max_memory_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["libs", "devmap", "throughput", "oom"])
    p.add_argument("out")
    p.add_argument("--sizes", type=lambda s: [float(v) for v in s.split(",")], default=[0.004, 1, 64, 256])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--models", nargs="+", default=["resnet20:3,32,32:10:512:16384"],
                   help="name:C,H,W:classes:micro_batch:samples")
    p.add_argument("--precisions", type=lambda s: s.split(","), default=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", default="resnet50:3,224,224:1000", help="oom: name:C,H,W:classes")
    p.add_argument("--batch", type=int, default=256, help="oom: the global batch")
    p.add_argument("--cap-gib", type=float, default=12.0, help="oom: CUDA memory cap in GiB")
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--precision", default="fp32")
    a = p.parse_args()
    dist.init(0)
    result = {"libs": libs, "devmap": devmap, "throughput": throughput, "oom": oom}[a.mode](a)
    if dist.is_main():
        result["world_size"] = dist.size()
        Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

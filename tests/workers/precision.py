"""Worker: mixed precision on 2 ranks. Each rank writes OUT/rank{r}.json.

1. fp16 steps (2 micro-batches per rank, Horovod's DistributedOptimizer, the stop-flag scalars riding
   along) where rank 1 alone puts an inf into one gradient at step INF_STEP: per step, whether it
   was skipped, the scale, the summed scalars and a digest of the weights and optimizer state.
2. bf16 with --compression fp16 against none, from the same weights: the update and the dtypes
   handed to Horovod's allreduce.
3. The trainer under fp16: rank 0's scaler state reaches rank 1 at the start (sync), goes into the
   checkpoint, and an elastic commit_save/commit_restore brings it back.
"""

import hashlib
import json
import math
import sys

import horovod.torch.optimizer as hvd_optimizer
import torch

from adabatch_hvd import checkpoint, dist
from adabatch_hvd.accumulation import Accumulator
from adabatch_hvd.config import Config
from adabatch_hvd.data import build_dataset
from adabatch_hvd.models import build_model
from adabatch_hvd.trainer import Trainer

INF_STEP = 3
out, run_dir = sys.argv[1], sys.argv[2]
dist.init(threads=1)
r = dist.rank()
data = build_dataset("synthetic", None, True, seed=1, synthetic_samples=512, synthetic_shape=(1, 8, 8))


def digest(model, optimizer) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            h.update(buf.numpy().tobytes())
    return h.hexdigest()


def micro(step):
    """This rank's 2 micro-batches of 8 of the step's global batch of 32."""
    mine = list(range(32 * step + 16 * r, 32 * step + 16 * (r + 1)))
    return data.iterate([mine[:8], mine[8:]], 0)


# ---- 1. an inf on one rank -----------------------------------------------------------------------
torch.manual_seed(0)
model = build_model("mlp", data.info)
opt = dist.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, 2)
acc = Accumulator(model, opt, dist.size(), precision="fp16")
first = next(model.parameters())
steps = []
for step in range(8):
    hook = None
    if r == 1 and step == INF_STEP:
        hook = first.register_hook(lambda g: torch.where(torch.arange(g.numel()).view_as(g) == 0,
                                                         torch.full_like(g, math.inf), g))
    before = digest(model, opt)
    flag = torch.tensor([1.0 if r == 1 and step >= 5 else 0.0, 1.0])
    loss_sum, correct, count, summed = acc.step(micro(step), 32, 2, flag)
    if hook is not None:
        hook.remove()
    steps.append({"skipped": acc.skipped, "scale": acc.scaler.get_scale(), "summed": summed.tolist(),
                  "before": before, "after": digest(model, opt), "loss": float(loss_sum) / count})

# ---- 2. bf16 with fp16 compression -----------------------------------------------------------------
sent = []
real_allreduce = hvd_optimizer.allreduce_async_


def counting_allreduce(tensor, *args, **kwargs):
    sent.append(str(tensor.dtype))
    return real_allreduce(tensor, *args, **kwargs)


hvd_optimizer.allreduce_async_ = counting_allreduce
torch.manual_seed(0)
models = {c: build_model("mlp", data.info) for c in ("none", "fp16")}
start = {k: v.clone() for k, v in models["none"].state_dict().items()}
compression = {}
for name, m in models.items():
    m.load_state_dict(start)
    o = dist.distributed_optimizer(torch.optim.SGD(m.parameters(), lr=1.0), m, 2, name)
    before = len(sent)
    Accumulator(m, o, dist.size(), precision="bf16").step(micro(0), 32, 2)
    update = torch.cat([(p.detach() - start[n]).flatten() for n, p in m.named_parameters()])
    compression[name] = (update, sorted(set(sent[before:])))
hvd_optimizer.allreduce_async_ = real_allreduce
(u32, sent32), (u16, sent16) = compression["none"], compression["fp16"]
bf16_compression = {"relative_difference": ((u16 - u32).norm() / u32.norm()).item(), "finite": bool(
    torch.isfinite(u16).all()), "dtypes": {"none": sent32, "fp16": sent16}}

# ---- 3. the trainer's scaler state: sync, checkpoint, elastic commit ---------------------------------
cfg = Config()
cfg.data.name, cfg.data.synthetic_samples, cfg.data.synthetic_shape = "synthetic", 256, [1, 8, 8]
cfg.model.name, cfg.optim.precision = "mlp", "fp16"
cfg.schedule.epochs, cfg.schedule.initial_batch = 1, 32
cfg.run.run_dir, cfg.run.quiet, cfg.run.stop_after_steps = run_dir, True, 3
trainer = Trainer(cfg)
scaler = trainer.acc.scaler
if r == 0:  # only rank 0's state counts: sync() must give it to rank 1
    scaler.load_state_dict({**scaler.state_dict(), "scale": 1024.0, "_growth_tracker": 7})
trainer.fit()
after_fit = scaler.state_dict()
saved = checkpoint.load("latest", trainer.ckpt_dir)[0].get("grad_scaler") if r == 0 else None
committed = trainer.components.commit()  # what an elastic commit keeps
scaler.load_state_dict({**scaler.state_dict(), "scale": 8.0, "_growth_tracker": 0})
trainer.components.rollback(committed)
with open(f"{out}/rank{r}.json", "w") as f:
    json.dump({"steps": steps, "bf16_compression": bf16_compression, "after_fit": after_fit, "checkpoint": saved,
               "restored": scaler.state_dict()}, f)

"""Worker: fp16 gradient compression against none, counted at Horovod's allreduce_async_.

1. Optimizer level: from the same weights, one step with each compression; the update (plain SGD,
   lr 1, so the update is minus the averaged gradient) is compared, and the bytes handed to
   allreduce_async_ are counted per step.
2. Trainer level: two short runs of the project's trainer (config comm.compression none / fp16,
   the same seed) count the bytes per optimizer step and compare the final weights.
"""

import json
import sys
import tempfile

import horovod.torch.optimizer as hvd_optimizer
import torch

from adabatch_hvd import dist
from adabatch_hvd.accumulation import Accumulator
from adabatch_hvd.config import Config
from adabatch_hvd.data import build_dataset
from adabatch_hvd.models import build_model
from adabatch_hvd.trainer import Trainer

out = sys.argv[1]
dist.init(threads=1)
sent = []  # (numel, dtype, bytes) of every tensor handed to Horovod
real_allreduce = hvd_optimizer.allreduce_async_


def counting_allreduce(tensor, *args, **kwargs):
    sent.append((tensor.numel(), str(tensor.dtype), tensor.numel() * tensor.element_size()))
    return real_allreduce(tensor, *args, **kwargs)


hvd_optimizer.allreduce_async_ = counting_allreduce

# ---- 1. one optimizer step from the same weights ------------------------------------------------
data = build_dataset("synthetic", None, True, seed=1, synthetic_samples=256, synthetic_shape=(1, 8, 8))
torch.manual_seed(0)
models = {c: build_model("mlp", data.info) for c in ("none", "fp16")}  # BN-free
start = {k: v.clone() for k, v in models["none"].state_dict().items()}
# One model per optimizer: each DistributedOptimizer hooks its model's gradients.
optimizers = {c: dist.distributed_optimizer(torch.optim.SGD(m.parameters(), lr=1.0), m, 2, c)
              for c, m in models.items()}
steps = []
for step in range(4):
    mine = list(range(64 * step + 32 * dist.rank(), 64 * step + 32 * (dist.rank() + 1)))
    result = {}
    for compression, opt in optimizers.items():
        model = models[compression]
        model.load_state_dict(start)
        before = len(sent)
        acc = Accumulator(model, opt, dist.size())
        acc.step(data.iterate([mine[:16], mine[16:]], 0), 64, 2)  # 2 micro-batches per rank
        update = torch.cat([(p.detach() - start[n]).flatten() for n, p in model.named_parameters()])
        result[compression] = (update, sent[before:])
    (u32, sent32), (u16, sent16) = result["none"], result["fp16"]
    steps.append({"relative_difference": ((u16 - u32).norm() / u32.norm()).item(),
                  "bytes": {"none": sum(b for _, _, b in sent32), "fp16": sum(b for _, _, b in sent16)},
                  "dtypes": {"none": sorted({d for _, d, _ in sent32}), "fp16": sorted({d for _, d, _ in sent16})},
                  "elements": {"none": sum(n for n, _, _ in sent32), "fp16": sum(n for n, _, _ in sent16)}})
    start = {k: v.clone() for k, v in models["none"].state_dict().items()}  # the next step starts elsewhere

# ---- 2. the trainer with config comm.compression ------------------------------------------------
runs = {}
for compression in ("none", "fp16"):
    cfg = Config()
    cfg.data.name, cfg.data.synthetic_samples, cfg.data.synthetic_shape = "synthetic", 512, [1, 8, 8]
    cfg.model.name = "mlp"
    cfg.schedule.epochs, cfg.schedule.initial_batch, cfg.schedule.max_micro_batch = 1, 64, 16
    cfg.comm.compression = compression
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run.run_dir, cfg.run.quiet = dist.broadcast_object(tmp, name=f"dir_{compression}"), True
        before = len(sent)
        trainer = Trainer(cfg)
        trainer.fit()
        dist.barrier()
    runs[compression] = {"bytes": sum(b for _, _, b in sent[before:]), "steps": trainer.state.global_step,
                         "weights": torch.cat([p.detach().flatten() for p in trainer.model.parameters()])}
w32, w16 = runs["none"].pop("weights"), runs["fp16"].pop("weights")
torch.manual_seed(cfg.run.seed)  # the trainer's initial weights
moved = (w32 - torch.cat([p.detach().flatten() for p in build_model("mlp", data.info).parameters()])).norm()
with open(f"{out}/rank{dist.rank()}.json", "w") as f:
    json.dump({"steps": steps, "trainer": runs, "trainer_difference": (w16 - w32).norm().item(),
               "trainer_moved": moved.item()}, f)

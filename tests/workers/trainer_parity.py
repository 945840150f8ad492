"""Worker: the project's trainer on N ranks against one process on the gathered global batch.

The run crosses two stage changes (k = 1 -> 2 -> 4 micro-batches per rank) and ends each epoch
with a short last step. Rank 0 then replays every optimizer step with plain SGD on the whole
global batch and records the relative weight difference.

With `oom forward|backward LIMIT`: schedule.max_micro_batch=auto, and rank 1 alone raises
torch.cuda.OutOfMemoryError for any micro-batch larger than LIMIT, in the forward pass or halfway
through the backward pass (after the last layer's gradients went to Horovod), with the trainer's
out-of-memory guard on as it is on CUDA.
"""

import json
import sys

import torch

from adabatch_hvd import dist, sampler
from adabatch_hvd.config import Config, build_schedule
from adabatch_hvd.data import build_dataset
from adabatch_hvd.models import build_model
from adabatch_hvd.trainer import Trainer

out, run_dir = sys.argv[1], sys.argv[2]
oom = sys.argv[3:] and (sys.argv[4], int(sys.argv[5]))  # (where, limit)
dist.init(threads=1)
cfg = Config()
cfg.data.name, cfg.data.synthetic_samples, cfg.data.synthetic_shape = "synthetic", 193, [1, 8, 8]
cfg.model.name = "mlp"
cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay = 0.05, 0.9, 5e-4
s = cfg.schedule
s.epochs, s.stages, s.max_micro_batch, s.lr_decay = 3, ["0:16", "1:32", "2:64"], 8, 0.5
cfg.run.run_dir, cfg.run.seed = run_dir, 3
if oom:
    s.max_micro_batch = "auto"
trainer = Trainer(cfg)
sizes, raised = [], []
if oom:
    where, limit = oom
    trainer.acc.oom_guard = True

    def injected(*_):
        raised.append(sizes[-1])
        raise torch.cuda.OutOfMemoryError(f"injected: micro-batch {sizes[-1]} > {limit}")

    def forward_hook(module, inputs):
        if not module.training:
            return
        sizes.append(len(inputs[0]))
        if dist.rank() == 1 and sizes[-1] > limit:
            if where == "forward":
                injected()
            inputs[0].register_hook(injected)  # fires between the last layer's gradients and the first's

    trainer.model[3].register_forward_pre_hook(forward_hook)  # the mlp's last Linear
trainer.fit()
weights = [p.detach().clone() for p in trainer.model.parameters()]

if dist.rank() == 0:
    torch.manual_seed(cfg.run.seed)
    data = build_dataset("synthetic", None, True, seed=cfg.run.seed, synthetic_samples=193,
                         synthetic_shape=(1, 8, 8), synthetic_classes=10)
    ref = build_model("mlp", data.info)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule, n, ks = build_schedule(cfg), len(data), []
    for plan in schedule.plan(dist.size(), s.max_micro_batch):
        order = sampler.permutation(n, cfg.run.seed, plan.epoch)
        for step in sampler.steps(n, plan.global_batch, dist.size()):
            ks.append(sampler.passes_per_step(step, dist.size(), plan.micro_batch))
            x, y = next(data.iterate([[order[i] for i in range(step.start, step.start + step.size)]], plan.epoch))
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(plan.epoch + step.start / n)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
    errors = [((p - q).norm() / q.norm()).item() for p, q in zip(weights, ref.parameters())]
    moved = sum((p - q).norm().item() for p, q in zip(weights, build_model("mlp", data.info).parameters()))
    result = {"errors": errors, "passes": ks, "steps": trainer.state.global_step, "moved": moved,
              "reference_steps": len(ks)}
else:
    result = {}
result["micro"] = trainer.state.micro.state_dict()
result["sizes"], result["raised"] = sizes, raised
result["weights"] = [w.tolist() for w in weights]
with open(f"{out}/rank{dist.rank()}.json", "w") as f:
    json.dump(result, f)

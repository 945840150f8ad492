"""Worker: exercise adabatch_hvd.dist on N ranks; each rank writes OUT/rank{r}.json."""

import json
import sys

import torch

from adabatch_hvd import dist

out = sys.argv[1]
dist.init(threads=1)
r, n = dist.rank(), dist.size()
import horovod.torch as hvd  # only to report which controller is live

summed = dist.allreduce_sum(torch.tensor([r + 1.0, 10.0 * r]), name="sum")
mean = dist.allreduce_mean(torch.tensor([r + 1.0]), name="mean")

torch.manual_seed(100 + r)  # different init per rank, so the broadcast has work to do
model = torch.nn.Linear(3, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
model(torch.randn(4, 3)).sum().backward()
opt.step()  # creates rank-specific momentum buffers
before = model.weight.detach().clone()
dist.broadcast_state(model, opt, root=0)
gathered = dist.allgather_object({"w": model.weight.detach().tolist(),
                                  "m": opt.state[model.weight]["momentum_buffer"].tolist()})
# A fresh optimizer with weight decay: hvd.broadcast_optimizer_state would take a zero-gradient
# step here and shrink the weights; ours must leave them exactly as rank 0 had them.
torch.manual_seed(7)
fresh = torch.nn.Linear(3, 2)
fresh_before = fresh.weight.detach().clone()
fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
dist.broadcast_state(fresh, fresh_opt, root=0)
fresh_untouched = torch.equal(fresh_before, fresh.weight.detach()) and not fresh_opt.state
obj = dist.broadcast_object({"from": r, "payload": [1, 2, 3]} if r == 0 else None)
dist.barrier()
result = {
    "rank": r, "size": n, "local_rank": dist.local_rank(), "is_main": dist.is_main(),
    "gloo": hvd.gloo_enabled(), "mpi": hvd.mpi_enabled(),
    "sum": summed.tolist(), "mean": mean.tolist(),
    "weights_changed": bool(not torch.equal(before, model.weight.detach())),
    "all_weights": [g["w"] for g in gathered], "all_momentum": [g["m"] for g in gathered],
    "object": obj, "fresh_untouched": fresh_untouched, "threads": torch.get_num_threads(),
}
with open(f"{out}/rank{r}.json", "w") as f:
    json.dump(result, f)
dist.shutdown()

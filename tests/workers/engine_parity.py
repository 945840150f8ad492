"""Worker: Horovod DistributedOptimizer with backward_passes_per_step changed mid-run (k = 1, 2, 4).

Every rank also trains a single-process reference copy with plain SGD on the gathered global batch
and records the relative weight difference after each step. With SCALE=0 the loss is not scaled by
1/k: a negative control that must drift (it shows the comparison can fail).
"""

import json
import sys

import horovod.torch as hvd
import torch

out, scale = sys.argv[1], sys.argv[2] == "1"
hvd.init()
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)
r, n = hvd.rank(), hvd.size()
MICRO, SGD = 3, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
KS = [1, 1, 2, 2, 4, 4, 1]


def make_model():
    torch.manual_seed(0)  # BN-free, so accumulation is exact
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))


model, ref = make_model(), make_model()
opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), **SGD),
                               named_parameters=model.named_parameters(), backward_passes_per_step=1)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
ref_opt = torch.optim.SGD(ref.parameters(), **SGD)
loss_fn = torch.nn.functional.cross_entropy
data = torch.Generator().manual_seed(1)
errors = []
for k in KS:
    opt.set_backward_passes_per_step(k)
    per_worker = k * MICRO
    x = torch.randn(n * per_worker, 6, generator=data)  # the same global batch on every rank
    y = torch.randint(0, 5, (n * per_worker,), generator=data)
    mine = slice(r * per_worker, (r + 1) * per_worker)
    for xm, ym in zip(x[mine].split(MICRO), y[mine].split(MICRO)):
        loss = loss_fn(model(xm), ym)
        (loss / k if scale else loss).backward()
    opt.step()
    opt.zero_grad()
    ref_opt.zero_grad()
    loss_fn(ref(x), y).backward()
    ref_opt.step()
    errors.append(max(((p - q).norm() / q.norm()).item() for p, q in zip(model.parameters(), ref.parameters())))

with open(f"{out}/rank{r}.json", "w") as f:
    json.dump({"ks": KS, "errors": errors, "weights": [p.tolist() for p in model.parameters()]}, f)

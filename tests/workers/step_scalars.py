"""Worker: the stop flag riding on a step's gradient exchange (Accumulator.step's scalars). Rank 1 raises
its flag before step 5; each rank writes OUT/rank{r}.json with what every step's summed flags said."""

import json
import sys

import torch

from adabatch_hvd import dist
from adabatch_hvd.accumulation import Accumulator
from adabatch_hvd.models import build_model
from adabatch_hvd.data import DatasetInfo

out = sys.argv[1]
dist.init(threads=1)
r = dist.rank()
torch.manual_seed(0)
model = build_model("mlp", DatasetInfo(num_classes=10, in_channels=1, image_size=8))
acc = Accumulator(model, dist.distributed_optimizer(torch.optim.SGD(model.parameters(), lr=0.01), model), dist.size())
summed = []
for step in range(12):
    batch = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    flag = torch.tensor([1.0 if r == 1 and step >= 5 else 0.0, 2.0])
    summed.append(acc.step(batch, 16 * dist.size(), 1, flag)[3].tolist())
with open(f"{out}/rank{r}.json", "w") as f:
    json.dump({"summed": summed}, f)

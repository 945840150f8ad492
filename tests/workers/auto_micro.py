"""Worker: schedule.max_micro_batch=auto with an injected slowdown, stopped after the probe and resumed.

Every micro-batch size but 8 sleeps SLOW seconds per forward pass, so of the candidates for the
per-worker batch 32 (32, 16, 8, 4) the probe must pick 8, although with no slowdown the largest is
the fastest. The run stops (with a checkpoint) after 20 steps, 4 steps past the probe (4 candidates
x (1 warm-up + 3 timed) steps), and a second trainer resumes it: it must not probe again.
"""

import json
import logging
import sys
import time

from adabatch_hvd import dist
from adabatch_hvd.config import Config
from adabatch_hvd.trainer import Trainer

out, run_dir = sys.argv[1], sys.argv[2]
FAST, SLOW = 8, 0.2
dist.init(threads=1)
logging.basicConfig(level=logging.INFO)  # as the CLI does: train.log gets the INFO lines


def config(resume=None, stop=0):
    cfg = Config()
    cfg.data.name, cfg.data.synthetic_samples, cfg.data.synthetic_shape = "synthetic", 2048, [1, 8, 8]
    cfg.data.test_samples = 256
    cfg.model.name = "mlp"
    s = cfg.schedule
    s.epochs, s.initial_batch, s.interval, s.max_micro_batch = 2, 64, 2, "auto"  # one stage, 32 steps per epoch
    cfg.run.run_dir, cfg.run.quiet, cfg.run.resume, cfg.run.stop_after_steps = run_dir, True, resume, stop
    return cfg


def train(cfg):
    trainer = Trainer(cfg)
    sizes = []

    def slow_down(module, inputs):
        if module.training:
            sizes.append(len(inputs[0]))
            if sizes[-1] != FAST:
                time.sleep(SLOW)

    trainer.model.register_forward_pre_hook(slow_down)
    trainer.fit()
    return {"sizes": sizes, "steps": trainer.state.global_step, "micro": trainer.state.micro.state_dict()}


first = train(config(stop=20))
second = train(config(resume="latest"))
with open(f"{out}/rank{dist.rank()}.json", "w") as f:
    json.dump({"first": first, "second": second}, f)

"""Issue 19's peer: the project's default job (`make train`, configs/fashion_mnist.yaml) written as a
PyTorch Lightning 2.6.6 user would write it, on DDP over Gloo.

The job: fmnist_cnn on Fashion-MNIST, 6 epochs, global batch 128 -> 256 -> 512 growing every 2
epochs, SGD (momentum 0.9, weight decay 5e-4, no Nesterov), LR 0.05 x (batch / 128) x 0.375^stage,
the training images randomly cropped (2 pixels of padding) and flipped as the package does (the
config's data.augment, true by default; --no-augment turns it off). Each process reads 64 samples per
micro-batch and accumulates 1, 2, 4 of them per step (GradientAccumulationScheduler; on 2 processes
the global batch is 128, 256, 512), so DDP allreduces once per optimizer step, as the package does.
The numbers are written out below as constants, the way a Lightning script would hold them; at the
start they are checked against the package's config and its per-epoch plan (Schedule.plan), and
rank 0 prints both LR columns side by side.

Shared with the package, so that only the training framework differs: the model
(adabatch_hvd.models.build_model, initialised after torch.manual_seed(seed) as trainer.py does), the
uint8 Fashion-MNIST tensors (adabatch_hvd.data.build_dataset), the normalisation (uint8 x * scale -
shift, the package's own constants, per batch) and the batched crop+flip (data._crop_flip; here the
offsets come from each rank's torch RNG rather than the package's per-sample hash). The data are a
plain TensorDataset in a DataLoader(batch_size=64, shuffle=True); Lightning replaces the sampler with
a DistributedSampler. The test set (10000 samples, 5000 per process) is the validation set of every
epoch, logged with sync_dist=True; each epoch's sums are also allreduced directly as a check that
every test sample counted once, and the run stops if the two disagree. The final test accuracy is
the last epoch's.

--compression fp16 passes DDP's fp16_compress_hook to DDPStrategy(ddp_comm_hook=...). Lightning 2.6.6
registers that hook on CUDA only and drops it silently on CPU, so the module registers it itself when
fit starts; the JSON's "ddp_comm_hook" is the hook DDP reports it runs.

Started once per host by a driver (Lightning's environment variables; it then starts no process of
its own):
    MASTER_ADDR=... MASTER_PORT=... NODE_RANK=r WORLD_SIZE=2 LOCAL_RANK=0 GLOO_SOCKET_IFNAME=eth0 \\
      $(benchmarks/lightning_env.sh) benchmarks/lightning_job.py --num-nodes 2 --out run.json
Rank 0 writes --out: {"fit_seconds", "process_start_to_fit", "epochs": [{"epoch", "val_acc",
"val_loss", "global_batch", "lr", ...}], "final_test_acc", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's adabatch_hvd: the Lightning environment does not install it

from adabatch_hvd.phases import process_start  # noqa: E402

STARTED = process_start()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# ---- the job, as a Lightning script writes it --------------------------------------------------
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist.yaml")  # the package's; only checked against
MODEL = "fmnist_cnn"
DATA = "fashion-mnist"
EPOCHS = 6
LR = 0.05  # at the first global batch
MOMENTUM, WEIGHT_DECAY, NESTEROV = 0.9, 5e-4, False
FIRST_BATCH, GROWTH, INTERVAL, LR_DECAY = 128, 2, 2, 0.375  # global batch x2 every 2 epochs; LR x2 x 0.375
MICRO_BATCH = 64  # per process
EVAL_BATCH = 256  # per process (the package's data.eval_batch)
PAD = 2  # the random crop's padding (the package's for Fashion-MNIST)


def stage_of(epoch: int, epochs: int) -> int:
    return min(epoch // INTERVAL, (epochs - 1) // INTERVAL)


def global_batch(epoch: int, epochs: int) -> int:
    return FIRST_BATCH * GROWTH ** stage_of(epoch, epochs)


def lr_of(epoch: int, epochs: int) -> float:
    """Linear scaling in the batch times the step decay at every stage boundary (no warmup)."""
    return LR * (global_batch(epoch, epochs) / FIRST_BATCH) * LR_DECAY ** stage_of(epoch, epochs)


def accumulation(epochs: int, world: int) -> dict:
    """{first epoch of a stage: micro-batches per optimizer step} for GradientAccumulationScheduler."""
    out = {}
    for e in range(0, epochs, INTERVAL):
        gb = global_batch(e, epochs)
        if gb % (world * MICRO_BATCH):
            raise SystemExit(f"global batch {gb} does not split into {world} x micro-batches of {MICRO_BATCH}")
        out[e] = gb // (world * MICRO_BATCH)
    return out


def check_against_package(epochs: int, world: int) -> list:
    """The constants above against configs/fashion_mnist.yaml, and the LR and batch of every epoch
    against the package's plan (what adabatch-plan prints) for this world size. Returns the table."""
    from adabatch_hvd import config

    cfg = config.from_args(CONFIG, {"schedule.epochs": epochs})
    s, o = cfg.schedule, cfg.optim
    ours = dict(model=MODEL, data=DATA, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=NESTEROV,
                initial_batch=FIRST_BATCH, growth_factor=GROWTH, interval=INTERVAL, lr_decay=LR_DECAY,
                max_micro_batch=MICRO_BATCH, eval_batch=EVAL_BATCH, warmup_epochs=0, mode="adaptive", scaling="linear")
    theirs = dict(model=cfg.model.name, data=cfg.data.name, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                  nesterov=o.nesterov, initial_batch=s.initial_batch, growth_factor=s.growth_factor,
                  interval=s.interval, lr_decay=s.lr_decay, max_micro_batch=s.max_micro_batch,
                  eval_batch=cfg.data.eval_batch, warmup_epochs=s.warmup_epochs, mode=s.mode, scaling=s.scaling)
    differ = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    if differ:
        raise SystemExit(f"lightning_job.py's constants differ from {CONFIG} (ours, package's): {differ}")
    rows = []
    for p in config.build_schedule(cfg).plan(world, MICRO_BATCH):
        row = dict(epoch=p.epoch, package_lr=p.lr, lightning_lr=lr_of(p.epoch, epochs),
                   package_global_batch=p.global_batch, lightning_global_batch=global_batch(p.epoch, epochs),
                   package_accum=p.accum_steps, lightning_accum=accumulation(epochs, world)[p.stage * INTERVAL])
        if not (math.isclose(row["package_lr"], row["lightning_lr"], rel_tol=1e-12)
                and row["package_global_batch"] == row["lightning_global_batch"]
                and row["package_accum"] == row["lightning_accum"] and p.micro_batch == MICRO_BATCH):
            raise SystemExit(f"epoch {p.epoch}: the package plans {p}, this job {row}")
        rows.append(row)
    return rows


# ---- Lightning ---------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num-nodes", type=int, default=int(os.environ.get("WORLD_SIZE", 1)),
                   help="hosts, one process each (default: $WORLD_SIZE, else 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compression", choices=["none", "fp16"], default="none",
                   help="fp16: DDP's fp16_compress_hook on the gradient allreduce")
    p.add_argument("--out", default=None, help="rank 0 writes the result JSON here")
    p.add_argument("--train-samples", type=int, default=None, help="the first N training samples only (smoke runs)")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--no-augment", action="store_true", help="no random crop and flip (the config augments)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)

    import lightning as L
    from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from adabatch_hvd.data import _crop_flip, build_dataset
    from adabatch_hvd.models import build_model

    lr_table = check_against_package(a.epochs, a.num_nodes)
    train_set = build_dataset(DATA, None, True, augment=False, seed=a.seed)  # the raw uint8 tensors
    test_set = build_dataset(DATA, None, False, augment=False, seed=a.seed)
    n_train = min(len(train_set), a.train_samples or len(train_set))
    scale, shift = train_set._scale, train_set._shift  # the package's normalisation: x * scale - shift
    augment = not a.no_augment

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x.float().mul_(scale).sub_(shift)

    class Job(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(a.seed)  # as adabatch_hvd/trainer.py does before build_model
            self.model = build_model(MODEL, train_set.info)
            self.records, self._sums, self._t0, self._step0 = [], None, 0.0, 0

        def on_fit_start(self):
            torch.manual_seed(a.seed * 1000 + 1 + self.global_rank)  # the package's per-rank stream
            ddp = self.trainer.strategy.model
            if hook is not None and self.device.type == "cpu":
                # Lightning 2.6.6 registers DDPStrategy's ddp_comm_hook on CUDA only (strategies/ddp.py
                # _register_ddp_hooks) and silently drops it on CPU; DDP itself runs it with Gloo.
                ddp.register_comm_hook(state=None, hook=hook)
            self.comm_hook = ddp._get_ddp_logging_data().get("comm_hook") or "none"  # what DDP really runs

        def on_train_epoch_start(self):
            self._t0, self._step0 = time.perf_counter(), self.trainer.global_step

        def training_step(self, batch, batch_idx):
            x, y = batch
            if batch_idx == 0:  # what this epoch runs with, as Lightning has set it
                self._epoch = dict(epoch=self.current_epoch, lr=self.trainer.optimizers[0].param_groups[0]["lr"],
                                   accumulate=self.trainer.accumulate_grad_batches,
                                   global_batch=len(y) * self.trainer.accumulate_grad_batches * self.trainer.world_size)
            if augment:
                shifts = torch.randint(0, 2 * PAD + 1, (len(x), 2))
                flips = torch.randint(0, 2, (len(x),)).bool()
                x = _crop_flip(x, shifts, flips, PAD)
            return F.cross_entropy(self.model(normalize(x)), y)

        def on_validation_epoch_start(self):
            self._sums, self._t_val = torch.zeros(3, dtype=torch.float64), time.perf_counter()

        def validation_step(self, batch, batch_idx):
            x, y = batch
            out = self.model(normalize(x))
            loss = F.cross_entropy(out, y, reduction="sum")
            correct = (out.argmax(1) == y).sum()
            self._sums += torch.stack([loss.double(), correct.double(), torch.tensor(len(y), dtype=torch.float64)])
            self.log("val_loss", loss / len(y), batch_size=len(y), sync_dist=True)
            self.log("val_acc", correct / len(y), batch_size=len(y), sync_dist=True)

        def on_validation_epoch_end(self):
            torch.distributed.all_reduce(self._sums)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                  nesterov=NESTEROV)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_of(e, a.epochs) / LR)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    class Record(Callback):
        """Each epoch's numbers, once Lightning has reduced the validation metrics."""

        def on_validation_end(self, trainer, job):
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            loss_sum, correct, count = job._sums.tolist()
            now = time.perf_counter()
            rec = dict(**job._epoch, val_acc=round(float(m["val_acc"]), 6), val_loss=round(float(m["val_loss"]), 6),
                       val_samples=int(count), exact_val_acc=correct / count, exact_val_loss=loss_sum / count,
                       steps=trainer.global_step - job._step0, train_seconds=round(job._t_val - job._t0, 3),
                       val_seconds=round(now - job._t_val, 3), seconds=round(now - job._t0, 3))
            if count != len(test_set) or abs(rec["val_acc"] - rec["exact_val_acc"]) > 1e-6 \
                    or abs(rec["val_loss"] - rec["exact_val_loss"]) > 1e-4 * max(1.0, rec["exact_val_loss"]):
                raise RuntimeError(f"epoch {rec['epoch']}: Lightning's validation metrics are not every test "
                                   f"sample once: {rec}")
            job.records.append(rec)
            if trainer.is_global_zero:
                print(f"epoch {rec['epoch']}: val_acc {rec['val_acc']:.4f} val_loss {rec['val_loss']:.4f} "
                      f"global batch {rec['global_batch']} lr {rec['lr']:.6g} steps {rec['steps']} "
                      f"{rec['train_seconds']:.1f} s + validation {rec['val_seconds']:.1f} s", flush=True)

    train = DataLoader(TensorDataset(train_set.images[:n_train], train_set.labels[:n_train]),
                       batch_size=MICRO_BATCH, shuffle=True)
    val = DataLoader(TensorDataset(test_set.images, test_set.labels), batch_size=EVAL_BATCH)
    if a.compression == "fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        hook = default_hooks.fp16_compress_hook
        strategy = DDPStrategy(process_group_backend="gloo", ddp_comm_hook=hook)
    else:
        hook = None
        strategy = DDPStrategy(process_group_backend="gloo")
    L.seed_everything(a.seed, verbose=False)  # also the DistributedSampler's seed (PL_GLOBAL_SEED)
    job = Job()
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=a.num_nodes, strategy=strategy, max_epochs=a.epochs,
                        callbacks=[GradientAccumulationScheduler(accumulation(a.epochs, a.num_nodes)), Record()],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    if trainer.is_global_zero:
        print(f"lightning {L.__version__}, torch {torch.__version__}, {a.num_nodes} processes x {a.threads} "
              f"thread(s), {n_train} training samples, compression {a.compression}, augment {augment}")
        print(" epoch  package lr  lightning lr  global batch (pkg/ours)  accumulation (pkg/ours)")
        for r in lr_table:
            print(f"{r['epoch']:>6}  {r['package_lr']:>10.6g}  {r['lightning_lr']:>12.6g}  "
                  f"{r['package_global_batch']:>11}/{r['lightning_global_batch']:<11}  "
                  f"{r['package_accum']:>11}/{r['lightning_accum']}", flush=True)
    to_fit = time.time() - STARTED
    t0 = time.perf_counter()
    trainer.fit(job, train_dataloaders=train, val_dataloaders=val)
    fit_seconds = time.perf_counter() - t0
    if len(job.records) != a.epochs:
        raise RuntimeError(f"{len(job.records)} epochs recorded, {a.epochs} expected")
    if trainer.is_global_zero:
        result = dict(fit_seconds=round(fit_seconds, 3), process_start_to_fit=round(to_fit, 3), epochs=job.records,
                      final_test_acc=job.records[-1]["val_acc"], framework=f"lightning {L.__version__}",
                      torch=str(torch.__version__), world_size=trainer.world_size, threads=a.threads,
                      compression=a.compression, ddp_comm_hook=job.comm_hook, augment=augment, seed=a.seed,
                      train_samples=n_train, test_samples=len(test_set), lr_table=lr_table)
        print(f"fit {fit_seconds:.1f} s (process start to fit {to_fit:.1f} s), final test accuracy "
              f"{result['final_test_acc']:.4f}, DDP comm hook {job.comm_hook}", flush=True)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            tmp = a.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump(result, f, indent=1)
            os.replace(tmp, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a person watching the run sees: log lines, a progress bar and TensorBoard (rank 0 only).

TensorBoard gets per-epoch scalars in RUN_DIR/tb (x axis: epoch) and, in RUN_DIR/tb/steps, scalars
on the x axis *samples seen*, which stays comparable when the batch grows: every run.log_every_steps
optimizer steps the train loss, LR, batch and throughput, and the world size at every (re)start and
change. They are separate event directories because TensorBoard purges the events of a crashed run
(or of steps an elastic rollback undid) by step number across every tag of a directory, and the two
axes number differently.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from . import rundir
from .config import Config, to_dict

log = logging.getLogger(__name__)

EPOCH_SCALARS = {  # TensorBoard tag -> metrics.jsonl field
    "train/loss": "train_loss", "train/acc": "train_acc", "test/loss": "test_loss", "test/acc": "test_acc",
    "lr": "lr", "batch/global": "global_batch", "batch/per_worker": "per_worker_batch",
    "batch/micro": "micro_batch", "batch/accum_steps": "accum_steps",
    "perf/samples_per_sec": "samples_per_second", "perf/epoch_seconds": "epoch_seconds",
    "perf/allreduce_wait_share": "allreduce_wait_share", "world_size": "world_size",
    "noise/b_noise": "b_noise", "noise/grad_sqr": "noise_grad_sqr", "noise/variance": "noise_variance",
}

STEP_SCALARS = ("step/train_loss", "step/lr", "step/global_batch", "step/samples_per_sec")


class Monitor:
    """Receives the trainer's events; does nothing on ranks other than 0."""

    def __init__(self, cfg: Config, main: bool, run_dir: Path, epoch_samples: int, epoch: int, offset: int,
                 resumed: bool):
        """Training goes on from sample `offset` of `epoch` (`epoch_samples` samples each); `resumed`:
        from a checkpoint."""
        self.cfg, self.main, self.run_dir, self.epoch_samples = cfg, main, run_dir, epoch_samples
        self.seen = epoch * epoch_samples + offset  # samples seen since the run began
        # Events beyond that point were written by a crashed run (resume) or by steps that an elastic
        # rollback undid; a point at exactly `seen` samples was logged before the checkpoint or commit.
        self._purge = {"": epoch if resumed else None, "steps": self.seen + 1}
        self.bar = None
        self.show_bar = main and not cfg.run.quiet and sys.stdout.isatty()
        self.step_seconds = self.sync_seconds = 0.0
        self.steps = 0  # optimizer steps taken by this process
        self._writers = {}

    def writer(self, sub: str = ""):
        """The TensorBoard writer of tb/ (or tb/SUB), made on first use so that a run that trains
        nothing writes no event file; events beyond where training goes on from are purged."""
        if sub not in self._writers:
            from torch.utils.tensorboard import SummaryWriter

            self._writers[sub] = SummaryWriter(log_dir=str(self.run_dir / rundir.TB / sub), purge_step=self._purge[sub])
        return self._writers[sub]

    def start(self, plans, world: int, epoch: int, global_step: int = 0) -> None:
        """(Re)start of the loop: at the beginning, after a resume and after every elastic reset."""
        if not self.main:
            return
        p = plans[0]
        log.info("world size %d; %d epochs; global batch %d -> %d; run dir %s", world, len(plans), p.global_batch,
                 plans[-1].global_batch, self.run_dir)
        if epoch or global_step:
            log.info("continuing at epoch %d, step %d", epoch, global_step)
        self.writer("steps").add_scalar("elastic/world_size", world, self.seen)

    def resize(self, event: dict) -> None:
        """A world-size change: a log line and a TensorBoard text where it took effect (samples seen)."""
        if not self.main:
            return
        text = (f"world size {event['from']} -> {event['to']} at step {event['global_step']} (epoch "
                f"{event['epoch']}, sample offset {event['offset']}); global batch and LR as planned")
        log.info(text)
        w = self.writer("steps")
        w.add_text("elastic", text, event["epoch"] * self.epoch_samples + event["offset"])
        w.flush()

    def stage(self, plan, previous) -> None:
        if not self.main or (previous is not None and previous.stage == plan.stage):
            return
        split = ("micro-batch auto" if self.cfg.schedule.max_micro_batch == "auto"
                 else f"{plan.accum_steps} x {plan.micro_batch}")
        text = (f"stage {plan.stage} from epoch {plan.epoch}: global batch {plan.global_batch} "
                f"({plan.per_worker_batch}/worker = {split}), lr {plan.lr:.5g}")
        if previous is not None:
            text += f" (was global batch {previous.global_batch}, lr {previous.lr:.5g})"
        log.info(text)
        self.writer().add_text("stage", text, plan.epoch)

    def micro_batch_choice(self, plan, seconds_per_sample: dict, chosen: int) -> None:
        """schedule.max_micro_batch=auto timed its candidates (slowest rank's seconds per sample)."""
        if not self.main:
            return
        tried = ", ".join(f"{m} (x{plan.per_worker_batch // m}) {1e6 * s:.0f} us/sample"
                          for m, s in seconds_per_sample.items())
        text = f"stage {plan.stage}: micro-batch auto: tried {tried}; chose {chosen}"
        log.info(text)
        self.writer().add_text("micro_batch", text, plan.epoch)
        self.writer().add_scalar("batch/micro_auto", chosen, plan.epoch)

    def epoch_start(self, plan, epoch_samples: int, offset: int) -> None:
        self.step_seconds = self.sync_seconds = 0.0
        self.plan = plan
        self.seen = plan.epoch * epoch_samples + offset
        self._window, self._window_start = [0, 0.0], time.perf_counter()  # samples, loss sum since the last point
        if self.show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=epoch_samples - offset, unit="sample", unit_scale=True, leave=False,
                            dynamic_ncols=True, desc=f"epoch {plan.epoch} B={plan.global_batch}")
            self.t0 = time.perf_counter()
            self.done = 0

    def step(self, size: int, loss: float, seconds: float, sync_seconds: float, lr: float, global_step: int,
             noise=None) -> None:
        """After each optimizer step: `size` samples (all ranks), rank 0's mean `loss`, the step's `lr`;
        `global_step` counts the run's steps (the points fall on the same steps after a resume); `noise`: the
        gradient noise scale's estimator (noise.NoiseScale), whose smoothed values go next to the global batch."""
        self.step_seconds += seconds
        self.sync_seconds += sync_seconds
        self.steps += 1
        self.seen += size
        every = self.cfg.run.log_every_steps
        if self.main and every:
            self._window[0] += size
            self._window[1] += loss * size
            if global_step % every == 0:
                now = time.perf_counter()
                samples, loss_sum = self._window
                w = self.writer("steps")
                w.add_scalar("step/train_loss", loss_sum / samples, self.seen)
                w.add_scalar("step/lr", lr, self.seen)
                w.add_scalar("step/global_batch", self.plan.global_batch, self.seen)
                w.add_scalar("step/samples_per_sec", samples / max(now - self._window_start, 1e-9), self.seen)
                for tag, value in (("b_noise", getattr(noise, "b_noise", None)),
                                   ("grad_sqr", getattr(noise, "grad_sqr", None)),
                                   ("variance", getattr(noise, "variance", None))):
                    if value is not None:
                        w.add_scalar(f"noise/{tag}", value, self.seen)
                self._window, self._window_start = [0, 0.0], now
        if self.bar is not None:
            self.done += size
            self.bar.update(size)
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{rate:.0f}", batch=self.plan.global_batch,
                                 accum=self.plan.accum_steps, refresh=False)

    def growth(self, decision: dict) -> None:
        """mode=noise grew the batch (growth.py logged it): a TensorBoard text where it takes effect."""
        if not self.main:
            return
        text = (f"global batch {decision['from_batch']} -> {decision['to_batch']} from epoch {decision['epoch']} "
                f"(step {decision['global_step']}): B_noise {decision['b_noise']:.1f} after {decision['checks']} checks, "
                f"lr {decision['lr']:.5g}")
        self.writer("steps").add_text("noise/growth", text, self.seen)

    def wait_share(self) -> float:
        return self.sync_seconds / self.step_seconds if self.step_seconds > 0 else 0.0

    def epoch(self, record: dict, tensorboard: bool = True) -> None:
        """An epoch's record: a log line and (unless it is already there) its TensorBoard scalars."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.main:
            return
        log.info("epoch %d: train loss %.4f acc %.4f | test loss %.4f acc %.4f | B=%d (%d x %d) lr %.4g | "
                 "%.1f s, %.0f samples/s", record["epoch"], record["train_loss"], record["train_acc"],
                 record["test_loss"], record["test_acc"], record["global_batch"], record["accum_steps"],
                 record["micro_batch"], record["lr"], record["epoch_seconds"], record["samples_per_second"] or 0)
        for tag, key in EPOCH_SCALARS.items():
            if tensorboard and record.get(key) is not None:
                self.writer().add_scalar(tag, record[key], record["epoch"])
        for w in self._writers.values():
            w.flush()

    def finish(self, final: dict | None) -> None:
        """The end of the run: hyperparameters with the final metrics, and where everything went."""
        if not self.main:
            return
        if final is not None:
            hp = {f"{section}.{k}": (v if isinstance(v, (int, float, str, bool)) else str(v))
                  for section, values in to_dict(self.cfg).items() for k, v in values.items()}
            metrics = {f"hparam/{k}": final[k] for k in ("test_acc", "test_loss", "train_loss")}
            self.writer().add_hparams(hp, metrics, run_name=".")
        d = self.run_dir
        log.info("metrics: %s | log: %s | config: %s | TensorBoard: %s | checkpoints: %s", d / rundir.METRICS,
                 d / rundir.LOG, d / rundir.CONFIG, d / rundir.TB, d / rundir.CHECKPOINTS)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for w in self._writers.values():
            w.close()
        self._writers = {}

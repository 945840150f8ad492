"""The AdaBatch training loop: load, step, evaluate, log, save.

Positions are (epoch, sample offset) into the epoch's permutation; the batch, micro-batch,
accumulation steps and LR of every epoch come from the schedule's plan, resolved for this world
size before anything trains. The rooms around the loop:

    state.py     what a checkpoint, an elastic commit and a resume capture and restore
    stepper.py   the epoch's steps on this rank: samples, micro-batches, one optimizer step each
    resume.py    a fresh start's agreement on the run dir, and the checkpoint it goes on from
    elastic.py   the world the loop runs in: fixed, or elastic with commits and rollbacks
    growth.py    schedule.mode=noise: when the batch grows, from the gradient noise scale (noise.py)
    rundir.py    the run dir's files: lock, records, train.log, config history
    monitor.py   log lines and TensorBoard
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from . import checkpoint, dist, phases, rundir, runlock
from .accumulation import Accumulator
from .config import Config, build_schedule, dump_yaml, to_dict
from .data import build_dataset
from .elastic import ElasticWorld, FixedWorld
from .errors import NonFiniteLoss, UserError
from .growth import Growth, replay
from .models import build_model, has_batchnorm, place
from .monitor import Monitor
from .noise import NoiseScale
from .resume import Resume, agree
from .sampler import sample_digest
from .signals import StopRequest
from .state import Components, TrainState, rng_state
from .stepper import Stepper, evaluate

log = logging.getLogger(__name__)

__all__ = ["Trainer", "TrainState"]


def pick_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
    # A rank bound to its own GPU (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank) sees it as cuda:0;
    # a rank that sees the node's GPUs takes the one of its local rank.
    visible, local = torch.cuda.device_count(), dist.local_rank()
    index = 0 if visible == 1 else local
    if index >= visible:
        raise UserError(f"local rank {local} sees {visible} GPUs, fewer than the ranks on its host; give each rank "
                        f"its own GPU (--gpus-per-task=1) or all of them, or start fewer ranks per host")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def library_versions() -> dict:
    from importlib import metadata

    from . import __version__

    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses to unpickle. torchvision's
    # from its metadata: importing it would cost rank 0 about 2 s in the first epoch.
    return {"adabatch_hvd": __version__, "torch": str(torch.__version__), "torchvision": metadata.version("torchvision"),
            "horovod": dist.horovod_version()}


class Trainer:
    """Owns the model, optimizer, data and position of one run on this rank.

    The constructor only builds; `sync()` does the collectives (run-dir agreement, resume, rank 0's
    state everywhere) and `bind_world()` binds whatever depends on the world size and rank. Elastic
    runs call both again after every reset (see elastic.py).
    """

    def __init__(self, cfg: Config, threads=None):
        """`threads`: dist.init's choice of torch threads, logged (once per host) when training starts."""
        self.cfg = cfg
        self.threads = threads
        self.stop = StopRequest()  # first: a SIGTERM during set-up stops the run at its first step
        self.device = pick_device(cfg.run.device)
        self.schedule = self.base_schedule = build_schedule(cfg)  # schedule: with the growth decided so far
        self.run_dir = Path(cfg.run.run_dir)
        self.ckpt_dir = self.run_dir / rundir.CHECKPOINTS
        d = cfg.data
        kw = dict(seed=cfg.run.seed, synthetic_samples=d.synthetic_samples,
                  synthetic_shape=tuple(d.synthetic_shape), synthetic_classes=d.synthetic_classes,
                  pin_memory=self.device.type == "cuda")
        self.train_set = build_dataset(d.name, d.root, True, augment=d.augment, **kw)
        self.test_set = build_dataset(d.name, d.root, False, augment=False, **kw)
        self.n_train = min(len(self.train_set), d.train_samples or len(self.train_set))
        self.n_test = min(len(self.test_set), d.test_samples or len(self.test_set))
        phases.mark("data")
        if cfg.run.elastic and not dist.elastic_launch():
            raise UserError("run.elastic needs an elastic launch: launch/run-elastic.sh (horovodrun --min-np "
                            "--max-np --host-discovery-script, Gloo); drop --elastic for a fixed world size")

        torch.manual_seed(cfg.run.seed)  # the same init everywhere; rank 0's is broadcast anyway
        m = cfg.model
        self.model = place(build_model(m.name, self.train_set.info), self.device, m.channels_last, m.cudnn_benchmark)
        torch.manual_seed(cfg.run.seed * 1000 + 1 + dist.rank())  # per-rank stream for dropout etc.
        o = cfg.optim
        # lr and backward passes are set before every step, from the plan of the world at that time
        base = torch.optim.SGD(self.model.parameters(), lr=self.schedule.lr_at(0), momentum=o.momentum,
                               weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.optimizer = dist.distributed_optimizer(base, self.model, compression=cfg.comm.compression)
        # On CUDA, auto also survives out-of-memory errors: the ranks agree on them after each step's passes.
        # The step's scalars (stop flag, noise-scale inputs) ride on its gradient exchange; an elastic run gives them
        # an allreduce of their own (a host dying mid-step left the survivors' fused Gloo buffers of different sizes).
        self.acc = Accumulator(self.model, self.optimizer, dist.size(), precision=o.precision, noise=True,
                               fuse=not cfg.run.elastic,
                               oom_guard=cfg.schedule.max_micro_batch == "auto" and self.device.type == "cuda")
        # fp16: the scaler's state travels with the train state, and so does the noise scale's
        self.state = TrainState(scaler=self.acc.scaler, noise=NoiseScale(cfg.schedule.noise_half_life))
        self.growth = Growth(self.base_schedule, self.n_train)
        self.components = Components(self.model, self.optimizer, self.state)
        self.resume = Resume(cfg, self.run_dir, self.components, self.train_set.info.num_classes, self.n_train)
        self.stepper = Stepper(cfg, self.train_set, self.n_train, self.acc, self.state, self.device, self.ckpt_dir)
        self.records, self.train_log = rundir.Records(self.run_dir), rundir.RunLog()
        self.monitor = None
        self.hold = None  # the run dir's lock and checks (rundir.RunDir; its token on every rank)
        self.trained = False  # this process took an optimizer step
        self.started = False  # set by the first sync(): the run dir is agreed on and the position known
        self.resize = None  # the world-size change (in state.resizes) whose first step is not done yet
        self.workers = (ElasticWorld(self.components, self.sync, self.bind_world) if cfg.run.elastic
                        else FixedWorld(self.sync, self.bind_world))
        self.bind_world()
        phases.mark("model")

    def bind_world(self) -> None:
        """Bind everything that depends on the world size and this process's rank: the plans, the
        accumulator's loss scale and rank 0's duties (log file, metrics, TensorBoard, checkpoints)."""
        self.rank, self.world = dist.rank(), dist.size()
        self.main = self.rank == 0
        self._plan()
        if self.n_train < self.world:
            raise UserError(f"the training set has {self.n_train} samples, fewer than {self.world} workers")
        self.acc.world_size = self.world
        self._close_files()
        if self.started:
            if self.main and not self.hold.lock.holds():  # elastic: this process became rank 0
                self.hold.lock.acquire()
            # rank 0's train.log, with the lines held since the start, unless there is nothing to train
            self.train_log.open(self.run_dir / rundir.LOG if self.main and self.state.epoch < self.schedule.epochs else None)
            self.monitor = Monitor(self.cfg, self.main, self.run_dir, self.n_train, self.state.epoch, self.state.offset,
                                   resumed=bool(self.cfg.run.resume))
        self.stepper.bind(self.rank, self.world, self.monitor)

    def _plan(self) -> None:
        """Every epoch's numbers for this world, with the growth decided so far (mode noise)."""
        self.schedule = replay(self.base_schedule, self.state.growth)
        # A world size the user did not choose (elastic) may not divide the global batch: uneven shares.
        self.plans = self.schedule.plan(self.world, self.cfg.schedule.max_micro_batch, even=not self.workers.elastic)

    def _close_files(self) -> None:
        monitor, self.monitor = self.monitor, None
        try:
            if monitor is not None:
                monitor.close()  # may raise (a full disk): the log file is closed all the same
        finally:
            self.train_log.close()

    def sync(self) -> None:
        """The collectives of a start: agree on the run dir and load the resume point (a fresh job
        only), then give every rank the weights, optimizer state and train state (partial sums
        included) of the first rank already training: rank 0, or the oldest survivor of a reset."""
        cfg = self.cfg
        started = dist.allgather_object(self.started, name="started")
        root = started.index(True) if True in started else 0
        fresh = not started[root]
        if fresh:
            if self.main:
                self.train_log.hold()
                self.hold = rundir.RunDir(self.run_dir, runlock.new_token())
            target = agree(lambda: self.hold.claim(cfg.run.resume) if self.main else None)
            target = dist.broadcast_object(target, name="resume_target")
            if target:
                self.resume.load(target, self.rank, self.world)
        token = dist.broadcast_object(self.hold.lock.token if self.hold else None, root, name="run_lock_token")
        if self.hold is None:
            self.hold = rundir.RunDir(self.run_dir, token)  # to take the lock over if this rank becomes rank 0
        self.components.broadcast(root)
        if not self.started:
            self.started = True
            self.bind_world()
        self._plan()  # the growth decisions of the state loaded
        st = self.state
        if fresh and self.main and st.epoch < self.schedule.epochs:
            rundir.write_config(self.run_dir, dump_yaml(cfg), self.resume.changes,
                                {"epoch": st.epoch, "offset": st.offset, "global_step": st.global_step})
        elif fresh and self.main:  # a finished run resumed with no more epochs: leave its files alone
            log.info("nothing to train: the checkpoint is at the end of epoch %d and --epochs is %d; give "
                     "--epochs %d or more to train further", st.epoch - 1, self.schedule.epochs, st.epoch + 1)
        if fresh and self.main:
            if has_batchnorm(self.model) and (self.stepper.auto or any(p.accum_steps > 1 for p in self.plans)):
                log.warning("%s has BatchNorm: with gradient accumulation it normalizes each micro-batch, "
                            "not the global batch, so accumulated updates are not exactly the large-batch "
                            "ones", cfg.model.name)
        self._note_world()
        self.workers.started()
        phases.mark("agreement")  # the run dir, the resume point, rank 0's state everywhere

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> None:
        """Train to the end of the schedule (or run.stop_after_steps)."""
        failed = True
        try:
            self.workers.run(self._fit)  # sync(), then the loop; elastic: again after every reset
            failed = False
        finally:
            try:
                self._close_files()  # may fail again on a full disk
            finally:
                if self.hold is not None and self.main:  # a start that failed before its first step leaves nothing
                    self.hold.release(undo=failed and not self.trained)

    def _fit(self) -> None:
        st = self.state
        if st.epoch >= self.schedule.epochs and not st.record_pending:
            return  # nothing to train (sync said so): no TensorBoard session, no log line in train.log
        self._note_world()  # after a graceful removal there is no sync()
        self.monitor.start(self.plans, self.world, st.epoch, st.global_step)
        phases.mark("tensorboard")
        if self.threads is not None and dist.local_rank() == 0:  # once per host and process
            log.info("torch threads per rank: %d (%s)", self.threads.count, self.threads.source)
            self.threads = None
        if st.record_pending:
            self._publish_epoch(again=True)
        steps = 0  # this process's steps
        while st.epoch < self.schedule.epochs:
            plan = self.plans[st.epoch]
            if st.offset == 0 or steps == 0:
                self.monitor.stage(plan, self.plans[st.epoch - 1] if st.epoch and steps else None)
            finished, steps = self._train_epoch(plan, steps)
            if not finished:
                break  # a stop request or run.stop_after_steps; the checkpoint holds the position
            self._end_epoch(plan)
        phases.mark("training")  # first step to last, with every epoch's evaluation and checkpoint
        self.monitor.finish(st.last_record if st.epoch == self.schedule.epochs else None)

    def _train_epoch(self, plan, steps: int):
        cfg, n, st = self.cfg, self.n_train, self.state
        t0 = time.perf_counter()
        self.monitor.epoch_start(plan, n, st.offset)
        local = torch.zeros(4, dtype=torch.float64)  # this rank's sums since the last fold
        for item in self.stepper.remaining(plan):
            t_step = time.perf_counter()
            lr = self.schedule.lr_at(st.epoch + item.step.start / n)
            result = self.stepper.run(plan, item, lr, self.stop.flag())  # the flag rides on the step's exchange
            if result is None:
                continue  # a rank ran out of memory; nothing was updated: the step is redone smaller
            local += result.sums
            st.offset, st.global_step = item.step.start + item.step.size, st.global_step + 1
            steps += 1
            self.trained = True
            phases.mark("first step", log=log if self.main else None)
            self.growth.after_step(st, self.schedule, item.step.start, st.offset)
            self.monitor.step(item.step.size, result.loss, time.perf_counter() - t_step, self.acc.sync_seconds, lr,
                              st.global_step, st.noise)
            self.stepper.tune(plan, time.perf_counter() - t_step, item.step.size)
            if self.resize is not None:
                self._report_resize()
            if self.stop.agree(result.flags) or steps == cfg.run.stop_after_steps:
                self._fold(local, time.perf_counter() - t0)
                self._save()  # a clean stop keeps its exact position
                dist.barrier()  # no rank exits (and makes the launcher kill the others) before it is written
                if self.stop.agreed and self.main:
                    log.info("stop requested (%s): stopped at epoch %d, sample offset %d, step %d, with a "
                             "checkpoint", self.stop.received or "by another rank", st.epoch, st.offset,
                             st.global_step)
                return False, steps
            save = cfg.checkpoint.every_steps and st.global_step % cfg.checkpoint.every_steps == 0
            commit = self.workers.elastic and st.global_step % cfg.run.commit_every == 0
            if (save or commit) and st.offset < n:
                self._fold(local, time.perf_counter() - t0)
                local.zero_()
                t0 = time.perf_counter()
                if save:
                    self._save()
                if commit:
                    self.workers.commit()  # may raise HostsUpdatedInterrupt: a planned reset from here
        self._fold(local, time.perf_counter() - t0)
        return True, steps

    def _fold(self, local, seconds):
        """Add this rank's running sums into the globally reduced epoch totals."""
        self.state.partial += dist.allreduce_sum(local, name="train_sums")
        self.state.partial_seconds += seconds

    # ---- world-size changes ----------------------------------------------------------------
    def _note_world(self) -> None:
        """Record a change of world size in the state (a rollback keeps or drops it with the training
        it belongs to), in the log and in TensorBoard; its timing is added after the first step."""
        st = self.state
        if st.world_size and st.world_size != self.world:
            self.resize = {"global_step": st.global_step, "epoch": st.epoch, "offset": st.offset,
                           "from": st.world_size, "to": self.world}
            st.resizes.append(self.resize)
            self.monitor.resize(self.resize)
        st.world_size = self.world

    def _report_resize(self) -> None:
        """The first step on a new world is done: when, and how long after the reset began."""
        self.resize["wall_time"] = time.time()
        if self.workers.interrupted_at is not None:
            self.resize["recovery_seconds"] = round(time.monotonic() - self.workers.interrupted_at, 3)
            self.workers.interrupted_at = None
            if self.main:
                log.info("training again on %d workers %.2f s after the reset began", self.world,
                         self.resize["recovery_seconds"])
        self.resize = None

    # ---- the end of an epoch ---------------------------------------------------------------
    def _end_epoch(self, plan) -> None:
        st = self.state
        loss_sum, correct, count, digest = st.partial.tolist()
        test_loss, test_acc = self.evaluate()
        seconds = st.partial_seconds
        record = {
            "epoch": st.epoch, "stage": plan.stage, "global_batch": plan.global_batch,
            "per_worker_batch": plan.per_worker_batch, "micro_batch": self.stepper.micro_batch(plan),
            "accum_steps": self.stepper.accum_steps(plan), "lr": plan.lr,
            "train_loss": loss_sum / count, "train_acc": correct / count,
            "test_loss": test_loss, "test_acc": test_acc,
            "epoch_seconds": seconds, "samples_per_second": count / seconds if seconds > 0 else None,
            "world_size": self.world, "global_step": st.global_step,
            "allreduce_wait_share": self.monitor.wait_share(),  # rank 0's share of step time in optimizer.step()
            "world_size_changes": st.resizes, "samples_used": int(count), "sample_digest": int(digest),
            "b_noise": st.noise.b_noise, "noise_grad_sqr": st.noise.grad_sqr, "noise_variance": st.noise.variance,
        }
        expected = sample_digest(range(self.n_train), st.epoch)
        if (int(count), int(digest)) != (self.n_train, expected) and self.main:
            log.error("epoch %d used %d samples with digest %d; every sample once would be %d with digest %d",
                      st.epoch, count, digest, self.n_train, expected)
        tried = self.stepper.tried(plan)  # what the stage's micro-batch was chosen from (auto)
        if tried:
            record["micro_batch_tried"] = tried
        decision = self.growth.at_epoch_end(st, self.schedule, self.main)
        if decision is not None:
            record["growth"] = decision
            self.monitor.growth(decision)
        st.epoch, st.offset = st.epoch + 1, 0
        self._plan()
        st.partial.zero_()
        st.partial_seconds = 0.0
        st.resizes = []
        st.last_record, st.record_pending = record, True
        self.workers.commit()
        self._publish_epoch()

    def _publish_epoch(self, again: bool = False) -> None:
        """Write the finished epoch's record and checkpoint; `again`: after a reset, which may have
        published it already."""
        st = self.state
        # A failure right after the epoch's commit rolls back to a state that publishes the record again.
        # metrics.jsonl is written after TensorBoard, so a record there is in TensorBoard too (also when
        # the rank 0 that wrote it is gone): no second point.
        done = again and self.main and self.records.has(st.last_record["epoch"], st.last_record["global_step"])
        self.monitor.epoch(st.last_record, tensorboard=not done)
        if self.main and not done:
            self.records.append(st.last_record)
        st.record_pending = False
        self._save()

    def evaluate(self):
        d = self.cfg.data
        return evaluate(self.model, self.test_set, self.n_test, self.rank, self.world, d.eval_batch, d.workers,
                        self.device)

    def _save(self) -> None:
        # Parameters are identical on every rank after each step, so all ranks agree on this check.
        st = self.state
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLoss(f"the weights became NaN/Inf by epoch {st.epoch}, step {st.global_step}; lower "
                                f"the learning rate (optim.lr={self.cfg.optim.lr}); the last good checkpoint in "
                                f"{self.ckpt_dir} is kept")
        rng = dist.allgather_object(rng_state())  # every rank's generators, in rank order
        if self.main:
            state = {**self.components.capture(), "stage": self.plans[min(st.epoch, len(self.plans) - 1)].stage,
                     "model_name": self.cfg.model.name, "num_classes": self.train_set.info.num_classes,
                     "n_train": self.n_train, "config": to_dict(self.cfg), "versions": library_versions(), "rng": rng}
            path = checkpoint.save(state, self.ckpt_dir, self.cfg.checkpoint.keep, protect=self.resume.loaded_from)
            log.info("checkpoint %s (epoch %d, offset %d)", path, st.epoch, st.offset)

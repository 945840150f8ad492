"""The AdaBatch training loop: load, step, evaluate, log, save.

Positions are (epoch, sample offset) into the epoch's permutation; the batch, micro-batch,
accumulation steps and LR of every epoch come from the schedule's plan, resolved for this world
size before anything trains.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import logging.handlers
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, dist, rundir, runlock, sampler
from .accumulation import Accumulator
from .config import Config, build_schedule, dump_yaml, resume_changes, to_dict
from .data import build_dataset
from .errors import NonFiniteLoss, UserError
from .microbatch import MicroBatchTuner
from .models import build_model, has_batchnorm
from .monitor import Monitor
from .signals import StopRequest

log = logging.getLogger(__name__)


def pick_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=cpu")
    torch.cuda.set_device(dist.local_rank())
    return torch.device("cuda", dist.local_rank())


def library_versions() -> dict:
    import horovod
    import torchvision

    from . import __version__

    # str(): torch.__version__ is a TorchVersion, which weights_only loading refuses to unpickle
    return {"adabatch_hvd": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "horovod": str(horovod.__version__)}


@dataclass
class TrainState:
    """Where the run stands, besides the weights and optimizer: what a resume or a reset restores.

    Rank 0's copy is the truth: `Trainer.sync` broadcasts it, because after a restart or an elastic
    reset rank 0 may be another process.
    """

    epoch: int = 0
    offset: int = 0  # samples of this epoch's permutation already trained on
    global_step: int = 0
    partial: torch.Tensor = field(default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    """this epoch's (loss_sum, correct, count, sample digest) up to `offset`, reduced over all ranks"""
    partial_seconds: float = 0.0
    world_size: int = 0  # the world size this state was trained with (0: not yet)
    resizes: list = field(default_factory=list)  # this epoch's world-size changes
    last_record: dict | None = None  # the last finished epoch's metrics
    record_pending: bool = False  # last_record is not written out yet (an elastic reset came first)
    micro: MicroBatchTuner = field(default_factory=MicroBatchTuner)
    """schedule.max_micro_batch=auto: the micro-batch chosen per stage (a resume does not probe again)"""
    scaler: torch.amp.GradScaler | None = None
    """optim.precision=fp16: the accumulator's gradient scaler, whose scale and growth tracker are saved,
    broadcast and committed with the rest, so that a resume or a rollback scales as the run would have"""

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "global_step": self.global_step,
                "partial_sums": self.partial.clone(), "partial_seconds": self.partial_seconds,
                "world_size": self.world_size, "resizes": copy.deepcopy(self.resizes),
                "last_record": copy.deepcopy(self.last_record), "record_pending": self.record_pending,
                "micro_batch": self.micro.state_dict(),
                **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset, self.global_step = state["epoch"], state["offset"], state["global_step"]
        sums = state["partial_sums"].double()
        self.partial = torch.cat([sums, torch.zeros(4 - len(sums), dtype=torch.float64)])  # 3 before digests
        self.partial_seconds = state["partial_seconds"]
        self.world_size = state["world_size"]
        self.resizes = copy.deepcopy(state.get("resizes", []))  # .get: checkpoints of earlier versions
        self.last_record = copy.deepcopy(state.get("last_record"))
        self.record_pending = state.get("record_pending", False)
        self.micro.load_state_dict(state.get("micro_batch", {}))
        if self.scaler is not None and state.get("grad_scaler"):  # none: fp32/bf16 or an earlier version
            self.scaler.load_state_dict(state["grad_scaler"])


class Trainer:
    """Owns the model, optimizer, data and position of one run on this rank.

    The constructor only builds; `sync()` does the collectives (run-dir agreement, resume, rank 0's
    state everywhere) and `bind_world()` binds whatever depends on the world size and rank. Elastic
    runs call both again after every reset (see dist.ElasticState).
    """

    def __init__(self, cfg: Config, threads=None):
        """`threads`: dist.init's choice of torch threads, logged (once per host) when training starts."""
        self.cfg = cfg
        self.threads = threads
        self.stop = StopRequest()  # first: a SIGTERM during set-up stops the run at its first step
        self.device = pick_device(cfg.run.device)
        self.schedule = build_schedule(cfg)
        self.run_dir = Path(cfg.run.run_dir)
        self.ckpt_dir = self.run_dir / rundir.CHECKPOINTS
        d = cfg.data
        kw = dict(seed=cfg.run.seed, synthetic_samples=d.synthetic_samples,
                  synthetic_shape=tuple(d.synthetic_shape), synthetic_classes=d.synthetic_classes)
        self.train_set = build_dataset(d.name, d.root, True, augment=d.augment, **kw)
        self.test_set = build_dataset(d.name, d.root, False, augment=False, **kw)
        self.n_train = min(len(self.train_set), d.train_samples or len(self.train_set))
        self.n_test = min(len(self.test_set), d.test_samples or len(self.test_set))
        if cfg.run.elastic and not dist.elastic_launch():
            raise UserError("run.elastic needs an elastic launch: launch/run-elastic.sh (horovodrun --min-np "
                            "--max-np --host-discovery-script, Gloo); drop --elastic for a fixed world size")

        torch.manual_seed(cfg.run.seed)  # the same init everywhere; rank 0's is broadcast anyway
        self.model = build_model(cfg.model.name, self.train_set.info).to(self.device)
        torch.manual_seed(cfg.run.seed * 1000 + 1 + dist.rank())  # per-rank stream for dropout etc.
        o = cfg.optim
        # lr and backward passes are set before every step, from the plan of the world at that time
        base = torch.optim.SGD(self.model.parameters(), lr=self.schedule.lr_at(0), momentum=o.momentum,
                               weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.optimizer = dist.distributed_optimizer(base, self.model, compression=cfg.comm.compression)
        self.auto_micro = cfg.schedule.max_micro_batch == "auto"
        # On CUDA, auto also survives out-of-memory errors: the ranks agree on them after each step's passes.
        self.acc = Accumulator(self.model, self.optimizer, dist.size(),
                               oom_guard=self.auto_micro and self.device.type == "cuda", precision=o.precision)
        self.state = TrainState(scaler=self.acc.scaler)  # fp16: the scaler's state travels with the train state
        self.resumed_from = None  # pruning keeps it for as long as this process runs
        self.config_changes = {}  # rank 0: what a resume changed, {key: (old, new)}
        self.monitor, self.log_file = None, None
        self.log_buffer = None  # rank 0's log lines of a start, for train.log once it is known that the start trains
        self.hold = None  # the run dir's lock and checks (rundir.RunDir; its token on every rank)
        self.trained = False  # this process took an optimizer step
        self.started = False  # set by the first sync(): the run dir is agreed on and the position known
        self.elastic = dist.ElasticState(self) if cfg.run.elastic else None
        self.committed = None  # elastic: the in-memory copy a failure rolls back to
        self.interrupted_at = None  # elastic: when this process last saw a worker leave or join
        self.resize = None  # the world-size change (in state.resizes) whose first step is not done yet
        self.bind_world()

    def bind_world(self) -> None:
        """Bind everything that depends on the world size and this process's rank: the plans, the
        accumulator's loss scale and rank 0's duties (log file, metrics, TensorBoard, checkpoints)."""
        self.rank, self.world = dist.rank(), dist.size()
        self.main = self.rank == 0
        # A world size the user did not choose (elastic) may not divide the global batch: uneven shares.
        self.plans = self.schedule.plan(self.world, self.cfg.schedule.max_micro_batch, even=self.elastic is None)
        if self.n_train < self.world:
            raise UserError(f"the training set has {self.n_train} samples, fewer than {self.world} workers")
        self.acc.world_size = self.world
        self._close_files()
        if self.started:
            if self.main and not self.hold.lock.holds():  # elastic: this process became rank 0
                self.hold.lock.acquire()
            self._open_files()

    def _open_files(self) -> None:
        """Rank 0's train.log (with the lines buffered since the start) unless there is nothing to train,
        which leaves the run dir's files as they were; every rank's monitor."""
        st, package = self.state, logging.getLogger("adabatch_hvd")
        if self.main and st.epoch < self.schedule.epochs:
            self.log_file = logging.FileHandler(self.run_dir / rundir.LOG)
            self.log_file.setFormatter(logging.root.handlers[0].formatter if logging.root.handlers else None)
            package.addHandler(self.log_file)
            if self.log_buffer is not None:
                self.log_buffer.setTarget(self.log_file)
                self.log_buffer.flush()
        if self.log_buffer is not None:
            package.removeHandler(self.log_buffer)
            self.log_buffer = None
        self.monitor = Monitor(self.cfg, self.main, self.run_dir, self.n_train, st.epoch, st.offset,
                               resumed=bool(self.cfg.run.resume))

    def _close_files(self) -> None:
        monitor, self.monitor = self.monitor, None
        try:
            if monitor is not None:
                monitor.close()  # may raise (a full disk): the log file is closed all the same
        finally:
            if self.log_file is not None:
                logging.getLogger("adabatch_hvd").removeHandler(self.log_file)
                self.log_file.close()
                self.log_file = None

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
                self.log_buffer = logging.handlers.MemoryHandler(100000, logging.CRITICAL + 1)
                logging.getLogger("adabatch_hvd").addHandler(self.log_buffer)
                self.hold = rundir.RunDir(self.run_dir, runlock.new_token())
            target = _agree(lambda: self.hold.claim(cfg.run.resume) if self.main else None)
            target = dist.broadcast_object(target, name="resume_target")
            if target:
                self._resume(target)
        token = dist.broadcast_object(self.hold.lock.token if self.hold else None, root, name="run_lock_token")
        if self.hold is None:
            self.hold = rundir.RunDir(self.run_dir, token)  # to take the lock over if this rank becomes rank 0
        dist.broadcast_state(self.model, self.optimizer, root=root)
        self.state.load_state_dict(dist.broadcast_object(self.state.state_dict(), root, name="train_state"))
        if not self.started:
            self.started = True
            self.bind_world()
        st = self.state
        if fresh and self.main and st.epoch < self.schedule.epochs:
            rundir.write_config(self.run_dir, dump_yaml(cfg), self.config_changes,
                                {"epoch": st.epoch, "offset": st.offset, "global_step": st.global_step})
        elif fresh and self.main:  # a finished run resumed with no more epochs: leave its files alone
            log.info("nothing to train: the checkpoint is at the end of epoch %d and --epochs is %d; give "
                     "--epochs %d or more to train further", st.epoch - 1, self.schedule.epochs, st.epoch + 1)
        if fresh and self.main:
            if has_batchnorm(self.model) and (self.auto_micro or any(p.accum_steps > 1 for p in self.plans)):
                log.warning("%s has BatchNorm: with gradient accumulation it normalizes each micro-batch, "
                            "not the global batch, so accumulated updates are not exactly the large-batch "
                            "ones", cfg.model.name)
        self._note_world()
        if self.elastic is not None:
            self.commit_save()

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

    # ---- elastic commits -------------------------------------------------------------------
    def commit_save(self) -> None:
        """Keep a copy of everything a rollback restores, in this process's memory."""
        self.committed = copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                        "state": self.state.state_dict(), "rng": _rng_state()})

    def commit_restore(self) -> None:
        """Undo everything since the last commit (a worker failed mid-step)."""
        c = copy.deepcopy(self.committed)  # loaded tensors are used in place; keep the commit intact
        self.model.load_state_dict(c["model"])
        self.optimizer.load_state_dict(c["optimizer"])  # also resets Horovod's per-gradient pass counters
        self.optimizer.zero_grad()
        self.state.load_state_dict(c["state"])
        _set_rng_state(c["rng"])

    # ---- the loop --------------------------------------------------------------------------
    def fit(self) -> None:
        """Train to the end of the schedule (or run.stop_after_steps)."""
        failed = True
        try:
            if self.elastic is not None:
                dist.run_elastic(self._fit, self.elastic)
            else:
                self.sync()
                self._fit()
            failed = False
        finally:
            try:
                self._close_files()  # may fail again on a full disk
            finally:
                if self.hold is not None and self.main:  # a start that failed before its first step leaves nothing
                    self.hold.release(undo=failed and not self.trained)

    def _fit(self, _elastic_state=None) -> None:
        """The loop; in elastic runs it is entered again after every reset, from the synced state."""
        st = self.state
        if st.epoch >= self.schedule.epochs and not st.record_pending:
            return  # nothing to train (sync said so): no TensorBoard session, no log line in train.log
        self._note_world()  # after a graceful removal there is no sync()
        self.monitor.start(self.plans, self.world, st.epoch, st.global_step)
        if self.threads is not None and dist.local_rank() == 0:  # once per host and process
            log.info("torch threads per rank: %d (%s)", self.threads.count, self.threads.source)
            self.threads = None
        try:
            if st.record_pending:
                self._publish_epoch(again=True)
            steps_this_process = 0
            while st.epoch < self.schedule.epochs:
                plan = self.plans[st.epoch]
                if st.offset == 0 or steps_this_process == 0:
                    self.monitor.stage(plan, self.plans[st.epoch - 1] if st.epoch and steps_this_process else None)
                finished, steps_this_process = self._train_epoch(plan, steps_this_process)
                if not finished:
                    break  # a stop request or run.stop_after_steps; the checkpoint holds the position
                self._end_epoch(plan)
        except dist.ELASTIC_INTERRUPTS as e:
            if self.elastic is None:
                raise  # no commit to roll back to: the job ends (cli.py says so in one line)
            self.interrupted_at = time.monotonic()
            if isinstance(e, dist.HostsUpdatedInterrupt):
                log.warning("hosts changed: the workers re-form at step %d (just committed)", st.global_step)
            else:
                log.warning("a worker was lost at step %d (%s): rolling back to the commit at step %d",
                            st.global_step, (str(e).strip() or type(e).__name__).splitlines()[0],
                            self.committed["state"]["global_step"])
            raise
        self.monitor.finish(st.last_record if st.epoch == self.schedule.epochs else None)

    def _train_epoch(self, plan, steps_this_process):
        cfg, n, st = self.cfg, self.n_train, self.state
        t0 = time.perf_counter()
        self.monitor.epoch_start(plan, n, st.offset)
        local = torch.zeros(4, dtype=torch.float64)
        for step, size, samples, micro in self._steps(plan):
            self._set_lr(self.schedule.lr_at(st.epoch + step.start / n))
            t_step = time.perf_counter()
            # The stop flag rides on the step's gradient exchange; an elastic run agrees on it with a collective of
            # its own (a host dying mid-step left the survivors' fused Gloo buffers of different sizes: see README).
            flag = self.stop.flag() if self.elastic is None else None
            result = self.acc.step(micro, step.size, sampler.passes_per_step(step, self.world, size), flag)
            if result is None:  # a rank ran out of memory; nothing was updated: redo the step smaller
                self._out_of_memory(plan, size)
                continue
            loss_sum, correct, count, flags = result
            step_loss = float(loss_sum) / max(count, 1)
            if not math.isfinite(step_loss):
                lr = self.optimizer.param_groups[0]["lr"]
                raise NonFiniteLoss(f"training loss is {step_loss} at epoch {st.epoch}, step {st.global_step} "
                                    f"(lr {lr:.4g}, global batch {plan.global_batch}); lower the learning rate "
                                    f"(optim.lr={cfg.optim.lr}) or lengthen the warmup; the last good checkpoint "
                                    f"in {self.ckpt_dir} is kept")
            digest = sampler.sample_digest(samples, st.epoch)
            local += torch.tensor([float(loss_sum), float(correct), float(count), digest], dtype=torch.float64)
            st.offset, st.global_step = step.start + step.size, st.global_step + 1
            steps_this_process += 1
            self.trained = True
            self.monitor.step(step.size, step_loss, time.perf_counter() - t_step, self.acc.sync_seconds,
                              self.optimizer.param_groups[0]["lr"], st.global_step)
            if self.auto_micro and st.micro.probing and st.micro.record((time.perf_counter() - t_step) / step.size):
                self._choose_micro_batch(plan)
            if self.resize is not None:
                self._report_resize()
            stop = self.stop.agree(flags) if flag is not None else self.stop.check()
            if stop or steps_this_process == cfg.run.stop_after_steps:
                self._fold(local, time.perf_counter() - t0)
                self._save()  # a clean stop keeps its exact position
                dist.barrier()  # no rank exits (and makes the launcher kill the others) before it is written
                if self.stop.agreed and self.main:
                    log.info("stop requested (%s): stopped at epoch %d, sample offset %d, step %d, with a "
                             "checkpoint", self.stop.received or "by another rank", st.epoch, st.offset,
                             st.global_step)
                return False, steps_this_process
            save = cfg.checkpoint.every_steps and st.global_step % cfg.checkpoint.every_steps == 0
            commit = self.elastic is not None and st.global_step % cfg.run.commit_every == 0
            if (save or commit) and st.offset < n:
                self._fold(local, time.perf_counter() - t0)
                local.zero_()
                t0 = time.perf_counter()
                if save:
                    self._save()
                if commit:
                    self.elastic.commit()  # may raise HostsUpdatedInterrupt: a planned reset from here
        self._fold(local, time.perf_counter() - t0)
        return True, steps_this_process

    def _micro_batch(self, plan) -> int:
        return self.state.micro.size(plan.stage, plan.per_worker_batch) if self.auto_micro else plan.micro_batch

    def _steps(self, plan):
        """The epoch's remaining steps, each with its micro-batch size, this rank's sample ids and its
        micro-batches (loaded lazily). When the size changes, or a step is to be redone, the rest is split anew."""
        n, st = self.n_train, self.state
        order = sampler.permutation(n, self.cfg.run.seed, st.epoch)
        while st.offset < n:
            size = self._micro_batch(plan)
            steps = sampler.steps(n, plan.global_batch, self.world, st.offset)
            shares = [sampler.micro_batches(sampler.rank_slice(s, self.world, self.rank), size) for s in steps]
            batches = self.train_set.iterate([[order[i] for i in m] for share in shares for m in share], st.epoch,
                                             self.cfg.data.workers)
            for step, share in zip(steps, shares):
                yield step, size, [order[i] for m in share for i in m], (
                    (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                    for x, y in itertools.islice(batches, len(share)))
                if st.offset != step.start + step.size or self._micro_batch(plan) != size:
                    break

    def _choose_micro_batch(self, plan) -> None:
        """Every candidate of the stage has been timed: rank 0 picks from all ranks' timings, all keep it."""
        slowest = MicroBatchTuner.slowest(dist.allgather_object(self.state.micro.timings(), name="micro_batch_timings"))
        size = dist.broadcast_object(MicroBatchTuner.decide(slowest) if self.main else None, name="micro_batch_choice")
        self.state.micro.choose(size, slowest)
        self.monitor.micro_batch_choice(plan, slowest, size)

    def _out_of_memory(self, plan, size: int) -> None:
        smaller = self.state.micro.out_of_memory(plan.stage, plan.per_worker_batch, size)
        if self.main:
            log.warning("out of memory at micro-batch %d (stage %d, %d per worker): the step is redone with "
                        "micro-batch %d", size, plan.stage, plan.per_worker_batch, smaller)

    def _fold(self, local, seconds):
        """Add this rank's running sums into the globally reduced epoch totals."""
        self.state.partial += dist.allreduce_sum(local, name="train_sums")
        self.state.partial_seconds += seconds

    def _report_resize(self) -> None:
        """The first step on a new world is done: when, and how long after the reset began."""
        self.resize["wall_time"] = time.time()
        if self.interrupted_at is not None:
            self.resize["recovery_seconds"] = round(time.monotonic() - self.interrupted_at, 3)
            self.interrupted_at = None
            if self.main:
                log.info("training again on %d workers %.2f s after the reset began", self.world,
                         self.resize["recovery_seconds"])
        self.resize = None

    def _end_epoch(self, plan) -> None:
        st = self.state
        loss_sum, correct, count, digest = st.partial.tolist()
        test_loss, test_acc = self.evaluate()
        seconds = st.partial_seconds
        record = {
            "epoch": st.epoch, "stage": plan.stage, "global_batch": plan.global_batch,
            "per_worker_batch": plan.per_worker_batch, "micro_batch": self._micro_batch(plan),
            "accum_steps": -(-plan.per_worker_batch // self._micro_batch(plan)) if self.auto_micro else plan.accum_steps,
            "lr": plan.lr,
            "train_loss": loss_sum / count, "train_acc": correct / count,
            "test_loss": test_loss, "test_acc": test_acc,
            "epoch_seconds": seconds, "samples_per_second": count / seconds if seconds > 0 else None,
            "world_size": self.world, "global_step": st.global_step,
            "allreduce_wait_share": self.monitor.wait_share(),  # rank 0's share of step time in optimizer.step()
            "world_size_changes": st.resizes, "samples_used": int(count), "sample_digest": int(digest),
        }
        expected = sampler.sample_digest(range(self.n_train), st.epoch)
        if (int(count), int(digest)) != (self.n_train, expected) and self.main:
            log.error("epoch %d used %d samples with digest %d; every sample once would be %d with digest %d",
                      st.epoch, count, digest, self.n_train, expected)
        tried = self.state.micro.tried.get(MicroBatchTuner.key(plan.stage, plan.per_worker_batch))
        if self.auto_micro and tried:  # what the stage's micro-batch was chosen from
            record["micro_batch_tried"] = {str(m): t for m, t in tried.items()}
        st.epoch, st.offset = st.epoch + 1, 0
        st.partial.zero_()
        st.partial_seconds = 0.0
        st.resizes = []
        st.last_record, st.record_pending = record, True
        if self.elastic is not None:
            self.elastic.commit()
        self._publish_epoch()

    def _publish_epoch(self, again: bool = False) -> None:
        """Write the finished epoch's record and checkpoint; `again`: after a reset, which may have
        published it already."""
        st, path = self.state, self.run_dir / rundir.METRICS
        # A failure right after the epoch's commit rolls back to a state that publishes the record again.
        # metrics.jsonl is written after TensorBoard, so a record there is in TensorBoard too (also when
        # the rank 0 that wrote it is gone): no second point. Matched by epoch and step, not by content:
        # the copy restored may come from another rank, whose timings differ.
        key = (st.last_record["epoch"], st.last_record["global_step"])
        done = again and self.main and any((r["epoch"], r.get("global_step")) == key
                                           for r in rundir.read_metrics(path))
        self.monitor.epoch(st.last_record, tensorboard=not done)
        if self.main and not done:
            _write_record(path, st.last_record)
        st.record_pending = False
        self._save()

    @torch.no_grad()
    def evaluate(self):
        """Test loss and accuracy from allreduced sums over every test sample exactly once."""
        self.model.eval()
        mine = list(range(self.rank, self.n_test, self.world))
        chunks = [mine[i : i + self.cfg.data.eval_batch] for i in range(0, len(mine), self.cfg.data.eval_batch)]
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in self.test_set.iterate(chunks, 0, self.cfg.data.workers):
            x, y = x.to(self.device), y.to(self.device)
            out = self.model(x)
            sums[0] += torch.nn.functional.cross_entropy(out, y, reduction="sum").double()
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
        loss_sum, correct, count = dist.allreduce_sum(sums.cpu(), name="eval_sums").tolist()
        return loss_sum / count, correct / count

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            **self.state.state_dict(),
            "stage": self.plans[min(self.state.epoch, len(self.plans) - 1)].stage,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "model_name": self.cfg.model.name, "num_classes": self.train_set.info.num_classes, "n_train": self.n_train,
            "config": to_dict(self.cfg), "versions": library_versions(),
        }

    def _save(self) -> None:
        # Parameters are identical on every rank after each step, so all ranks agree on this check.
        st = self.state
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise NonFiniteLoss(f"the weights became NaN/Inf by epoch {st.epoch}, step {st.global_step}; lower "
                                f"the learning rate (optim.lr={self.cfg.optim.lr}); the last good checkpoint in "
                                f"{self.ckpt_dir} is kept")
        rng = dist.allgather_object(_rng_state())  # every rank's generators, in rank order
        if self.main:
            state = self.state_dict()
            state["rng"] = rng
            path = checkpoint.save(state, self.ckpt_dir, self.cfg.checkpoint.keep, protect=self.resumed_from)
            log.info("checkpoint %s (epoch %d, offset %d)", path, st.epoch, st.offset)

    def _resume(self, target) -> None:
        """Rank 0 loads the checkpoint; every rank learns whether its saved RNG applies. The train
        state and weights reach the other ranks through the broadcasts of sync()."""
        state = _agree(lambda: self._load_checkpoint(target) if self.main else None)
        if self.main:
            self.state.load_state_dict(state)
        saved = dist.broadcast_object(None if state is None else {k: state[k] for k in ("rng", "world_size")},
                                      name="resume_rng")
        if saved["world_size"] == self.world and self.rank < len(saved["rng"]):
            _set_rng_state(saved["rng"][self.rank])

    def _load_checkpoint(self, target) -> dict:
        """Rank 0: read the checkpoint into the model and optimizer; return its state."""
        try:
            state, path = checkpoint.load(target, self.ckpt_dir)
        except checkpoint.NoUsableCheckpoint:
            if target != "latest":
                raise
            raise rundir.cannot_continue(self.run_dir) from None
        if state["model_name"] != self.cfg.model.name or state["num_classes"] != self.train_set.info.num_classes:
            raise UserError(f"checkpoint {path} is for model '{state['model_name']}' with "
                            f"{state['num_classes']} classes, not '{self.cfg.model.name}' with "
                            f"{self.train_set.info.num_classes}; use a fresh run.run_dir or the matching model")
        self.config_changes = resume_changes(state["config"], self.cfg, state["epoch"], state["offset"])
        if state.get("n_train", self.n_train) != self.n_train:
            raise UserError(f"the training set has {self.n_train} samples, but checkpoint {path} was trained on "
                            f"{state['n_train']} (is data.root another copy of the data?); give the same data, "
                            f"or start a fresh run.run_dir")
        if state["world_size"] != self.world:
            self.config_changes["world_size"] = (state["world_size"], self.world)
        for key, (old, new) in self.config_changes.items():
            log.info("resume changes %s: %r -> %r", key, old, new)
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise UserError(f"checkpoint {path} does not fit model '{self.cfg.model.name}': "
                            f"{str(e).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        metrics = self.run_dir / rundir.METRICS
        rundir.truncate_metrics(metrics, state["epoch"])
        last = state.get("last_record")
        if last and all(r["epoch"] != last["epoch"] for r in rundir.read_metrics(metrics)):
            _write_record(metrics, last)
            log.warning("%s lacked the record of epoch %d: restored it from checkpoint %s", metrics, last["epoch"],
                        path)
        if path.parent.resolve() == self.ckpt_dir.resolve():
            checkpoint.make_current(path)
        self.resumed_from = path
        log.info("resuming from %s: epoch %d, sample offset %d, step %d (saved with world size %d)", path,
                 state["epoch"], state["offset"], state["global_step"], state["world_size"])
        return state


def _write_record(path: Path, record: dict) -> None:
    """Append an epoch's record, replacing one of the same epoch (written before an elastic reset)."""
    rundir.truncate_metrics(path, record["epoch"])
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _agree(fn):
    """Run a check that only some ranks can do; if it fails anywhere, raise the same UserError on
    every rank, so that all of them exit with code 2 instead of some waiting forever."""
    try:
        result, error = fn(), None
    except UserError as e:
        result, error = None, str(e)
    errors = [e for e in dist.allgather_object(error) if e]
    if errors:
        raise UserError(errors[0])
    return result


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

"""What a run is, in memory: the train state, and the one definition of what a checkpoint, an elastic
commit, a resume and a start's broadcast capture and restore.

Every component owns its state (`state_dict`/`load_state_dict`): the model, the optimizer and the
`TrainState`, which carries the position, the epoch's running sums, the micro-batch tuner and the
gradient scaler. `Components.capture()` is the flat dict all of them save into, so a checkpoint is
a capture plus facts about the run, and a commit is a capture plus this rank's RNG.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from . import dist
from .microbatch import MicroBatchTuner
from .noise import NoiseScale


@dataclass
class TrainState:
    """Where the run stands, besides the weights and optimizer: what a resume or a reset restores.

    Rank 0's copy is the truth: `Components.broadcast` sends it, because after a restart or an
    elastic reset rank 0 may be another process.
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
    noise: NoiseScale = field(default_factory=NoiseScale)  # the gradient noise scale's smoothed estimates
    noise_streak: int = 0  # mode=noise: checks passed in a row
    growth: list = field(default_factory=list)  # mode=noise: the decisions taken, oldest first (growth.py)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "global_step": self.global_step,
                "partial_sums": self.partial.clone(), "partial_seconds": self.partial_seconds,
                "world_size": self.world_size, "resizes": copy.deepcopy(self.resizes),
                "last_record": copy.deepcopy(self.last_record), "record_pending": self.record_pending,
                "micro_batch": self.micro.state_dict(), "noise_scale": self.noise.state_dict(),
                "noise_streak": self.noise_streak, "growth": copy.deepcopy(self.growth),
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
        if "noise_scale" in state:  # not in checkpoints of earlier versions: the estimate starts afresh
            self.noise.load_state_dict(state["noise_scale"])
        self.noise_streak = state.get("noise_streak", 0)
        self.growth = copy.deepcopy(state.get("growth", []))
        if self.scaler is not None and state.get("grad_scaler"):  # none: fp32/bf16 or an earlier version
            self.scaler.load_state_dict(state["grad_scaler"])


class Components:
    """The model, the optimizer and the train state: captured and restored together, everywhere."""

    def __init__(self, model: torch.nn.Module, optimizer, state: TrainState):
        self.model, self.optimizer, self.state = model, optimizer, state

    def capture(self) -> dict:
        """The flat dict a checkpoint holds (besides facts about the run) and a commit copies."""
        return {**self.state.state_dict(), "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def restore(self, saved: dict) -> None:
        """Load a capture (or a checkpoint). The model goes first: it raises if the weights don't fit."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])  # also resets Horovod's per-gradient pass counters
        self.state.load_state_dict(saved)

    def broadcast(self, root: int) -> None:
        """Give every rank rank `root`'s weights, optimizer state and train state (partial sums included)."""
        dist.broadcast_state(self.model, self.optimizer, root=root)
        self.state.load_state_dict(dist.broadcast_object(self.state.state_dict(), root, name="train_state"))

    def commit(self) -> dict:
        """A copy of everything a rollback restores, this rank's RNG included, kept in memory."""
        return copy.deepcopy({**self.capture(), "rng": rng_state()})

    def rollback(self, committed: dict) -> None:
        """Undo everything since `committed` (a worker failed mid-step)."""
        c = copy.deepcopy(committed)  # loaded tensors are used in place; keep the commit intact
        self.restore(c)
        self.optimizer.zero_grad()
        set_rng_state(c["rng"])


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

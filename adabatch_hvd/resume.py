"""The collectives of a fresh start: agree on the run dir, and load the checkpoint to go on from.

Rank 0 alone reads the run dir and the checkpoint; whatever it finds wrong is raised as the same
UserError on every rank (`agree`), so that all of them exit with code 2 and none waits forever.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import checkpoint, dist, rundir
from .config import resume_changes
from .errors import UserError
from .state import Components, set_rng_state

log = logging.getLogger(__name__)


def agree(fn):
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


class Resume:
    """Where a fresh start goes on from, and what it changes: `load` on every rank of a start."""

    def __init__(self, cfg, run_dir: Path, components: Components, num_classes: int, n_train: int):
        self.cfg, self.run_dir, self.components = cfg, Path(run_dir), components
        self.ckpt_dir = self.run_dir / rundir.CHECKPOINTS
        self.num_classes, self.n_train = num_classes, n_train
        self.loaded_from = None  # the checkpoint resumed from: pruning keeps it for as long as this process runs
        self.changes = {}  # rank 0: what the resume changed, {key: (old, new)}

    def load(self, target, rank: int, world: int) -> None:
        """Rank 0 loads the checkpoint into the components; every rank learns whether its saved RNG
        applies. The weights and train state reach the other ranks through `Components.broadcast`."""
        main = rank == 0
        state = agree(lambda: self._load(target, world) if main else None)
        saved = dist.broadcast_object(None if state is None else {k: state[k] for k in ("rng", "world_size")},
                                      name="resume_rng")
        if saved["world_size"] == world and rank < len(saved["rng"]):
            set_rng_state(saved["rng"][rank])

    def _load(self, target, world: int) -> dict:
        """Rank 0: check the checkpoint against this run, restore it, and put the run dir's records and
        checkpoint index where it left them."""
        cfg = self.cfg
        try:
            state, path = checkpoint.load(target, self.ckpt_dir)
        except checkpoint.NoUsableCheckpoint:
            if target != "latest":
                raise
            raise rundir.cannot_continue(self.run_dir) from None
        if state["model_name"] != cfg.model.name or state["num_classes"] != self.num_classes:
            raise UserError(f"checkpoint {path} is for model '{state['model_name']}' with "
                            f"{state['num_classes']} classes, not '{cfg.model.name}' with "
                            f"{self.num_classes}; use a fresh run.run_dir or the matching model")
        self.changes = resume_changes(state["config"], cfg, state["epoch"], state["offset"])
        if state.get("n_train", self.n_train) != self.n_train:
            raise UserError(f"the training set has {self.n_train} samples, but checkpoint {path} was trained on "
                            f"{state['n_train']} (is data.root another copy of the data?); give the same data, "
                            f"or start a fresh run.run_dir")
        if state["world_size"] != world:
            self.changes["world_size"] = (state["world_size"], world)
        for key, (old, new) in self.changes.items():
            log.info("resume changes %s: %r -> %r", key, old, new)
        try:
            self.components.restore(state)
        except RuntimeError as e:
            raise UserError(f"checkpoint {path} does not fit model '{cfg.model.name}': "
                            f"{str(e).splitlines()[0]}") from None
        rundir.Records(self.run_dir).resume_at(state["epoch"], state.get("last_record"), path)
        if path.parent.resolve() == self.ckpt_dir.resolve():
            checkpoint.make_current(path)
        self.loaded_from = path
        log.info("resuming from %s: epoch %d, sample offset %d, step %d (saved with world size %d)", path,
                 state["epoch"], state["offset"], state["global_step"], state["world_size"])
        return state

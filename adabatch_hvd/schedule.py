"""AdaBatch stage schedule: per-epoch global batch, micro-batching and learning rate.

Pure Python (no torch, no horovod), so every stage, world size and edge case is testable in
milliseconds. `ScheduleConfig` is the config's `schedule:` section (settings, defaults, help);
`Schedule` is that section plus optim.lr, checked, with the rules below.

The rule (Devarakonda, Naumov, Garland, arXiv 1712.02029): the global batch r starts at B0 and
grows by a factor at stage boundaries (every `interval` epochs, or at explicit epochs), up to a
maximum. The learning rate follows a scaling rule in the batch (linear keeps alpha/r constant)
combined with the ordinary step decay at the same boundaries. With linear scaling, doubling and
`lr_decay=0.375` this is the paper's CIFAR recipe: AdaBatch multiplies the LR by 2 x 0.375 = 0.75
at each doubling, while the fixed-batch baseline (`mode="fixed"`) multiplies it by 0.375 at the
same epochs, so alpha/r follows the same path in both runs.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import FrozenInstanceError, dataclass, field, fields, replace
from typing import List, Optional, Sequence, Tuple, Union

from .errors import UserError

MAX_EPOCHS = 100_000  # the plan holds one entry per epoch; far more than any real run
MAX_BATCH = 2**40  # ~10^12 samples: more than any data set, and well inside int64

SCALING_RULES = {
    "linear": lambda ratio: ratio,  # Goyal et al.: alpha proportional to B
    "sqrt": math.sqrt,  # Krizhevsky 2014 / Hoffer et al.: alpha proportional to sqrt(B)
    "none": lambda ratio: 1.0,
}
MODES = ("adaptive", "fixed", "noise")
CHECKS_PER_EPOCH = 4  # mode=noise: the gradient noise scale is checked at every quarter of an epoch


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch runs with, resolved for a world size and a micro-batch cap."""

    epoch: int
    stage: int
    global_batch: int
    per_worker_batch: int
    micro_batch: int
    accum_steps: int
    lr: float


def _f(default, help: str, **kw):
    """A config field with its default and --help text; `parse` (optional) reads the raw YAML/flag value.
    (config.py declares its sections with it too: this module sits below config.py and holds one.)"""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ScheduleConfig:
    """The `schedule:` section: batch growth, LR rule and the per-worker memory cap.

    The one definition of these settings, their defaults and their checks: a `Schedule` is this
    section plus the base learning rate (optim.lr), and is checked whole when it is built.
    """

    epochs: int = _f(6, "number of epochs")
    initial_batch: int = _f(128, "initial global batch B0 (all workers together)")
    growth_factor: float = _f(2.0, "batch multiplier at each stage boundary")
    interval: int = _f(2, "epochs per stage (ignored when stages is given)")
    stages: List[str] = _f([], "explicit stages as epoch:global_batch, e.g. 0:128,20:256 (overrides interval); "
                               "in YAML also a mapping {0: 128, 20: 256}", parse=lambda v: _stage_list(v))
    max_batch: Optional[int] = _f(None, "largest global batch; growth stops there")
    mode: str = _f("adaptive", "adaptive (AdaBatch: grow every `interval` epochs or at `stages`), fixed (baseline: "
                               "same LR decay, constant batch) or noise (grow by growth_factor at an epoch's end "
                               "when the measured gradient noise scale says so, see noise_multiple; the LR decays "
                               "every `interval` epochs as in the other modes)")
    scaling: str = _f("linear", "LR scaling rule in the batch: linear, sqrt or none")
    lr_decay: float = _f(0.375, "LR step decay at each stage boundary (paper: 0.375; AdaBatch x2 gives 0.75)")
    warmup_epochs: float = _f(0.0, "linear LR warmup length in epochs (Goyal et al.); 0 = off")
    warmup_start_factor: float = _f(0.1, "warmup starts at this fraction of the LR")
    reference_batch: Optional[int] = _f(None, "if set, optim.lr is the LR per this many samples (e.g. 256)")
    noise_multiple: float = _f(1.0, "mode=noise: grow when the smoothed gradient noise scale B_noise is at least "
                                    "this multiple of the next global batch ...")
    noise_checks: int = _f(4, "mode=noise: ... at this many checks in a row (4 per epoch, at every quarter); the "
                              "batch grows at the end of the epoch of the last one, at most max_batch")
    noise_half_life: float = _f(50000.0, "samples over which the noise scale's moving averages halve (measured in "
                                         "every mode; checks count only after this many samples)")
    noise_every: int = _f(8, "measure the noise scale on every N-th optimizer step (the run's step count divisible by "
                             "N); each measurement stands for the N steps' samples. 1: every step (less noise in "
                             "the estimate; a measured step costs about 0.2-1 ms more on a CPU)")
    max_micro_batch: Optional[Union[int, str]] = _f(
        None, "per-worker memory cap: larger per-worker batches are accumulated; 'auto' times a few divisors of "
              "the per-worker batch at the start of each stage and keeps the fastest that fits (on CUDA an "
              "out-of-memory error halves it and redoes the step)", metavar="N|auto")

    def __post_init__(self):
        if isinstance(self.max_micro_batch, str) and self.max_micro_batch != "auto":
            raise UserError(f"schedule.max_micro_batch must be a number > 0 or 'auto', got '{self.max_micro_batch}'")


@dataclass
class Schedule(ScheduleConfig):
    """The AdaBatch schedule of a run: the `schedule:` section's settings (stages parsed into
    ((epoch, global_batch), ...)) plus the base learning rate; `resolve`/`plan` turn it into
    per-epoch numbers. Every setting is checked here, once; a Schedule cannot be changed once built."""

    lr: float = None  # optim.lr; required (None only because the fields above have defaults)
    grown: Tuple[int, ...] = ()  # mode=noise: the epochs at which the batch grew, as decided while training

    @classmethod
    def of(cls, section: ScheduleConfig, lr: float) -> "Schedule":
        """The schedule of a config's `schedule:` section and its optim.lr."""
        return cls(**{f.name: getattr(section, f.name) for f in fields(ScheduleConfig)}, lr=lr)

    def __setattr__(self, name, value):
        if self.__dict__.get("_built"):
            raise FrozenInstanceError(f"cannot assign to field {name!r}: a Schedule is fixed once built")
        super().__setattr__(name, value)

    def __post_init__(self):
        super().__post_init__()
        if self.lr is None:
            raise TypeError("Schedule() needs the learning rate: lr=... (optim.lr)")
        self.stages = parse_stages(self.stages)
        self.grown = tuple(int(e) for e in self.grown)
        if self.mode == "noise":
            if self.stages:
                raise UserError("schedule.mode=noise decides the stages while training; drop schedule.stages")
            if not self.noise_multiple > 0 or not self.noise_multiple < math.inf:
                raise UserError(f"schedule.noise_multiple must be a finite number > 0, got {self.noise_multiple}")
            if self.noise_checks < 1:
                raise UserError(f"schedule.noise_checks must be >= 1, got {self.noise_checks}")
        if not 1 <= self.noise_every <= 2**31:
            raise UserError(f"schedule.noise_every must be a whole number of steps >= 1, got {self.noise_every}")
        if not self.noise_half_life > 0 or not self.noise_half_life < math.inf:
            raise UserError(f"schedule.noise_half_life must be a finite number of samples > 0, got "
                            f"{self.noise_half_life}")
        if not 0 < self.epochs <= MAX_EPOCHS:
            raise UserError(f"schedule.epochs must be > 0, got {self.epochs}" if self.epochs <= 0 else
                            f"schedule.epochs must be at most {MAX_EPOCHS}, got {self.epochs}")
        check_lr(self.lr)
        if self.mode not in MODES:
            raise UserError(f"unknown schedule.mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.scaling not in SCALING_RULES:
            raise UserError(f"unknown schedule.scaling {self.scaling!r} (the LR scaling rule); choose one of "
                            f"{', '.join(SCALING_RULES)}")
        if not 0 < self.lr_decay <= 1:
            raise UserError(f"schedule.lr_decay must be in (0, 1], got {self.lr_decay} (1 means no step decay)")
        if not 0 <= self.warmup_epochs < math.inf:
            raise UserError(f"schedule.warmup_epochs must be a finite number >= 0, got {self.warmup_epochs}")
        if not 0 < self.warmup_start_factor <= 1:
            raise UserError(f"schedule.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}")
        if self.reference_batch is not None and self.reference_batch <= 0:
            raise UserError(f"schedule.reference_batch must be > 0, got {self.reference_batch}")
        if self.stages:
            self._check_stages()
        else:
            if self.initial_batch <= 0:
                raise UserError(f"schedule.initial_batch must be > 0, got {self.initial_batch}")
            if self.interval <= 0:
                raise UserError(f"schedule.interval must be > 0 epochs, got {self.interval}")
            if self.mode == "adaptive" and not self.growth_factor > 1:
                raise UserError(f"schedule.growth_factor must be > 1, got {self.growth_factor} "
                                f"(use schedule.mode=fixed for a constant batch)")
            if not self.growth_factor < math.inf:
                raise UserError(f"schedule.growth_factor must be a finite number, got {self.growth_factor}")
        if self.max_batch is not None and self.max_batch < self.first_batch:
            raise UserError(f"schedule.max_batch {self.max_batch} is below the initial batch {self.first_batch}; "
                            f"raise schedule.max_batch or lower the initial batch")
        decay_epochs = range(0, self.epochs, self.interval) if self.mode == "noise" else ()  # its LR decays there
        for e in sorted({*self.boundaries(), *decay_epochs}):  # non-integral growth (e.g. 1.5 x 5) shows up here
            stage, batch, lr = self.stage_of(e), self.global_batch(e), self.lr_at(e)
            if batch > MAX_BATCH:
                raise _too_big(e, stage)
            if not 0 < lr < math.inf:
                raise UserError(f"the learning rate becomes {lr} at epoch {e} (stage {stage}); it must stay a finite "
                                f"number > 0: change optim.lr, schedule.lr_decay or schedule.scaling")
        self._built = True

    def _check_stages(self):
        epochs = [e for e, _ in self.stages]
        if epochs[0] != 0:
            raise UserError(f"schedule.stages: the first stage must start at epoch 0, got "
                            f"'{epochs[0]}:{self.stages[0][1]}'")
        if any(b <= a for a, b in zip(epochs, epochs[1:])):
            raise UserError(f"schedule.stages: stage epochs must be strictly increasing, got {epochs}")
        for e, b in self.stages:
            if b <= 0:
                raise UserError(f"schedule.stages: stage '{e}:{b}' has a batch <= 0; every global batch must be "
                                f"positive")

    # ---- stages --------------------------------------------------------------------------
    def grow_at(self, epoch: int) -> "Schedule":
        """mode=noise: this schedule with one more stage, from `epoch` on (a decision taken while training)."""
        return replace(self, grown=(*self.grown, epoch))

    def can_grow(self, epoch: int) -> bool:
        """mode=noise: whether a stage from `epoch` on would have a larger batch (max_batch bounds it)."""
        return self.mode == "noise" and epoch < self.epochs and self.grow_at(epoch).global_batch(epoch) > \
            self.global_batch(epoch)

    @property
    def first_batch(self) -> int:
        return self.stages[0][1] if self.stages else self.initial_batch

    def boundaries(self) -> Sequence[int]:
        """Epochs at which a stage starts (0 included); the LR decays at every later one."""
        if self.stages:
            return [e for e, _ in self.stages if e < self.epochs]
        if self.mode == "noise":
            return [0, *(e for e in self.grown if e < self.epochs)]
        return range(0, self.epochs, self.interval)

    def stage_of(self, epoch: float) -> int:
        if self.stages or self.mode == "noise":
            return bisect.bisect_right(self.boundaries(), epoch) - 1
        return self._timetable_stage(epoch)

    def _timetable_stage(self, epoch: float) -> int:
        """The stage of `epoch` on the timetable of `interval` epochs per stage."""
        last = (self.epochs - 1) // self.interval
        return min(int(epoch // self.interval), last) if epoch >= 0 else -1

    def decays(self, epoch: int) -> int:
        """How many times the LR has had its step decay by `epoch`: at every stage boundary after the first, and in
        mode noise every `interval` epochs whatever the batch, as the timetable and the fixed baseline decay it.
        So the LR is the same function of (epoch, batch) in every mode, and a noise run differs from a timetable
        only in when its batch grows: one that never grows is the fixed baseline, one that grows at every interval
        is the timetable. (Were the decay tied to growth, a run that has not grown would keep its first LR, and
        the noise scale, which rises as the LR falls, would rise more slowly and hold the growth back.)"""
        return self._timetable_stage(epoch) if self.mode == "noise" else self.stage_of(epoch)

    def global_batch(self, epoch: int) -> int:
        stage = self.stage_of(epoch)
        if self.mode == "fixed":
            batch = self.first_batch
        elif self.stages:
            batch = self.stages[stage][1]
        else:
            g = self.growth_factor
            limit = self.max_batch or MAX_BATCH
            if stage * math.log(g) > math.log(limit) + 1:  # far beyond the cap: don't compute g**stage
                if self.max_batch is None:
                    raise _too_big(epoch, stage)
                return self.max_batch
            exact = self.initial_batch * (int(g) ** stage if float(g).is_integer() else g**stage)
            if self.max_batch is not None and exact >= self.max_batch:
                return self.max_batch
            batch = round(exact)
            if abs(batch - exact) > 1e-6 * exact:
                raise UserError(
                    f"schedule.growth_factor {self.growth_factor} from batch {self.initial_batch} gives a "
                    f"non-integer batch {exact:g} at stage {stage}; use an integer factor or schedule.stages"
                )
        return min(batch, self.max_batch) if self.max_batch is not None else batch

    # ---- learning rate -------------------------------------------------------------------
    def lr_at(self, epoch: float) -> float:
        """LR at a fractional epoch: scaling rule x step decay x linear warmup."""
        e = int(math.floor(epoch))
        reference = self.reference_batch or self.first_batch
        lr = self.lr * SCALING_RULES[self.scaling](self.global_batch(e) / reference)
        lr *= self.lr_decay ** self.decays(e)
        if epoch < self.warmup_epochs:
            frac = epoch / self.warmup_epochs
            lr *= self.warmup_start_factor + (1.0 - self.warmup_start_factor) * frac
        return lr

    # ---- per-worker resolution -----------------------------------------------------------
    def resolve(self, epoch: int, world_size: int, max_micro_batch=None, even: bool = True) -> EpochPlan:
        """The epoch's numbers for a world size. With even=False (elastic runs, where the world size is
        not chosen by the user) a world size that does not divide the global batch gets shares that
        differ by one sample; per_worker_batch is then the largest share. max_micro_batch None or "auto"
        gives one micro-batch per worker (with "auto" the trainer picks the split while training, see
        microbatch.py)."""
        if max_micro_batch == "auto":
            max_micro_batch = None
        if world_size <= 0:
            raise UserError(f"world size must be > 0, got {world_size}")
        if max_micro_batch is not None and max_micro_batch <= 0:
            raise UserError(f"max micro-batch must be > 0, got {max_micro_batch}")
        stage, gb = self.stage_of(epoch), self.global_batch(epoch)
        if even and gb % world_size:
            up = -(-gb // world_size) * world_size
            raise UserError(
                f"global batch {gb} (epoch {epoch}, stage {stage}) is not divisible by the world size "
                f"{world_size}; use batches that are multiples of {world_size} (e.g. {up}) or another -np"
            )
        per_worker = -(-gb // world_size)
        accum = 1 if max_micro_batch is None else -(-per_worker // max_micro_batch)
        if even and per_worker % accum:
            fits = _divisors(per_worker, max_micro_batch)[:2]
            raise UserError(
                f"per-worker batch {per_worker} (global {gb} / {world_size} workers, epoch {epoch}) does not split "
                f"into {accum} equal micro-batches of at most {max_micro_batch}; "
                f"set max_micro_batch to a divisor of {per_worker}, e.g. {' or '.join(map(str, fits))}"
            )
        return EpochPlan(
            epoch=epoch,
            stage=stage,
            global_batch=gb,
            per_worker_batch=per_worker,
            micro_batch=-(-per_worker // accum),
            accum_steps=accum,
            lr=self.lr_at(epoch),
        )

    def plan(self, world_size: int, max_micro_batch=None, even: bool = True) -> list:
        """Every epoch resolved; raises on the first impossible one, before anything trains."""
        plans = []
        for e in range(self.epochs):
            last = plans[-1] if plans else None
            if last is not None and last.epoch >= self.warmup_epochs and last.stage == self.stage_of(e) and \
                    self.decays(last.epoch) == self.decays(e):
                plans.append(replace(last, epoch=e))  # the same stage after warmup: the same numbers
            else:
                plans.append(self.resolve(e, world_size, max_micro_batch, even))
        return plans


def _divisors(n: int, limit: int) -> list:
    """The divisors of n up to limit, largest first; by trial division up to sqrt(n) (2^20 steps at
    most), not by counting down from limit, which may be ~2^40."""
    found = set()
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            found.update((d, n // d))
    return sorted((d for d in found if d <= limit), reverse=True)


def _too_big(epoch, stage) -> UserError:
    return UserError(f"the global batch exceeds {MAX_BATCH} (2^40) at epoch {epoch} (stage {stage}); "
                     f"set schedule.max_batch, or use smaller batches or fewer stages")


def check_lr(lr) -> None:
    """The base learning rate's check (the optim section's and the schedule's)."""
    if not lr > 0 or math.isinf(lr):
        raise UserError(f"optim.lr must be a finite number > 0, got {lr}")


def _stage_list(value):
    """Stages as 'E:B' strings (the config's form), from a list of them, a comma-separated string, a
    mapping {E: B} or [E, B] pairs."""
    if isinstance(value, dict):
        return [f"{e}:{b}" for e, b in value.items()]
    if isinstance(value, (list, tuple)):
        return [f"{v[0]}:{v[1]}" if isinstance(v, (list, tuple)) and len(v) == 2 else v for v in value]
    return value


def parse_stages(spec) -> Tuple[Tuple[int, int], ...]:
    """'0:128,20:256' or ['0:128', '20:256'] -> ((0, 128), (20, 256)), numbers below 2^63; (epoch,
    batch) pairs pass as they are (as ints)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((int(item[0]), int(item[1])))
            continue
        item = str(item).strip()
        if not item:
            continue
        try:
            e, b = item.split(":")
            e, b = int(e), int(b)
            if max(abs(e), abs(b)) >= 2**63:
                raise ValueError
            out.append((e, b))
        except ValueError:
            shown = repr(item if len(item) <= 40 else item[:37] + "...")
            raise UserError(f"bad stage {shown}: write stages as epoch:global_batch (numbers below 2^63), e.g. "
                            f"0:128,20:256") from None
    return tuple(out)

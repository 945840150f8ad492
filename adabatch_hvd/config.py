"""The run configuration: a tree of typed dataclasses, read from YAML plus command-line overrides.

Every field has a default and a help text (which becomes `--help`). Unknown keys are errors that
suggest the nearest valid key; bad values raise `UserError` naming the value and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import List, Optional, Union

import yaml

from .errors import UserError, suggest
from .schedule import Schedule, parse_stages


def _f(default, help: str, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class DataConfig:
    """Which data set, where it lives and how it is loaded."""

    name: str = _f("fashion-mnist", "data set: fashion-mnist, cifar10, cifar100, imagenet or synthetic")
    root: Optional[str] = _f(None, "data directory (default: the data set's standard place, see README)")
    augment: bool = _f(True, "train-time augmentation (random crop + flip)")
    workers: int = _f(0, "DataLoader worker processes per rank (ImageNet only; in-memory sets ignore it)")
    eval_batch: int = _f(1000, "per-rank batch size for evaluation")
    train_samples: Optional[int] = _f(None, "use only the first N training samples (quick runs, tests)")
    test_samples: Optional[int] = _f(None, "evaluate on only the first N test samples")
    synthetic_samples: int = _f(4096, "number of samples of the synthetic data set")
    synthetic_shape: List[int] = _f([3, 32, 32], "C,H,W of synthetic images")
    synthetic_classes: int = _f(10, "classes of the synthetic data set")

    def __post_init__(self):
        if self.eval_batch <= 0:
            raise UserError(f"data.eval_batch must be > 0, got {self.eval_batch}")
        if self.workers < 0:
            raise UserError(f"data.workers must be >= 0, got {self.workers}")
        for name in ("train_samples", "test_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if self.synthetic_samples <= 0:
            raise UserError(f"data.synthetic_samples must be > 0, got {self.synthetic_samples}")


@dataclass
class ModelConfig:
    """The network."""

    name: str = _f("fmnist_cnn", "model: fmnist_cnn, mlp, resnet20/32/56, vgg19_bn, alexnet, or a torchvision name")


@dataclass
class OptimConfig:
    """SGD hyperparameters (the paper's setting: momentum 0.9, weight decay 5e-4)."""

    lr: float = _f(0.05, "learning rate at the initial batch (or per schedule.reference_batch samples)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay")
    nesterov: bool = _f(False, "Nesterov momentum")

    def __post_init__(self):
        if not (self.lr > 0) or math.isinf(self.lr):
            raise UserError(f"learning rate must be a finite number > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise UserError(f"weight decay must be >= 0, got {self.weight_decay}")


@dataclass
class ScheduleConfig:
    """The AdaBatch schedule: batch growth, LR rule and the per-worker memory cap."""

    epochs: int = _f(6, "number of epochs")
    initial_batch: int = _f(128, "initial global batch B0 (all workers together)")
    growth_factor: float = _f(2.0, "batch multiplier at each stage boundary")
    interval: int = _f(2, "epochs per stage (ignored when stages is given)")
    stages: List[str] = _f([], "explicit stages as epoch:global_batch, e.g. 0:128,20:256 (overrides interval)")
    max_batch: Optional[int] = _f(None, "largest global batch; growth stops there")
    mode: str = _f("adaptive", "adaptive (AdaBatch) or fixed (baseline: same LR decay, constant batch)")
    scaling: str = _f("linear", "LR scaling rule in the batch: linear, sqrt or none")
    lr_decay: float = _f(0.375, "LR step decay at each stage boundary (paper: 0.375; AdaBatch x2 gives 0.75)")
    warmup_epochs: float = _f(0.0, "linear LR warmup length in epochs (Goyal et al.); 0 = off")
    warmup_start_factor: float = _f(0.1, "warmup starts at this fraction of the LR")
    reference_batch: Optional[int] = _f(None, "if set, optim.lr is the LR per this many samples (e.g. 256)")
    max_micro_batch: Optional[Union[int, str]] = _f(
        None, "per-worker memory cap: larger per-worker batches are accumulated; 'auto' times a few divisors of "
              "the per-worker batch at the start of each stage and keeps the fastest that fits (on CUDA an "
              "out-of-memory error halves it and redoes the step)", metavar="N|auto")

    def __post_init__(self):
        if isinstance(self.max_micro_batch, str) and self.max_micro_batch != "auto":
            raise UserError(f"schedule.max_micro_batch must be a number > 0 or 'auto', got '{self.max_micro_batch}'")


COMPRESSIONS = ("none", "fp16")


@dataclass
class CommConfig:
    """How gradients travel between workers: Horovod's compression and tensor-fusion knobs.

    Unset (None) fields leave Horovod's own default, or what horovodrun's flags of the same name
    put in the environment; a value set here overrides both.
    """

    compression: str = _f("none", "gradient compression in the allreduce: none, or fp16 (Horovod's "
                                  "Compression.fp16: gradients travel as float16, half the bytes)")
    fusion_threshold_mb: Optional[float] = _f(None, "Horovod's tensor fusion buffer in MiB (HOROVOD_FUSION_THRESHOLD; "
                                                    "Horovod's default 128, 0 = no fusion)")
    cycle_time_ms: Optional[float] = _f(None, "Horovod's cycle time in ms, how long its background thread gathers "
                                              "tensors before reducing them (HOROVOD_CYCLE_TIME; Horovod's default 1)")
    autotune: Optional[bool] = _f(None, "let Horovod tune the fusion threshold and cycle time while training "
                                        "(HOROVOD_AUTOTUNE)")
    autotune_log: Optional[str] = _f(None, "CSV file where Horovod's autotuner logs its trials (HOROVOD_AUTOTUNE_LOG)")

    def __post_init__(self):
        if self.compression not in COMPRESSIONS:
            raise UserError(f"unknown comm.compression '{self.compression}'{suggest(self.compression, COMPRESSIONS)}; "
                            f"choose one of {', '.join(COMPRESSIONS)}")
        if self.fusion_threshold_mb is not None and not 0 <= self.fusion_threshold_mb < math.inf:
            raise UserError(f"comm.fusion_threshold_mb must be a number >= 0, got {self.fusion_threshold_mb}")
        if self.cycle_time_ms is not None and not 0 < self.cycle_time_ms < math.inf:
            raise UserError(f"comm.cycle_time_ms must be a number > 0, got {self.cycle_time_ms}")

    def horovod_env(self) -> dict:
        """The HOROVOD_* variables these settings mean; Horovod reads them in hvd.init()."""
        env = {}
        if self.fusion_threshold_mb is not None:
            env["HOROVOD_FUSION_THRESHOLD"] = str(int(self.fusion_threshold_mb * 1024 * 1024))
        if self.cycle_time_ms is not None:
            env["HOROVOD_CYCLE_TIME"] = repr(float(self.cycle_time_ms))
        if self.autotune is not None:
            env["HOROVOD_AUTOTUNE"] = "1" if self.autotune else "0"
        if self.autotune_log is not None:
            env["HOROVOD_AUTOTUNE_LOG"] = self.autotune_log
        return env


@dataclass
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = _f(0, "also checkpoint every N optimizer steps (0 = only at epoch ends)")
    keep: int = _f(3, "number of checkpoints kept")

    def __post_init__(self):
        if self.every_steps < 0:
            raise UserError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep < 1:
            raise UserError(f"checkpoint.keep must be >= 1, got {self.keep}")


@dataclass
class RunConfig:
    """Where results go, seeding and run-time behaviour."""

    run_dir: str = _f("runs/default", "output dir: metrics.jsonl, config.yaml, checkpoints/, tb/")
    seed: int = _f(0, "random seed (model init, data order, augmentation)")
    threads: int = _f(0, "torch CPU threads per rank (0 = cores / local ranks)")
    device: str = _f("auto", "auto (cuda:local_rank when available), cpu or cuda")
    quiet: bool = _f(False, "no progress bar")
    resume: Optional[str] = _f(None, "checkpoint to resume from: a path, or 'latest' for RUN_DIR's newest")
    stop_after_steps: int = _f(0, "stop (with a checkpoint) after this many optimizer steps in this process; 0 = no limit")
    elastic: bool = _f(False, "elastic training (launch/run-elastic.sh): workers may leave and join while the "
                              "global batch, LR and sample order stay as planned")
    commit_every: int = _f(10, "elastic: commit the state in memory every N optimizer steps; a failed worker "
                               "rolls the others back to the last commit")

    def __post_init__(self):
        if self.commit_every < 1:
            raise UserError(f"run.commit_every must be >= 1, got {self.commit_every}")


@dataclass
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)


_SECTION_TYPES = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                  "comm": CommConfig, "checkpoint": CheckpointConfig, "run": RunConfig}


# ---- value parsing ---------------------------------------------------------------------------
def _convert(value, tp, key: str):
    """Coerce a YAML or command-line value to the field's annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
            return None
        options = [a for a in args if a is not type(None)]
        for option in options[:-1]:  # e.g. Union[int, str]: a number if it is one, else the word
            try:
                return _convert(value, option, key)
            except UserError:
                pass
        return _convert(value, options[-1], key)
    if origin in (list, List):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        return [_convert(v, args[0], key) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value)) if isinstance(value, str) else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    return value


def _hints(cls):
    return typing.get_type_hints(cls)


def _build(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise UserError(f"the config must be a mapping of sections ({', '.join(_SECTION_TYPES)}), got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in _SECTION_TYPES:
            raise UserError(f"unknown config section '{name}'{suggest(name, _SECTION_TYPES)}; "
                            f"sections are {', '.join(_SECTION_TYPES)}")
        cls = _SECTION_TYPES[name]
        values = values or {}
        if not isinstance(values, dict):
            raise UserError(f"config section '{name}' must be a mapping, got {values!r}")
        hints = _hints(cls)
        for key in values:
            if key not in hints:
                raise UserError(f"unknown config key '{name}.{key}'{suggest(key, hints)}")
        sections[name] = cls(**{k: _convert(v, hints[k], f"{name}.{k}") for k, v in values.items()})
    return Config(**sections)


def build_schedule(cfg: Config) -> Schedule:
    """The pure schedule object described by a config."""
    s = cfg.schedule
    return Schedule(
        initial_batch=s.initial_batch, epochs=s.epochs, lr=cfg.optim.lr, growth_factor=s.growth_factor,
        interval=s.interval, stages=parse_stages(s.stages), max_batch=s.max_batch, mode=s.mode,
        scaling=s.scaling, lr_decay=s.lr_decay, warmup_epochs=s.warmup_epochs,
        warmup_start_factor=s.warmup_start_factor, reference_batch=s.reference_batch,
    )


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"invalid YAML in {path}{where}: {getattr(e, 'problem', None) or e}") from None
    return raw or {}


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---- command line ----------------------------------------------------------------------------
def _all_fields():
    for section, cls in _SECTION_TYPES.items():
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            yield section, f, hints[f.name]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per field: --section.field, plus --field-name when the name is unique."""
    counts = {}
    for _, f, _ in _all_fields():
        counts[f.name] = counts.get(f.name, 0) + 1
    for section, f, tp in _all_fields():
        group = parser.add_argument_group(section)
        names = [f"--{section}.{f.name}"]
        if counts[f.name] == 1:
            names.append("--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                      metavar=f.metadata.get("metavar") or _metavar(tp),
                      help=f"{f.metadata['help']} (default: {default})")
        if f.name == "resume":
            kwargs.update(nargs="?", const="latest")
        elif tp is bool:
            kwargs.update(nargs="?", const="true")  # --elastic alone means --elastic true
        group.add_argument(*names, **kwargs)


def _metavar(tp) -> str:
    if typing.get_origin(tp) in (list, List):
        return "A,B,..."
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return {int: "N", float: "X", bool: "BOOL", str: "STR"}.get(base, "LIST")


def from_args(config_path: Optional[str], overrides: dict) -> Config:
    """YAML file (optional) + {'section.field': value} overrides -> validated Config."""
    raw = load_yaml(config_path) if config_path else {}
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: the config must be a mapping of sections, got {type(raw).__name__}")
    raw = dict(raw)
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        values = raw.get(section) or {}
        if isinstance(values, dict):  # a malformed section is left for _build to report
            raw[section] = {**values, key: value}
    return _build(raw)

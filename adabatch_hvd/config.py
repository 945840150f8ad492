"""The run configuration: a tree of typed dataclasses, read from YAML plus command-line overrides.

Every field has a default and a help text (which becomes `--help`). Unknown keys are errors that
suggest the nearest valid key; bad values raise `UserError` naming the value and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

from .errors import OneLineParser, UserError, suggest
from .limits import MAX_CONFIG_BYTES, read_limited
from .schedule import MAX_EPOCHS, Schedule, ScheduleConfig, _f, check_lr


@dataclass(frozen=True)
class DataSet:
    """A data set a run can name (data.name): the registry's entry."""

    train_size: Optional[int]  # training samples (adabatch-plan's default); None: data.synthetic_samples
    root: str  # where it is read from when data.root is not given
    reader: Optional[str]  # the function in data.py that reads it; None: generated (synthetic)


# The data sets, by name: the one list (data.py builds them from it; adabatch-plan reads the sizes
# without loading anything, and without importing torch).
DATA_SETS: Dict[str, DataSet] = {
    "fashion-mnist": DataSet(60000, "/usr/share/datasets/fashion-mnist", "_fashion_mnist"),
    "cifar10": DataSet(50000, "data/cifar10", "_cifar"),
    "cifar100": DataSet(50000, "data/cifar100", "_cifar"),
    "imagenet": DataSet(1281167, "data/imagenet", "_imagenet"),
    "synthetic": DataSet(None, "", None),
}


def _one_of(names) -> str:
    """'a, b or c'."""
    names = list(names)
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


@dataclass
class DataConfig:
    """Which data set, where it lives and how it is loaded."""

    name: str = _f("fashion-mnist", f"data set: {_one_of(DATA_SETS)}")
    root: Optional[str] = _f(None, "data directory (default: the data set's standard place, see README)")
    augment: bool = _f(True, "train-time augmentation (random crop + flip)")
    workers: int = _f(0, "DataLoader worker processes per rank (ImageNet only; in-memory sets ignore it)")
    # 256, not 1000: fmnist_cnn evaluates ~30% faster per sample on a CPU core (its activations stay in cache)
    eval_batch: int = _f(256, "per-rank batch size for evaluation")
    train_samples: Optional[int] = _f(None, "use only the first N training samples (quick runs, tests)")
    test_samples: Optional[int] = _f(None, "evaluate on only the first N test samples")
    synthetic_samples: int = _f(4096, "number of samples of the synthetic data set")
    synthetic_shape: List[int] = _f([3, 32, 32], "C,H,W of synthetic images")
    synthetic_classes: int = _f(10, "classes of the synthetic data set")

    def __post_init__(self):
        if self.eval_batch <= 0:
            raise UserError(f"data.eval_batch must be > 0, got {self.eval_batch}")
        if not 0 <= self.workers <= MAX_WORKERS:
            raise UserError(f"data.workers must be in 0..{MAX_WORKERS}, got {self.workers}")
        for name in ("train_samples", "test_samples"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"data.{name} must be > 0, got {getattr(self, name)}")
        if self.synthetic_samples <= 0:
            raise UserError(f"data.synthetic_samples must be > 0, got {self.synthetic_samples}")


@dataclass
class ModelConfig:
    """The network, and how its convolutions run."""

    name: str = _f("fmnist_cnn", "model: fmnist_cnn, mlp, resnet20/32/56, vgg19_bn, alexnet, or a torchvision name")
    channels_last: bool = _f(False, "give the model its 4-D inputs in channels-last (NHWC) layout, the one that "
                                    "tensor-core convolutions prefer (GPUs, bf16/fp16); the parameters keep theirs")
    cudnn_benchmark: bool = _f(True, "CUDA, models with convolutions: cuDNN times its algorithms on each new input "
                                     "shape and keeps the fastest (torch.backends.cudnn.benchmark), which may differ "
                                     "between processes; false: its fixed heuristic choice")


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class OptimConfig:
    """SGD hyperparameters (the paper's setting: momentum 0.9, weight decay 5e-4)."""

    lr: float = _f(0.05, "learning rate at the initial batch (or per schedule.reference_batch samples)")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay")
    nesterov: bool = _f(False, "Nesterov momentum")
    precision: str = _f("fp32", "arithmetic of the forward pass: fp32, bf16 (autocast to bfloat16) or fp16 "
                                "(autocast to float16 with a gradient scaler that skips steps with inf/NaN "
                                "gradients); weights, gradients and optimizer state stay float32")

    def __post_init__(self):
        self.precision = str(self.precision).strip().lower()
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown optim.precision {_show(self.precision)}{suggest(self.precision, PRECISIONS)}; "
                            f"choose one of {', '.join(PRECISIONS)}")
        check_lr(self.lr)
        if not 0 <= self.momentum < 1:
            raise UserError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise UserError(f"weight decay must be >= 0, got {self.weight_decay}")


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
            raise UserError(f"unknown comm.compression {self.compression!r}{suggest(self.compression, COMPRESSIONS)}; "
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
    threads: int = _f(0, "torch CPU threads per rank (0 = OMP_NUM_THREADS if set, else the usable cores: CPU "
                         "affinity and cgroup quota / local ranks)")
    device: str = _f("auto", "auto (cuda:local_rank when available), cpu, or cuda (also written gpu)")
    quiet: bool = _f(False, "no progress bar")
    resume: Optional[str] = _f(None, "checkpoint to resume from: a path, 'latest' (also true) for RUN_DIR's "
                                     "newest, or 'auto': the newest if there is one, else start fresh (requeued "
                                     "jobs)", parse=lambda v: _resume_value(v))
    stop_after_steps: int = _f(0, "stop (with a checkpoint) after this many optimizer steps in this process; 0 = no limit")
    log_every_steps: int = _f(50, "TensorBoard: train loss, LR, batch and throughput every N optimizer steps "
                                  "(x axis: samples seen); 0 = per epoch only")
    elastic: bool = _f(False, "elastic training (launch/run-elastic.sh): workers may leave and join while the "
                              "global batch, LR and sample order stay as planned")
    commit_every: int = _f(10, "elastic: commit the state in memory every N optimizer steps; a failed worker "
                               "rolls the others back to the last commit")

    def __post_init__(self):
        if self.commit_every < 1:
            raise UserError(f"run.commit_every must be >= 1, got {self.commit_every}")
        if not self.run_dir.strip():
            raise UserError("run.run_dir is empty; give a directory, e.g. --run-dir runs/NAME")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"run.seed must be in 0..2^32-1, got {self.seed}")
        if not 0 <= self.threads <= MAX_THREADS:
            raise UserError(f"run.threads must be in 0..{MAX_THREADS} (0 = OMP_NUM_THREADS, else usable cores / "
                            f"local ranks), got {self.threads}")
        self.device = {"gpu": "cuda"}.get(self.device.strip().lower(), self.device.strip().lower())
        if self.device not in DEVICES:
            raise UserError(f"unknown run.device {self.device!r}{suggest(self.device, DEVICES)}; "
                            f"choose one of {', '.join(DEVICES)} (gpu means cuda)")
        for name in ("stop_after_steps", "log_every_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"run.{name} must be >= 0, got {getattr(self, name)}")


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


# Bounds on numbers that would otherwise exhaust processes or threads before a useful error.
MAX_WORKERS = 256
MAX_THREADS = 1024
# Bounds on the length of a text value (a path: Linux's PATH_MAX) and the items of a list (a stage per epoch).
MAX_TEXT = 4096
MAX_ITEMS = MAX_EPOCHS
DEVICES = ("auto", "cpu", "cuda")

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
            raise UserError(f"{key}: expected a list, got {_show(value)}")
        if len(value) > MAX_ITEMS:
            raise UserError(f"{key}: a list of {len(value)} items is longer than the limit of {MAX_ITEMS}")
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
            number = _whole(value.strip().replace("_", "")) if isinstance(value, str) else int(value)
            if abs(number) >= 2**63:
                raise UserError(f"{key}: {value!r} is too large (the limit is 2^63 - 1)")
            return number
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise UserError(f"{key} must be a finite number, got {value!r}")
            return number
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            text = str(value)
            if len(text) > MAX_TEXT:
                raise UserError(f"{key}: a text of {len(text)} characters is longer than the limit of {MAX_TEXT}")
            return text
    except UserError:
        raise
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{key}: expected {tp.__name__}, got {_show(value)}") from None
    return value


def _whole(text: str) -> int:
    """An integer from text, also written as a whole float ('1e3', '1000.0') while that is exact."""
    try:
        return int(text)
    except ValueError:
        number = float(text)
        if not (number.is_integer() and abs(number) <= 2**53):
            raise
        return int(number)


_SHOWN = reprlib.Repr()  # a short repr, in time bounded by its length, whatever the value's size
_SHOWN.maxstring = _SHOWN.maxother = _SHOWN.maxlong = 80


def _show(value) -> str:
    text = _SHOWN.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _resume_value(value):
    """`resume: true` (YAML) or `--resume yes` mean the newest checkpoint; false/no mean a fresh run."""
    word = str(value).strip().lower()
    if value is True or word in ("true", "yes", "on"):
        return "latest"
    if value is False or word in ("false", "no", "off"):
        return None
    return value


def _hints(cls):
    return typing.get_type_hints(cls)


def _build(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise UserError(f"the config must be a mapping of sections ({', '.join(_SECTION_TYPES)}), got {type(raw).__name__}")
    sections = {}
    for name, values in raw.items():
        if name not in _SECTION_TYPES:
            raise UserError(f"unknown config section {_show(name)}{suggest(name, _SECTION_TYPES)}; "
                            f"sections are {', '.join(_SECTION_TYPES)}")
        cls = _SECTION_TYPES[name]
        values = values or {}
        if not isinstance(values, dict):
            raise UserError(f"config section {name!r} must be a mapping, got {_show(values)}")
        hints = _hints(cls)
        for key in values:
            if key not in hints:
                raise UserError(f"unknown config key {_show(f'{name}.{key}')}{suggest(key, hints)}")
        parsers = {f.name: f.metadata.get("parse") for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: _convert(parsers[k](v) if parsers[k] else v, hints[k], f"{name}.{k}")
                                for k, v in values.items()})
    return Config(**sections)


def build_schedule(cfg: Config) -> Schedule:
    """The run's schedule: its `schedule:` section with optim.lr, checked. Built once and kept on the
    config while neither changes (sections are plain mutable objects; a changed field builds anew)."""
    key = (dataclasses.astuple(cfg.schedule), cfg.optim.lr)
    built = cfg.__dict__.get("_schedule")
    if built is None or built[0] != key:
        built = cfg._schedule = (key, Schedule.of(cfg.schedule, cfg.optim.lr))  # not a field: not saved or compared
    return built[1]


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers, so `stages: [0:16, 20:32]` stays text
    (the stock loader reads 20:32 as 1232), without deep nesting (parsed in quadratic time), and
    without aliases that stand for more than _MAX_VALUES values (the "billion laughs": nine lines of
    anchors and aliases are 10^9 values to whatever walks the result, and merge keys `<<: [*a, *a]`
    copy that many in the loader itself)."""

    depth = 0

    def compose_document(self):
        node = super().compose_document()
        _expanded(node, 1, {})
        return node

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > _MAX_DEPTH:
                raise _too_deep()
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


_MAX_DEPTH = 32
_MAX_VALUES = 1_000_000  # a config has a few dozen; a file of MAX_CONFIG_BYTES holds at most half a million


def _expanded(node, depth: int, seen: dict) -> tuple:
    """(values, levels) of the YAML node graph below `node` with every alias counted as what it stands
    for; each node is measured once (`seen`), so this takes linear time even where the count is huge.
    Raises past _MAX_VALUES values or _MAX_DEPTH levels (a node that holds an alias to itself too)."""
    if depth > _MAX_DEPTH:
        raise _too_deep()
    if isinstance(node, yaml.ScalarNode):
        return 1, 1
    if id(node) not in seen:
        values, levels = 1, 1
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for pair in node.value for n in pair]
        for child in children:
            v, l = _expanded(child, depth + 1, seen)
            values, levels = values + v, max(levels, l + 1)
            if values > _MAX_VALUES:
                raise yaml.YAMLError(f"more than {_MAX_VALUES} values once its aliases are expanded, far more "
                                     f"than a config has")
        seen[id(node)] = values, levels
    values, levels = seen[id(node)]
    if depth + levels - 1 > _MAX_DEPTH:
        raise _too_deep()
    return values, levels


def _too_deep() -> yaml.YAMLError:
    return yaml.YAMLError(f"nested more than {_MAX_DEPTH} levels deep, far more than a config has")


def _flow_depth(text: str) -> int:
    """The deepest nesting of [ and { (quotes ignored): the scanner is quadratic in it, so it is checked first."""
    depth = deepest = 0
    for c in text:
        if c in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "]}":
            depth = max(depth - 1, 0)
    return deepest


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_INT, re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
                                                  |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_Loader.add_implicit_resolver(_FLOAT, re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
                                                    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
                                                    |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
                              list("-+0123456789."))


def load_yaml(path: str) -> dict:
    """A YAML config file of at most MAX_CONFIG_BYTES as plain data; any problem reading it is one
    UserError. A device is read up to the bound too (/dev/stdin works; /dev/zero is refused)."""
    try:
        text = read_limited(path, MAX_CONFIG_BYTES, "config file", "give a YAML config file (one is a few "
                                                                   "KB)").decode("utf-8")
        if _flow_depth(text) > _MAX_DEPTH:
            raise _too_deep()
        raw = yaml.load(text, Loader=_Loader)
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; give a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise UserError(f"invalid YAML in {path}{where}: {problem}") from None
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
    """One option per field: --section.field, plus --field-name when the name is unique.

    Booleans also work as plain flags (--quiet, and --no-quiet to turn one off); --data NAME and
    --model NAME are short for --data.name and --model.name.
    """
    counts = {}
    for _, f, _ in _all_fields():
        counts[f.name] = counts.get(f.name, 0) + 1
    groups = {}
    for section, f, tp in _all_fields():
        group = groups.setdefault(section, parser.add_argument_group(section))
        names = [f"--{section}.{f.name}"]
        if counts[f.name] == 1:
            names.append("--" + f.name.replace("_", "-"))
        if f.name == "name":
            names.append(f"--{section}")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                      metavar=f.metadata.get("metavar") or _metavar(tp),
                      help=f"{f.metadata['help']} (default: {default})")
        boolean = bool in (tp, *typing.get_args(tp))
        if f.name == "resume":
            kwargs.update(nargs="?", const="latest")
        elif boolean:
            kwargs.update(nargs="?", const="true")  # --elastic alone means --elastic true
        group.add_argument(*names, **kwargs)
        if boolean:
            group.add_argument(*(n.replace("--", "--no-", 1) for n in names[1:] or names), dest=f"{section}.{f.name}",
                               action="store_const", const="false", default=argparse.SUPPRESS,
                               help=f"same as {names[-1]} false")


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


# ---- resuming with another config ------------------------------------------------------------
# A resumed run must stay one coherent run: these may not change (field -> why).
FIXED_ON_RESUME = {
    "data.name": "the data set", "data.train_samples": "the training set", "data.synthetic_samples": "the data set",
    "data.synthetic_shape": "the data set", "data.synthetic_classes": "the data set", "model.name": "the model",
    "run.seed": "the data order and augmentation",
    "optim.momentum": "the optimizer state", "optim.weight_decay": "the optimizer state",
    "optim.nesterov": "the optimizer state",
}
_PER_INVOCATION = ("run.resume", "run.stop_after_steps")  # not part of the run's config


def _flat(tree: dict) -> dict:
    return {f"{section}.{k}": v for section, values in tree.items() if isinstance(values, dict)
            for k, v in values.items()}


def resume_changes(saved: dict, cfg: Config, epoch: int, offset: int) -> dict:
    """Compare a run's config with the one its checkpoint was saved with, at (epoch, offset).

    Returns {'section.field': (old, new)} for the changes that are safe (more epochs, another
    micro-batch cap, checkpointing, threads, ...). Raises UserError for those that would make the run
    incoherent: the data set, the model, the seed, the optimizer's hyperparameters, the batch or LR of
    an epoch already (partly) run, or fewer epochs than already run.
    """
    old, new = _flat(saved), _flat(to_dict(cfg))
    changes = {k: (old[k], v) for k, v in new.items() if k in old and old[k] != v and k not in _PER_INVOCATION}
    fix = "resume with the checkpoint's value (see config.yaml in the run dir), or start a fresh run.run_dir"
    for key, (a, b) in changes.items():
        if key in FIXED_ON_RESUME:
            raise UserError(f"resume changes {key} from {a!r} to {b!r}, which would change {FIXED_ON_RESUME[key]} "
                            f"of a run in progress; {fix}")
    started = epoch + (offset > 0)  # epochs that are (partly) trained
    if cfg.schedule.epochs < started:
        raise UserError(f"--epochs {cfg.schedule.epochs} is below the checkpoint's position (epoch {epoch}, "
                        f"{started} epochs started); give --epochs {started} or more")
    try:
        before = build_schedule(_build({s: {k: v for k, v in values.items() if k in _hints(_SECTION_TYPES[s])}
                                        for s, values in saved.items() if s in _SECTION_TYPES}))
    except (UserError, TypeError):
        return changes  # a checkpoint from another version: nothing to compare the schedule with
    after = build_schedule(cfg)
    for e in range(min(started, before.epochs)):
        was, now = (before.global_batch(e), before.lr_at(e)), (after.global_batch(e), after.lr_at(e))
        warm = (before.warmup_epochs, before.warmup_start_factor) != (after.warmup_epochs, after.warmup_start_factor)
        if was != now or (warm and e < max(before.warmup_epochs, after.warmup_epochs)):
            keys = ", ".join(k for k in changes if k.startswith(("schedule.", "optim."))) or "the schedule"
            raise UserError(f"resume changes {keys}, which changes epoch {e} (already run): global batch "
                            f"{was[0]} -> {now[0]}, lr {was[1]:.5g} -> {now[1]:.5g}; {fix}")
    return changes


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """adabatch-train's (and adabatch-plan's) command line: --config and a flag per config field."""
    p = OneLineParser(prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", "-c", metavar="FILE.yaml", help="YAML config; flags below override it")
    add_arguments(p)
    return p


def overrides(args) -> dict:
    """The config fields given as flags, {'section.field': value}."""
    return {k: v for k, v in vars(args).items() if "." in k}

"""Hostile input, found by class: generated bad values for the config, the schedule, the data readers and
adabatch-report. Each must end in a UserError with a one-line message (the CLI's exit code 2) or be
accepted as documented; anything else raised is a bug. Everything runs in-process, in seconds.

Cases generated per run (hypothesis max_examples, 1,155 in all): config overrides 300, typed YAML
configs 150, raw config files 100, schedules 300, stage specs 100, Fashion-MNIST files 100, CIFAR
pickles 80, adabatch-report 25.
"""

import contextlib
import gzip
import io
import json
import math
import os
import pickle
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from adabatch_hvd import config, report
from adabatch_hvd.data import DATASETS, build_dataset
from adabatch_hvd.errors import UserError
from adabatch_hvd.models import MODELS, build_model
from adabatch_hvd.schedule import MAX_BATCH, MAX_EPOCHS, Schedule, parse_stages

TORCHVISION_MODELS = tuple(torchvision.models.list_models(module=torchvision.models))
FIELDS = {f"{section}.{f.name}": tp for section, f, tp in config._all_fields()}


# The suite runs the same cases every time (derandomized: no run fails by chance); HOSTILE_FUZZ_SCALE=N runs
# N times as many from a random seed, to look for new failures (a failure prints the example to add).
SCALE = int(os.environ.get("HOSTILE_FUZZ_SCALE", "1"))


def fast(examples: int):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=SCALE == 1, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def one_line(error: UserError) -> str:
    text = str(error)
    assert text and "\n" not in text and "Traceback" not in text, repr(text)
    return text


def accepted_or_user_error(fn, *args, **kwargs):
    """fn's result, or None after checking that it raised a UserError with a one-line message."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        one_line(e)
        return None


# ---- values a user could type or write in YAML ---------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 1, 2**31, 2**63, 10**12, MAX_EPOCHS + 1]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324]),
    st.text(max_size=12), st.sampled_from(["", " ", "nan", "inf", "-inf", "1e3", "0x10", "1_000", "true", "None",
                                           "0:16,1:32", "3,x,y", "a\nb", "é", "\x00"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


def check_config(cfg):
    """What the CLI does with a parsed config before training: the schedule, its plan, and the
    data set / model names (their unknown-name errors only, which cost nothing)."""
    schedule = accepted_or_user_error(config.build_schedule, cfg)
    if schedule is not None:
        for world in (1, 2):
            plans = accepted_or_user_error(schedule.plan, world, cfg.schedule.max_micro_batch)
            if plans:
                assert len(plans) == schedule.epochs <= MAX_EPOCHS
                assert all(0 < p.global_batch <= MAX_BATCH and 0 < p.lr < math.inf for p in plans)
    for name in (cfg.data.name, cfg.model.name):
        assert isinstance(name, str)
    if cfg.data.name not in DATASETS:
        with pytest.raises(UserError) as e:
            build_dataset(cfg.data.name, None, True)
        one_line(e.value)
    if cfg.model.name not in MODELS + TORCHVISION_MODELS:
        with pytest.raises(UserError) as e:
            build_model(cfg.model.name, None)
        one_line(e.value)
    for name in ("lr", "momentum", "weight_decay"):
        assert math.isfinite(getattr(cfg.optim, name))
    s = cfg.schedule
    for value in (s.growth_factor, s.lr_decay, s.warmup_epochs, s.warmup_start_factor):
        assert math.isfinite(value)
    assert cfg.run.run_dir.strip() and cfg.run.device in config.DEVICES
    assert cfg.checkpoint.keep >= 1 and cfg.checkpoint.every_steps >= 0 and cfg.run.stop_after_steps >= 0


@fast(300)
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)), values, min_size=1, max_size=3), st.booleans())
@example({"data.name": "a\nb", "model.name": "x\ny"}, False)
@example({"schedule.mode": "a\nb", "run.device": "\n"}, True)
def test_config_overrides(overrides, as_strings):
    if as_strings:  # what argparse hands over
        overrides = {k: v if isinstance(v, str) else str(v) for k, v in overrides.items()}
    cfg = accepted_or_user_error(config.from_args, None, overrides)
    if cfg is not None:
        check_config(cfg)


def _section_values(section):
    keys = [k.split(".", 1)[1] for k in FIELDS if k.startswith(section + ".")] + ["typo"]
    return st.one_of(values, st.dictionaries(st.sampled_from(keys), values, max_size=3))


yaml_trees = st.one_of(
    values,
    st.fixed_dictionaries({}, optional={section: _section_values(section) for section in config._SECTION_TYPES}),
    st.dictionaries(st.text(max_size=6), values, max_size=2),
)


@fast(150)
@given(yaml_trees)
def test_yaml_configs(tree):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(yaml.safe_dump(tree, allow_unicode=True))
        cfg = accepted_or_user_error(config.from_args, str(path), {})
    if cfg is not None:
        check_config(cfg)


@fast(100)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                 st.sampled_from([b"\xff\xfe\x00", b"a: [", b"!!python/object:os.system {}", b"&a [*a]",
                                  b"schedule: {stages: [0:16, 1:32]}", "schedule: {epochs: 1e400}".encode(),
                                  b"\x89PNG\r\n\x1a\n", b"- - - - - - -", b"[" * 5000])))
def test_raw_config_files(data):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_bytes(data)
        cfg = accepted_or_user_error(config.from_args, str(path), {})
    if cfg is not None:
        check_config(cfg)


def test_yaml_that_users_write():
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text("schedule:\n  stages: [0:16, 1:32]\n  epochs: 3\nrun: {resume: true}\n")
        cfg = config.from_args(str(path), {})
        assert cfg.schedule.stages == ["0:16", "1:32"] and cfg.run.resume == "latest"
        assert config.build_schedule(cfg).stages == ((0, 16), (1, 32))
        path.write_text("schedule:\n  stages: {0: 16, 20: 32}\n  epochs: 30\nrun: {resume: false}\n")
        cfg = config.from_args(str(path), {})
        assert cfg.schedule.stages == ["0:16", "20:32"] and cfg.run.resume is None
        path.write_text("schedule:\n  stages: [[0, 16], [2, 32]]\n  lr_decay: 1e-1\n")
        cfg = config.from_args(str(path), {})
        assert cfg.schedule.stages == ["0:16", "2:32"] and cfg.schedule.lr_decay == 0.1
        path.write_text(config.dump_yaml(cfg))  # what the run dir's config.yaml holds reads back the same
        assert config.from_args(str(path), {}) == cfg


# ---- the schedule ------------------------------------------------------------------------------------
# Schedule is typed (config.py hands it ints and floats): ints where it takes ints, any number elsewhere.
ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 2, 3, 64, 128, 2**40, 2**41, 10**12]))
numbers = st.one_of(ints, st.floats(allow_nan=True, allow_infinity=True))


@fast(300)
@given(st.fixed_dictionaries(
    {"initial_batch": ints, "epochs": st.one_of(st.integers(-5, 400), st.sampled_from([MAX_EPOCHS + 1, 10**12])),
     "lr": numbers},
    optional={"growth_factor": numbers, "interval": ints, "max_batch": ints, "lr_decay": numbers,
              "warmup_epochs": numbers, "warmup_start_factor": numbers, "reference_batch": ints,
              "scaling": st.sampled_from(["linear", "sqrt", "none", "cubic"]),
              "mode": st.sampled_from(["adaptive", "fixed", "x"]),
              "stages": st.lists(st.tuples(st.integers(-3, 500), ints), max_size=5)}),
       st.integers(-2, 9), st.one_of(st.none(), ints))
def test_schedules(kwargs, world, cap):
    schedule = accepted_or_user_error(Schedule, **kwargs)
    if schedule is None:
        return
    plans = accepted_or_user_error(schedule.plan, world, cap)
    if plans is not None:
        assert [p.epoch for p in plans] == list(range(schedule.epochs))
        for p in plans:
            assert p.global_batch == p.per_worker_batch * world and p.micro_batch * p.accum_steps == p.per_worker_batch
            assert 0 < p.global_batch <= MAX_BATCH and 0 < p.lr < math.inf


def test_a_huge_epoch_count_is_refused_at_once():
    with pytest.raises(UserError, match=f"epochs must be at most {MAX_EPOCHS}, got 1000000000000"):
        Schedule(initial_batch=128, epochs=10**12, lr=0.1, interval=1)
    with pytest.raises(UserError, match=f"epochs must be at most {MAX_EPOCHS}, got {MAX_EPOCHS + 1}"):
        Schedule(initial_batch=128, epochs=MAX_EPOCHS + 1, lr=0.1, interval=1)
    plans = Schedule(initial_batch=128, epochs=MAX_EPOCHS, lr=0.1, interval=1000, max_batch=4096).plan(2)
    assert len(plans) == MAX_EPOCHS and plans[-1].global_batch == 4096  # the largest allowed plan is built


def test_an_indivisible_huge_batch_is_answered_at_once():
    # per-worker batch 2^40 - 3 (odd) with micro-batches of at most 2^39: 2 steps of unequal size; the
    # suggested caps are the largest divisors (2^40 - 3 = 13 x 84577817521), found without counting down from 2^39
    schedule = Schedule(initial_batch=2**40 - 3, epochs=1, lr=0.1, mode="fixed")
    with pytest.raises(UserError, match="a divisor of 1099511627773, e.g. 84577817521 or 13"):
        schedule.plan(1, 2**39)


@fast(100)
@given(st.one_of(st.text(max_size=30), st.lists(st.one_of(st.text(max_size=8), st.integers()), max_size=4)))
def test_stage_specs(spec):
    stages = accepted_or_user_error(parse_stages, spec)
    if stages is not None:
        assert all(isinstance(e, int) and isinstance(b, int) for e, b in stages)


# ---- data files that are not what they claim ----------------------------------------------------------
def idx(kind: int, dims, payload: bytes) -> bytes:
    return bytes([0, 0, kind, len(dims)]) + b"".join(struct.pack(">i", d) for d in dims) + payload


def idx_files():
    images = st.builds(lambda n, h, w, kind, extra: idx(kind, [n, h, w], bytes(max(0, n * h * w + extra))),
                       st.integers(0, 6), st.integers(0, 9), st.integers(0, 9),
                       st.sampled_from([0x08, 0x08, 0x09, 0x0D, 0x42]), st.integers(-3, 3))
    labels = st.builds(lambda ls, kind, dims: idx(kind, dims or [len(ls)], bytes(ls)),
                       st.lists(st.integers(0, 255), max_size=6), st.sampled_from([0x08, 0x08, 0x0C]),
                       st.sampled_from([None, None, [3, 2], [2**31 - 1]]))
    raw = st.one_of(st.binary(max_size=64), images, labels)
    return st.tuples(raw, raw).flatmap(lambda pair: st.tuples(
        *(st.sampled_from([gzip.compress(p), gzip.compress(p), p, gzip.compress(p)[:-5]]) for p in pair)))


@fast(100)
@given(idx_files(), st.booleans())
def test_fashion_mnist_files(files, train):
    prefix = "train" if train else "t10k"
    with tempfile.TemporaryDirectory() as d:
        Path(d, f"{prefix}-images-idx3-ubyte.gz").write_bytes(files[0])
        Path(d, f"{prefix}-labels-idx1-ubyte.gz").write_bytes(files[1])
        ds = accepted_or_user_error(build_dataset, "fashion-mnist", d, train, augment=True)
    if ds is not None:
        assert ds.images.dtype == torch.uint8 and ds.images.shape[0] == len(ds.labels)
        assert ds.images.shape[2] == ds.images.shape[3] == ds.info.image_size
        assert ((ds.labels >= 0) & (ds.labels < 10)).all()
        if len(ds):
            x, y = next(ds.iterate([list(range(len(ds)))], epoch=0))
            assert x.shape[0] == len(y) == len(ds)


def cifar_pickles():
    data = st.one_of(
        st.builds(lambda n, extra, dtype: np.zeros(n * 3072 + extra, dtype=dtype).reshape(1, -1) if n or extra
                  else np.zeros((0, 3072), dtype=dtype), st.integers(0, 3), st.sampled_from([0, 0, 7]),
                  st.sampled_from([np.uint8, np.uint8, np.float32, np.int64])),
        st.just("not an array"), st.just(None))
    labels = st.one_of(st.lists(st.integers(-3, 12), max_size=4), st.lists(st.text(max_size=2), max_size=2),
                       st.lists(st.floats(), max_size=2), st.none())
    entry = st.one_of(st.fixed_dictionaries({"data": data, "labels": labels}),
                      st.fixed_dictionaries({"data": data}), st.lists(st.integers(), max_size=2), st.binary(max_size=20))
    meta = st.one_of(st.fixed_dictionaries({"label_names": st.lists(st.text(max_size=3), max_size=12)}),
                     st.fixed_dictionaries({"label_names": st.integers()}), st.binary(max_size=20))
    return st.tuples(entry, entry, meta)


@fast(80)
@given(cifar_pickles())
@example(({"data": np.zeros((1, 3072), dtype=np.float32), "labels": [0]}, {"data": np.zeros((0, 3072)), "labels": []},
          {"label_names": ["a"]}))  # float pixels
def test_cifar_files(files):
    train_entry, test_entry, meta = files
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d, "cifar-10-batches-py")
        folder.mkdir()
        for name, obj in [("test_batch", test_entry), ("batches.meta", meta)] + [
                (f"data_batch_{i}", train_entry) for i in range(1, 6)]:
            (folder / name).write_bytes(obj if isinstance(obj, bytes) else pickle.dumps(obj))
        for train in (True, False):
            ds = accepted_or_user_error(build_dataset, "cifar10", d, train, augment=False)
            if ds is not None:
                assert ds.images.dtype == torch.uint8 and ds.images.shape[1:] == (3, 32, 32)
                assert len(ds.labels) == len(ds.images)
                assert ((ds.labels >= 0) & (ds.labels < ds.info.num_classes)).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_file_that_is_not_an_image(tmp_path, workers):
    from torchvision.transforms.functional import to_pil_image

    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            to_pil_image(torch.zeros(3, 8, 8, dtype=torch.uint8)).save(tmp_path / split / name / "0.png")
    bad = tmp_path / "train" / "b" / "1.JPEG"
    bad.write_bytes(b"GIF89a not really")
    ds = build_dataset("imagenet", tmp_path, True)
    with pytest.raises(UserError) as e:
        list(ds.iterate([[0, 1], [2]], epoch=0, workers=workers))
    assert one_line(e.value).startswith(f"cannot read image {bad} (UnidentifiedImageError")


def test_labels_out_of_range_are_refused(tmp_path):
    Path(tmp_path, "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx(8, [2, 4, 4], bytes(32))))
    Path(tmp_path, "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx(8, [2], bytes([3, 200]))))
    with pytest.raises(UserError, match=r"1 labels in .* are outside 0\.\.9 \(e\.g\. 200\)"):
        build_dataset("fashion-mnist", tmp_path, True)


# ---- adabatch-report on unusual runs and output paths ---------------------------------------------------
record_values = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                          st.text(max_size=4), st.lists(st.integers(), max_size=2))
records = st.fixed_dictionaries({"epoch": st.one_of(st.integers(0, 50), record_values)},
                                optional={k: record_values for k in ("test_acc", "train_loss", "global_batch", "lr",
                                                                     "epoch_seconds")})
lines = st.one_of(records.map(json.dumps), st.text(max_size=20), st.just('{"epoch": 3, "test_acc": 0.9'))


@fast(25)
@given(st.lists(lines, max_size=6), st.one_of(st.none(), st.text(max_size=30), st.just("schedule: {mode: fixed}")),
       st.sampled_from(["out.png", "out", "dir/", "out.svg", "out.xyz", "sub/deeper/out.pdf", "/proc/nope/out.png",
                        "metrics.jsonl/x.png"]), st.booleans())
def test_report(metric_lines, config_text, output, binary):
    with tempfile.TemporaryDirectory() as d:
        run = Path(d, "run")
        run.mkdir()
        text = "\n".join(metric_lines) + "\n"
        (run / "metrics.jsonl").write_bytes(text.encode() if not binary else b"\xff\xfe" + text.encode())
        if config_text is not None:
            (run / "config.yaml").write_text(config_text)
        if output == "dir/":
            Path(d, "dir").mkdir()
        out = output if output.startswith("/") else str(Path(d, output))
        err, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            code = report.main([str(run), str(run), "-o", out])
        errors = [line for line in err.getvalue().splitlines() if line.startswith("adabatch-report: error: ")]
        assert "Traceback" not in err.getvalue()
        if code == 0:
            written = Path(stdout.getvalue().strip())
            assert not errors and written.is_file() and written.stat().st_size > 1000
        else:
            assert code == 2 and len(errors) == 1, err.getvalue()

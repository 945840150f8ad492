"""Every input has a bound: a file's size, a count, a length. An input past it is one UserError line
(exit 2 from the CLIs) naming the input and the limit, found before the memory or the time is spent.
Everything but the first test runs in-process, in well under a second each."""

import gzip
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from adabatch_hvd import config, data, limits, report
from adabatch_hvd.data import DatasetInfo, build_dataset
from adabatch_hvd.errors import UserError
from adabatch_hvd.microbatch import candidates
from adabatch_hvd.models import build_model
from adabatch_hvd.schedule import parse_stages
from conftest import ROOT, hvd_env

# Heap and other private memory (RLIMIT_DATA): importing torch, torchvision, horovod and the trainer takes
# 1 GB of it (and 3.7 GB of address space, mostly libraries). Read whole, /dev/zero took 23.5 GB.
DATA_LIMIT = 2 << 30


def one_line(e) -> str:
    text = str(e.value if hasattr(e, "value") else e)
    assert text and "\n" not in text and len(text) < 400, repr(text[:500])
    return text


# ---- the config file ----------------------------------------------------------------------------------
def test_config_from_dev_zero_is_one_line_within_a_bounded_memory():
    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (DATA_LIMIT, DATA_LIMIT))  # a regression fails fast

    proc = subprocess.run([sys.executable, "-m", "adabatch_hvd", "--config", "/dev/zero"], cwd=ROOT, env=hvd_env(),
                          capture_output=True, text=True, timeout=120, preexec_fn=limit)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.splitlines() == ["adabatch-train: error: config file /dev/zero is larger than 1 MiB (read "
                                        "stopped there); give a YAML config file (one is a few KB)"]


@pytest.mark.parametrize("path", ["/dev/zero", "/dev/urandom"])
def test_endless_devices_are_read_up_to_the_bound(path):
    with pytest.raises(UserError, match=f"config file {path} is larger than 1 MiB"):
        config.load_yaml(path)


def test_the_bound_is_exact_and_a_pipe_or_directory_is_fine(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 64)
    path = tmp_path / "c.yaml"
    path.write_text("schedule: {epochs: 3}\n" + "#" * (64 - 22))
    assert config.load_yaml(path) == {"schedule": {"epochs": 3}}
    path.write_text(path.read_text() + "#")
    assert one_line(pytest.raises(UserError, config.load_yaml, path)).startswith(
        f"config file {path} is larger than 64 bytes (read stopped there)")
    r, w = os.pipe()
    os.write(w, b"optim: {lr: 0.5}\n")
    os.close(w)
    try:
        assert config.load_yaml(f"/dev/fd/{r}") == {"optim": {"lr": 0.5}}  # --config /dev/stdin, <(...)
    finally:
        os.close(r)
    assert one_line(pytest.raises(UserError, config.load_yaml, tmp_path)) == \
        f"cannot read config file {tmp_path}: Is a directory"


def alias_chain(levels: int, width: int, merge: bool = False) -> str:
    """YAML in which each anchor holds `width` aliases of the one before: width^levels values."""
    lines = ["a0: &a0 {k: 1}" if merge else "a0: &a0 [lol, lol]"]
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} {{<<: [{refs}], k{i}: 1}}" if merge else f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, problem", [
    (alias_chain(9, 10), "more than 1000000 values once its aliases are expanded"),  # the billion laughs
    (alias_chain(8, 10, merge=True), "more than 1000000 values once its aliases are expanded"),  # merge keys copy
    ("a: &a [*a]\n", "nested more than 32 levels deep"),  # a node inside itself
    ("".join(f"a{i}: &a{i} [*a{i - 1}]\n" if i else "a0: &a0 [1]\n" for i in range(40)),
     "nested more than 32 levels deep"),  # shallow text, deep once expanded
])
def test_yaml_aliases_are_bounded(tmp_path, text, problem):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    start = time.perf_counter()
    assert problem in one_line(pytest.raises(UserError, config.from_args, str(path), {}))
    assert time.perf_counter() - start < 1


def test_ordinary_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &base {lr: 0.2, momentum: 0.8}\n")
    assert config.load_yaml(path)["base"]["lr"] == 0.2
    path.write_text("optim: &o {lr: 0.2}\nrun: {}\nschedule: {epochs: 2}\n")
    assert config.from_args(str(path), {}).optim.lr == 0.2
    path.write_text("optim:\n  <<: {lr: 0.2, momentum: 0.5}\n  momentum: 0.8\n")
    cfg = config.from_args(str(path), {})
    assert (cfg.optim.lr, cfg.optim.momentum) == (0.2, 0.8)


# ---- values: text length, list items, numbers in stage lists, what a message shows ---------------------
def test_texts_and_lists_have_a_length_limit():
    assert len(config.from_args(None, {"run.run_dir": "r" * config.MAX_TEXT}).run.run_dir) == config.MAX_TEXT
    message = one_line(pytest.raises(UserError, config.from_args, None, {"run.run_dir": "r" * (config.MAX_TEXT + 1)}))
    assert message == f"run.run_dir: a text of {config.MAX_TEXT + 1} characters is longer than the limit of 4096"
    stages = ",".join(f"{e}:16" for e in range(config.MAX_ITEMS + 1))
    assert one_line(pytest.raises(UserError, config.from_args, None, {"schedule.stages": stages})) == \
        f"schedule.stages: a list of {config.MAX_ITEMS + 1} items is longer than the limit of {config.MAX_ITEMS}"


def test_messages_show_a_bounded_part_of_a_huge_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"? {'x' * 20_000}\n: 1\n")  # an explicit key: a plain one has at most 1024 characters
    assert one_line(pytest.raises(UserError, config.from_args, str(path), {})).startswith("unknown config section 'xxx")
    path.write_text(f"optim: [{', '.join(['1'] * 1000)}]\n")
    assert "must be a mapping, got [1, 1, 1, 1, 1, 1, ...]" in one_line(
        pytest.raises(UserError, config.from_args, str(path), {}))


def test_stage_numbers_are_below_2_to_the_63():
    assert parse_stages(f"0:{2**63 - 1}") == ((0, 2**63 - 1),)
    message = one_line(pytest.raises(UserError, parse_stages, f"0:{'9' * 4000}"))
    assert message.startswith("bad stage '0:99999999999999999999999999999999999...': write stages as")


# ---- data files ----------------------------------------------------------------------------------------
def idx(dims, payload: bytes) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


def write_fashion(root: Path, images: bytes, labels: bytes):
    (root / "train-images-idx3-ubyte.gz").write_bytes(images)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(labels)


def test_an_idx_header_claiming_huge_sizes_is_refused_before_reading(tmp_path):
    write_fashion(tmp_path, gzip.compress(idx([2**31, 2**16, 2**16], b"")), gzip.compress(idx([1], b"\0")))
    message = one_line(pytest.raises(UserError, build_dataset, "fashion-mnist", tmp_path, True))
    assert message == (f"{tmp_path / 'train-images-idx3-ubyte.gz'}: its header claims 2147483648 x 65536 x 65536 "
                       f"bytes, more than the limit of {data.MAX_SAMPLES} samples and 1 GiB; the file is damaged or "
                       f"not Fashion-MNIST")


def test_a_gzip_bomb_is_read_only_as_far_as_its_header_says(tmp_path):
    bomb = gzip.compress(idx([2, 4, 4], bytes(32)) + bytes(256 << 20), compresslevel=1)  # 256 MiB in ~250 KB
    write_fashion(tmp_path, bomb, gzip.compress(idx([2], b"\0\1")))
    start = time.perf_counter()
    assert "fashion-mnist: cannot read" in one_line(pytest.raises(UserError, build_dataset, "fashion-mnist", tmp_path,
                                                                  True))
    assert time.perf_counter() - start < 1


def test_idx_files_up_to_the_bound_are_read(tmp_path, monkeypatch):
    write_fashion(tmp_path, gzip.compress(idx([2, 4, 4], bytes(range(32)))), gzip.compress(idx([2], b"\3\1")))
    ds = build_dataset("fashion-mnist", tmp_path, True, augment=False)
    assert ds.images.shape == (2, 1, 4, 4) and ds.images.flatten().tolist() == list(range(32))
    assert ds.labels.tolist() == [3, 1]
    monkeypatch.setattr(data, "MAX_IDX_BYTES", 31)
    assert "more than the limit of 100000000 samples and 31 bytes" in one_line(
        pytest.raises(UserError, build_dataset, "fashion-mnist", tmp_path, True))


def cifar_folder(root: Path, entry, protocol=4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(exist_ok=True)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / name).write_bytes(entry if isinstance(entry, bytes) else pickle.dumps(entry, protocol=protocol))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return folder


def test_cifar_files_have_a_size_limit(tmp_path, monkeypatch):
    folder = cifar_folder(tmp_path, {"data": np.zeros((1, 3072), np.uint8), "labels": [0]})
    monkeypatch.setattr(data, "MAX_PICKLE_BYTES", 1000)
    assert one_line(pytest.raises(UserError, build_dataset, "cifar10", tmp_path, False)).startswith(
        f"cifar10: {folder}/") and "is larger than 1000 bytes, far more than a CIFAR10 file; re-download" in one_line(
        pytest.raises(UserError, build_dataset, "cifar10", tmp_path, False))


def test_imagenet_class_count_is_bounded_before_the_scan(tmp_path, monkeypatch):
    for name in "abc":
        (tmp_path / "train" / name).mkdir(parents=True)
    monkeypatch.setattr(data, "MAX_CLASSES", 2)
    assert "has 3 class folders, more than the limit of 2" in one_line(
        pytest.raises(UserError, build_dataset, "imagenet", tmp_path, True))


def test_synthetic_channels_are_bounded():
    assert "with 1..1024 channels" in one_line(pytest.raises(
        UserError, build_dataset, "synthetic", None, True, synthetic_shape=(1025, 1, 1)))


# ---- what the inputs size: the models' first layer, the micro-batch search -------------------------------
@pytest.mark.parametrize("name, info", [("fmnist_cnn", DatasetInfo(10, 1, 32768)), ("mlp", DatasetInfo(10, 64, 1024))])
def test_models_sized_by_the_image_are_refused_before_allocating(name, info):
    message = one_line(pytest.raises(UserError, build_model, name, info))
    assert "weights, more than the limit of 1,073,741,824" in message


def test_micro_batch_candidates_of_a_huge_prime_batch_come_at_once():
    start = time.perf_counter()
    assert candidates(2**40 - 87) == [2**40 - 87, 1]  # a prime: counting down would take 2^40 steps
    assert candidates(2**40, below=2**20) == [2**19, 2**18, 2**17, 2**16]
    assert time.perf_counter() - start < 2


# ---- adabatch-report -----------------------------------------------------------------------------------
def test_report_refuses_a_huge_metrics_file_and_a_yaml_bomb_costs_only_the_label(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test_acc": 0.5}) + "\n")
    (run / "config.yaml").write_text(alias_chain(9, 10))
    assert report.main([str(run), "-o", str(tmp_path / "out.png")]) == 0
    from adabatch_hvd import rundir

    monkeypatch.setattr(rundir, "MAX_METRICS_BYTES", 10)
    assert report.main([str(run), "-o", str(tmp_path / "out.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"adabatch-report: error: metrics file {run / 'metrics.jsonl'} is larger than 10 bytes (read "
                   f"stopped there); far more than a run's epoch records; is it a run dir's metrics.jsonl?"]


def test_read_limited_reads_exactly_up_to_the_limit(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10)
    assert limits.read_limited(path, 10, "file", "hint") == b"x" * 10
    assert one_line(pytest.raises(UserError, limits.read_limited, path, 9, "file", "hint")) == \
        f"file {path} is larger than 9 bytes (read stopped there); hint"
    assert [limits.size_text(n) for n in (1 << 20, 3 << 30, 1000, 2048)] == ["1 MiB", "3 GiB", "1000 bytes", "2 KiB"]

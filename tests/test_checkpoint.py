"""Checkpoints: write order, pruning that never loses a usable checkpoint, and unusable files set aside."""

import json
import subprocess
import sys

import pytest
import torch

from adabatch_hvd import checkpoint
from adabatch_hvd.errors import UserError
from conftest import ROOT, hvd_env

TINY = ["--data.name", "synthetic", "--synthetic-samples", "64", "--synthetic-shape", "1,8,8", "--model.name", "mlp",
        "--initial-batch", "16", "--quiet", "true"]


def train(*args):
    return subprocess.run([sys.executable, "-m", "adabatch_hvd", *TINY, *map(str, args)], cwd=ROOT, env=hvd_env(),
                          capture_output=True, text=True, timeout=300)


def state(epoch, step, value=1.0):
    return {"epoch": epoch, "global_step": step, "model": {"w": torch.full((3,), value)}}


def names(d):
    return [p.name for p in checkpoint.list_checkpoints(d)]


def index(d):
    return json.loads((d / checkpoint.INDEX).read_text())["order"]


def test_resume_takes_the_newest_by_write_order_not_the_highest_step(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(state(1, step), tmp_path, keep=5)
    old = tmp_path / checkpoint.checkpoint_name(1, 10)
    checkpoint.make_current(old)  # a run resumed from the oldest one ...
    assert checkpoint.load("latest", tmp_path)[1] == old  # ... and crashed before its first checkpoint
    checkpoint.save(state(1, 15), tmp_path, keep=5, protect=old)  # its history goes on from step 10
    assert names(tmp_path) == [checkpoint.checkpoint_name(1, s) for s in (15, 10, 30, 20)]
    assert checkpoint.load("latest", tmp_path)[0]["global_step"] == 15  # not 30, from the abandoned history
    assert index(tmp_path) == [checkpoint.checkpoint_name(1, s) for s in (20, 30, 10, 15)]


def test_pruning_keeps_the_newest_written_and_the_one_resumed_from(tmp_path):
    for step in (10, 20, 30):
        checkpoint.save(state(1, step), tmp_path, keep=3)
    resumed = tmp_path / checkpoint.checkpoint_name(1, 10)
    checkpoint.make_current(resumed)
    for step in (11, 12, 13, 14):
        checkpoint.save(state(1, step), tmp_path, keep=1, protect=resumed)
        assert set(names(tmp_path)) == {checkpoint.checkpoint_name(1, step), resumed.name}
    checkpoint.save(state(1, 15), tmp_path, keep=1)  # a later process no longer protects it
    assert names(tmp_path) == [checkpoint.checkpoint_name(1, 15)]


def test_files_the_index_does_not_list_are_never_counted_or_deleted(tmp_path):
    stranger = tmp_path / checkpoint.checkpoint_name(9, 999)  # copied in, with the highest step
    torch.save({"format": checkpoint.FORMAT, **state(9, 999)}, stranger)
    for step in (10, 20, 30):
        checkpoint.save(state(1, step), tmp_path, keep=2)
    assert names(tmp_path) == [checkpoint.checkpoint_name(1, 30), checkpoint.checkpoint_name(1, 20), stranger.name]
    assert checkpoint.load("latest", tmp_path)[0]["global_step"] == 30
    for p in checkpoint.list_checkpoints(tmp_path)[:2]:
        p.unlink()  # every listed checkpoint gone: the unlisted one is the last resort
    assert checkpoint.load("latest", tmp_path)[1] == stranger


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "not a checkpoint", "nan weights", "inf momentum"])
def test_an_unusable_newest_checkpoint_is_renamed_and_the_previous_one_used(tmp_path, caplog, damage):
    for step in (10, 20):
        checkpoint.save(state(1, step), tmp_path, keep=5)
    newest = tmp_path / checkpoint.checkpoint_name(1, 20)
    if damage == "random bytes":
        newest.write_bytes(bytes(range(256)) * 40)
    elif damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:100])
    elif damage == "not a checkpoint":
        torch.save({"weights": torch.ones(2)}, newest)
    elif damage == "nan weights":
        torch.save({"format": checkpoint.FORMAT, **state(1, 20, float("nan"))}, newest)
    else:
        torch.save({"format": checkpoint.FORMAT, **state(1, 20), "optimizer": {"state": {0: {
            "momentum_buffer": torch.tensor([1.0, float("inf")])}}}}, newest)
    loaded, path = checkpoint.load("latest", tmp_path)
    assert loaded["global_step"] == 10 and path.name == checkpoint.checkpoint_name(1, 10)
    bad = tmp_path / (newest.name + ".bad")
    assert bad.is_file() and not newest.exists()  # set aside, not deleted
    assert f"checkpoint {newest} is unusable" in caplog.text and f"renamed it to {bad.name}" in caplog.text
    if "nan" in damage or "inf" in damage:
        assert "NaN/Inf" in caplog.text and ("model['w']" in caplog.text or "momentum_buffer" in caplog.text)
    assert index(tmp_path) == [checkpoint.checkpoint_name(1, 10)]
    with pytest.raises(UserError, match=f"cannot load checkpoint {bad}"):
        checkpoint.load(bad)  # an explicit path must be usable
    checkpoint.save(state(1, 30), tmp_path, keep=1)
    assert names(tmp_path) == [checkpoint.checkpoint_name(1, 30)] and bad.is_file()


def test_every_checkpoint_unusable_is_one_error(tmp_path):
    for step in (10, 20):
        path = checkpoint.save(state(1, step), tmp_path, keep=5)
        path.write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"no usable checkpoint in .* \(2 tried"):
        checkpoint.load("latest", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [checkpoint.INDEX] + [checkpoint.checkpoint_name(1, s) + ".bad" for s in (10, 20)])


def test_a_damaged_index_falls_back_to_step_order(tmp_path, caplog):
    for step in (10, 20):
        checkpoint.save(state(1, step), tmp_path, keep=5)
    (tmp_path / checkpoint.INDEX).write_text('{"order": [')
    assert checkpoint.load("latest", tmp_path)[0]["global_step"] == 20
    assert "index" in caplog.text and "ordering checkpoints by step" in caplog.text


def test_garbage_with_the_highest_step_then_resume_keep_1_loses_nothing(tmp_path):
    """The issue's reproduction: random bytes named like the newest checkpoint, then --resume --keep 1."""
    run = tmp_path / "run"
    first = train("--epochs", "2", "--run-dir", run)
    assert first.returncode == 0, first.stderr[-3000:]
    garbage = run / "checkpoints" / checkpoint.checkpoint_name(9, 999)
    garbage.write_bytes(bytes(range(256)) * 64)
    second = train("--epochs", "3", "--run-dir", run, "--resume", "--keep", "1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / checkpoint.checkpoint_name(2, 8)}" in second.stderr
    assert garbage.exists()  # unlisted: neither trusted nor deleted
    assert names(run / "checkpoints")[0] == checkpoint.checkpoint_name(3, 10)  # epoch 2: 2 steps of 32
    third = train("--epochs", "4", "--run-dir", run, "--resume", "--keep", "1")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / checkpoint.checkpoint_name(3, 10)}" in third.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_resume_from_an_explicit_older_checkpoint_then_plain_resume_continues_it(tmp_path):
    run = tmp_path / "run"
    first = train("--epochs", "3", "--run-dir", run, "--keep", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = run / "checkpoints"
    older = ckpts / checkpoint.checkpoint_name(1, 4)
    branch = train("--epochs", "3", "--run-dir", run, "--resume", older, "--stop-after-steps", "2")
    assert branch.returncode == 0, branch.stderr[-3000:]
    assert names(ckpts)[:2] == [checkpoint.checkpoint_name(1, 6), older.name]
    plain = train("--epochs", "3", "--run-dir", run, "--resume")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert f"resuming from {ckpts / checkpoint.checkpoint_name(1, 6)}" in plain.stderr


def test_a_truncated_last_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    from adabatch_hvd import rundir

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "x": 1}\n\n{"epoch": 1, "x": 2}\nnot json\n{"epoch": 2, "x": 3}\n{"epoch": 3, "tra')
    rundir.truncate_metrics(path, 3)
    assert path.read_text() == '{"epoch": 0, "x": 1}\n{"epoch": 1, "x": 2}\n{"epoch": 2, "x": 3}\n'
    assert "line 4 is not a whole epoch record" in caplog.text and "line 6" in caplog.text


def test_resume_after_a_crash_mid_line_in_metrics(tmp_path):
    run = tmp_path / "run"
    first = train("--epochs", "2", "--run-dir", run)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "stage": 1, "global_batch": 3')  # the crash: no newline, no closing brace
    resumed = train("--epochs", "3", "--run-dir", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "is not a whole epoch record" in resumed.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]

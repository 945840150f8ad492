"""The run dir across runs: config changes on resume, runs that fail early, per-step TensorBoard, flags."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adabatch_hvd import cli, config
from adabatch_hvd.errors import UserError
from conftest import ROOT, hvd_env

# Plain boolean flags and the --data/--model shorthands, as a user types them.
TINY = ["--data", "synthetic", "--synthetic-samples", "64", "--synthetic-shape", "1,8,8", "--model", "mlp",
        "--initial-batch", "16", "--quiet", "--no-augment"]


def train(*args, tiny=True):
    return subprocess.run([sys.executable, "-m", "adabatch_hvd", *(TINY if tiny else []), *map(str, args)], cwd=ROOT,
                          env=hvd_env(), capture_output=True, text=True, timeout=300)


def error_line(proc, code=2, alone=True):
    """The one error line; `alone`: nothing else on stderr (the run failed before logging anything)."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("adabatch-train: error: ")]
    assert len(lines) == 1 and (not alone or len(proc.stderr.strip().splitlines()) == 1), proc.stderr[-3000:]
    return lines[0]


def files(run):
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in run.rglob("*") if p.is_file()}


def parse(*argv):
    args = cli._parser("adabatch-train", "").parse_args(list(map(str, argv)))
    return config.from_args(args.config, cli._overrides(args))


# ---- config changes on resume ------------------------------------------------------------------
def saved(**overrides):
    return config.to_dict(config.from_args(None, {"schedule.epochs": 6, **overrides}))


@pytest.mark.parametrize("key, value, why", [
    ("data.name", "synthetic", "the data set"), ("data.train_samples", 1000, "the training set"),
    ("model.name", "mlp", "the model"), ("run.seed", 7, "the data order"),
    ("optim.momentum", 0.5, "the optimizer state"), ("optim.weight_decay", 0.0, "the optimizer state"),
])
def test_resume_refuses_another_data_set_model_seed_or_optimizer(key, value, why):
    with pytest.raises(UserError, match=f"resume changes {key} from .* to {value!r}, which would change {why}"):
        config.resume_changes(saved(), config.from_args(None, {"schedule.epochs": 6, key: value}), 2, 0)


@pytest.mark.parametrize("overrides, epoch, offset, message", [
    ({"schedule.initial_batch": 64}, 1, 0, r"epoch 0 \(already run\): global batch 128 -> 64"),
    ({"schedule.stages": "0:128,1:512"}, 2, 0, r"epoch 1 \(already run\): global batch 128 -> 512"),
    ({"optim.lr": 0.1}, 1, 0, r"resume changes optim.lr, which changes epoch 0 .* lr 0.05 -> 0.1"),
    ({"schedule.interval": 1}, 1, 500, r"epoch 1 \(already run\): global batch 128 -> 256"),  # mid-epoch 1
    ({"schedule.warmup_epochs": 2.0}, 1, 0, "epoch 0 .already run."),
    ({"schedule.epochs": 2}, 2, 100, r"--epochs 2 is below the checkpoint's position \(epoch 2, 3 epochs started\)"),
])
def test_resume_refuses_another_schedule_for_epochs_already_run(overrides, epoch, offset, message):
    with pytest.raises(UserError, match=message):
        config.resume_changes(saved(), config.from_args(None, {"schedule.epochs": 6, **overrides}), epoch, offset)


def test_resume_allows_more_epochs_another_cap_and_a_later_schedule():
    new = config.from_args(None, {"schedule.epochs": 10, "schedule.max_micro_batch": 32, "schedule.max_batch": 256,
                                  "checkpoint.keep": 5, "run.resume": "latest", "run.stop_after_steps": 3})
    changes = config.resume_changes(saved(), new, 2, 0)  # epochs 0-1 (batch 128) are unchanged by max_batch 256
    assert changes == {"schedule.epochs": (6, 10), "schedule.max_batch": (None, 256),
                       "schedule.max_micro_batch": (None, 32), "checkpoint.keep": (3, 5)}
    assert config.resume_changes(saved(), config.from_args(None, {"schedule.epochs": 6}), 6, 0) == {}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    proc = train("--epochs", "2", "--run-dir", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_incoherent_resumes_are_one_line_and_change_nothing(finished):
    before = files(finished)
    for args, message in [
        (["--epochs", "2", "--synthetic-samples", "128"], "resume changes data.synthetic_samples from 64 to 128, "
         "which would change the data set of a run in progress; resume with the checkpoint's value"),
        (["--epochs", "2", "--stages", "0:32"], "changes epoch 0 (already run): global batch 16 -> 32"),
        (["--epochs", "1"], "--epochs 1 is below the checkpoint's position (epoch 2, 2 epochs started); give "
                            "--epochs 2 or more"),
    ]:
        assert message in error_line(train("--run-dir", finished, "--resume", *args))
        assert files(finished) == before


def test_resume_of_a_finished_run_with_no_more_epochs_is_a_no_op(finished):
    before = files(finished)
    proc = train("--epochs", "2", "--run-dir", finished, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to train: the checkpoint is at the end of epoch 1 and --epochs is 2" in proc.stderr
    records = {k: v for k, v in files(finished).items() if k != "train.log" and not k.startswith("tb/")}
    assert records == {k: v for k, v in before.items() if k != "train.log" and not k.startswith("tb/")}
    assert "config-history.jsonl" not in records  # config.yaml, metrics and checkpoints are as they were


def test_safe_changes_are_logged_and_kept_in_the_history(tmp_path, finished):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    proc = train("--epochs", "4", "--max-micro-batch", "8", "--run-dir", run, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resume changes schedule.epochs: 2 -> 4" in proc.stderr
    assert "resume changes schedule.max_micro_batch: None -> 8" in proc.stderr
    history = [json.loads(line) for line in (run / "config-history.jsonl").read_text().splitlines()]
    assert history == [{"time": history[0]["time"], "epoch": 2, "offset": 0, "global_step": 8, "changes": {
        "schedule.epochs": {"from": 2, "to": 4}, "schedule.max_micro_batch": {"from": None, "to": 8},
        "run.run_dir": {"from": str(finished), "to": str(run)}}}]  # a copied (moved) run dir is allowed too
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["schedule"]["epochs"] == 4 and cfg["schedule"]["max_micro_batch"] == 8
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["global_batch"], r["accum_steps"]) for r in records] == [(0, 16, 1), (1, 16, 1),
                                                                                   (2, 32, 4), (3, 32, 4)]


# ---- runs that fail early leave nothing behind --------------------------------------------------
def test_a_run_that_fails_during_set_up_leaves_no_run_dir(tmp_path):
    run = tmp_path / "new" / "deeper" / "run"
    proc = train("--run-dir", run, "--data", "cifar10", "--data.root", tmp_path / "no-cifar", tiny=False)
    assert "cifar-10-python.tar.gz" in error_line(proc)
    assert not (tmp_path / "new").exists()  # nor the parents it made
    existing = tmp_path / "mine"
    (existing / "notes.txt").parent.mkdir()
    (existing / "notes.txt").write_text("keep me")
    train("--run-dir", existing, "--data", "cifar10", "--data.root", tmp_path / "no-cifar", tiny=False)
    assert sorted(p.name for p in existing.iterdir()) == ["notes.txt"]  # no train.log, no tb/


def test_a_run_that_fails_at_its_first_step_leaves_no_run_dir(tmp_path):
    data = tmp_path / "imagenet"
    for split in ("train", "val"):
        for name in ("a", "b"):
            (data / split / name).mkdir(parents=True)
            for k in range(4):
                (data / split / name / f"{k}.JPEG").write_bytes(b"not an image")
    run = tmp_path / "run"
    proc = train("--run-dir", run, "--data", "imagenet", "--data.root", data, "--model", "mlp",
                 "--initial-batch", "4", "--epochs", "1", "--quiet", tiny=False)
    assert error_line(proc, alone=False).startswith(f"adabatch-train: error: cannot read image {data}/train/")
    assert not run.exists()


# ---- YAML as users write it, and the flags ------------------------------------------------------------------
def test_yaml_stages_with_colons_and_resume_true(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"schedule:\n  stages: [0:16, 1:32]\n  epochs: 2\nrun: {{run_dir: {tmp_path / 'run'}}}\n")
    first = train("--config", cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_batch"] for r in records] == [16, 32]
    cfg.write_text(cfg.read_text().replace("epochs: 2", "epochs: 3").replace("run: {", "run: {resume: true, "))
    again = train("--config", cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 3


def test_boolean_flags_shorthands_and_gpu():
    cfg = parse("--quiet", "--no-augment", "--data", "cifar10", "--model", "resnet20", "--device", "GPU",
                "--nesterov", "--no-quiet", "--resume")
    assert (cfg.run.quiet, cfg.data.augment, cfg.optim.nesterov) == (False, False, True)
    assert (cfg.data.name, cfg.model.name, cfg.run.device, cfg.run.resume) == ("cifar10", "resnet20", "cuda", "latest")
    assert parse("--quiet", "false", "--data.augment", "yes").run.quiet is False
    assert parse("--resume", "true").run.resume == "latest" and parse("--resume", "no").run.resume is None


def test_device_gpu_means_cuda_end_to_end(tmp_path):
    import torch

    proc = train("--device", "gpu", "--epochs", "1", "--run-dir", tmp_path / "run")
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:
        assert "run.device=cuda but no CUDA device is visible" in error_line(proc)
        assert not (tmp_path / "run").exists()


# ---- TensorBoard per step -----------------------------------------------------------------------------------
def scalars(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_per_step_on_samples_seen_survives_a_resume(tmp_path):
    run = tmp_path / "run"
    first = train("--epochs", "3", "--log-every-steps", "2", "--keep", "5", "--run-dir", run)
    assert first.returncode == 0, first.stderr[-3000:]
    # 64 samples: epochs 0-1 at batch 16 (4 steps each), epoch 2 at batch 32 (2 steps); a point every 2 steps
    expected = [32, 64, 96, 128, 192]
    steps = scalars(run / "tb" / "steps")
    assert sorted(steps) == ["elastic/world_size", "step/global_batch", "step/lr", "step/samples_per_sec",
                             "step/train_loss"]
    assert steps["elastic/world_size"] == [(0, 1)]  # at the start, on the same axis
    assert [s for s, _ in steps["step/train_loss"]] == expected
    assert [v for _, v in steps["step/global_batch"]] == [16, 16, 16, 16, 32]
    assert [v for _, v in steps["step/lr"]] == pytest.approx([0.05] * 4 + [0.05 * 2 * 0.375])
    assert all(v > 0 for _, v in steps["step/samples_per_sec"]) and all(0 < v < 10 for _, v in
                                                                       steps["step/train_loss"])
    assert [s for s, _ in scalars(run / "tb")["train/loss"]] == [0, 1, 2]  # the per-epoch scalars stay

    # Resume from the end of epoch 0: what the first run wrote after it is purged, then rewritten once.
    older = run / "checkpoints" / "ckpt-e0001-s000000004.pt"
    again = train("--epochs", "3", "--log-every-steps", "2", "--run-dir", run, "--resume", older)
    assert again.returncode == 0, again.stderr[-3000:]
    steps = scalars(run / "tb" / "steps")
    assert [s for s, _ in steps["step/train_loss"]] == expected
    assert steps["elastic/world_size"] == [(0, 1), (64, 1)]  # the resumed start: 1 epoch of 64 samples seen
    assert [s for s, _ in scalars(run / "tb")["train/loss"]] == [0, 1, 2]

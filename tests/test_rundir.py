"""The run dir across runs: config changes on resume, runs that fail early, per-step TensorBoard, flags."""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
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


def test_a_start_records_where_its_time_went(finished):
    """timing.jsonl: rank 0's phases from its process's start to the run's end, in order, and the start-up
    in train.log (a resume with nothing to train adds none: the no-op test below sees no file change)."""
    (rec,) = [json.loads(line) for line in (finished / "timing.jsonl").read_text().splitlines()]
    order = ["interpreter", "import torch, horovod", "horovod init", "import trainer", "data", "model", "agreement",
             "tensorboard", "first step", "training", "finish"]
    assert list(rec["marks"]) == list(rec["phases"]) == order
    times = [rec["process_start"], *rec["marks"].values()]
    assert times == sorted(times) and all(v >= 0 for v in rec["phases"].values())
    assert sum(rec["phases"].values()) == pytest.approx(rec["marks"]["finish"] - rec["process_start"], abs=0.02)
    assert rec["marks"]["finish"] - rec["process_start"] < 300 and time.time() - rec["process_start"] < 3600
    assert {k: v["count"] for k, v in rec["repeated"].items()} == {"evaluation": 2, "checkpoint": 2}
    assert rec["repeated"]["evaluation"]["seconds"] < rec["phases"]["training"] and rec["world_size"] == 1
    (line,) = [line for line in (finished / "train.log").read_text().splitlines() if "start-up:" in line]
    assert re.search(r"start-up: [\d.]+ s from the process's start to the end of its first step: interpreter [\d.]+, "
                     r"import torch, horovod [\d.]+, .*, first step [\d.]+$", line), line


def test_a_timing_record_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    from adabatch_hvd import phases

    phases.record(tmp_path / "missing" / "timing.jsonl", world_size=1)  # the run is over: it does not fail for this
    assert "timing.jsonl not written: No such file or directory" in caplog.text


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
    assert files(finished) == before  # train.log, tb/, config.yaml, metrics and checkpoints as they were
    assert not (finished / ".lock").exists()


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


# ---- no start mode destroys a run; one job per run dir; problems found before the first step ---------------
def test_no_start_mode_starts_over_a_run_without_a_checkpoint(tmp_path, finished):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    shutil.rmtree(run / "checkpoints")
    before = files(run)
    message = (f"run dir {run} holds a run that cannot be continued (records of epochs 0-1 in metrics.jsonl; no "
               f"usable checkpoint); to keep it, choose a new --run-dir; to start over in it, move its files away first")
    for mode in ([], ["--resume"], ["--resume", "auto"], ["--resume", "auto", "--model", "fmnist_cnn"]):
        assert error_line(train("--epochs", "2", "--run-dir", run, *mode)) == f"adabatch-train: error: {message}"
        assert files(run) == before


def test_corrupt_checkpoints_are_refused_by_every_mode_and_every_time(tmp_path, finished):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for ckpt in (run / "checkpoints").glob("*.pt"):
        ckpt.write_bytes(b"garbage")
    records = (run / "metrics.jsonl").read_bytes(), (run / "config.yaml").read_bytes()
    before = files(run)
    plain = error_line(train("--epochs", "2", "--run-dir", run))
    assert "holds a run that cannot be continued" in plain and files(run) == before  # a plain start renames nothing
    for attempt in range(2):  # what a requeued job does: the same command again
        line = error_line(train("--epochs", "2", "--run-dir", run, "--resume", "auto"), alone=False)
        assert "holds a run that cannot be continued (records of epochs 0-1 in metrics.jsonl, 2 unusable " \
               "checkpoint(s) set aside as *.bad; no usable checkpoint)" in line, line
        assert ((run / "metrics.jsonl").read_bytes(), (run / "config.yaml").read_bytes()) == records
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "ckpt-e0001-s000000004.pt.bad", "ckpt-e0002-s000000008.pt.bad", "index.json"]


def test_resume_auto_starts_a_new_run_dir_and_one_that_saved_nothing(tmp_path):
    run = tmp_path / "run"
    first = train("--epochs", "1", "--run-dir", run, "--resume", "auto")
    assert first.returncode == 0 and "resuming" not in first.stderr, first.stderr[-3000:]
    assert first.stderr.count("torch threads per rank: 1 (from OMP_NUM_THREADS=1)") == 1  # hvd_env sets it
    for name in ("metrics.jsonl", "checkpoints"):  # what a start killed in its first epoch leaves
        shutil_rm(run / name)
    again = train("--epochs", "1", "--run-dir", run, "--resume", "auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds a start that saved nothing (no epoch record, no checkpoint): starting it over" in again.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0]


def shutil_rm(path):
    import shutil

    shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_a_file_in_the_run_dirs_way_is_found_before_the_first_step(tmp_path):
    for name, kind, message in [("checkpoints", "file", "holds a file {} where a directory goes"),
                                ("tb/steps", "file", "holds a file {} where a directory goes"),
                                ("metrics.jsonl", "dir", "holds {}, which is not a regular file")]:
        run = tmp_path / name.replace("/", "-") / "run"
        (run / name).parent.mkdir(parents=True)
        (run / name).mkdir() if kind == "dir" else (run / name).write_text("")
        before = files(run)
        proc = train("--epochs", "1", "--run-dir", run)
        assert message.format(run / name) in error_line(proc), proc.stderr
        assert files(run) == before and sorted(p.name for p in run.iterdir()) == [name.split("/")[0]]


def test_a_cut_record_is_restored_from_the_checkpoint(tmp_path, finished):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    whole = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(whole[0] + "\n" + whole[1][: len(whole[1]) // 2])  # a crash mid-write
    proc = train("--epochs", "3", "--run-dir", run, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lacked the record of epoch 1: restored it from checkpoint" in proc.stderr
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[:2] == whole and json.loads(lines[2])["epoch"] == 2


def test_a_stop_signal_as_soon_as_the_process_starts_stops_at_the_first_step(tmp_path):
    """The handlers are the first thing adabatch-train installs: SIGUSR1 the moment they are in place (seen
    in /proc) reaches a process that has not imported torch yet, and stops the run at its first step."""
    import signal

    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "adabatch_hvd", *TINY, "--epochs", "2", "--run-dir", run], cwd=ROOT,
                            env=hvd_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    usr1 = 1 << (signal.SIGUSR1 - 1)
    while True:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
        if caught & usr1:
            torch_loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
            proc.send_signal(signal.SIGUSR1)
            break
    out, err = proc.communicate(timeout=300)
    assert not torch_loaded
    assert proc.returncode == 75, err[-3000:]
    assert "stopped on request (SIGUSR1)" in err and "Traceback" not in err
    assert [p.name for p in (run / "checkpoints").glob("*.pt")] == ["ckpt-e0000-s000000001.pt"]


# ---- the run dir's lock --------------------------------------------------------------------------------------
def test_a_second_job_on_a_run_dir_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    import signal

    run = tmp_path / "run"
    long = ["--synthetic-samples", "20000", "--epochs", "1000", "--max-batch", "16", "--every-steps", "200",
            "--threads", "1"]
    first = subprocess.Popen([sys.executable, "-m", "adabatch_hvd", *TINY, *long, "--run-dir", run], cwd=ROOT,
                             env=hvd_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 120
        while not list((run / "checkpoints").glob("*.pt")) and time.monotonic() < end and first.poll() is None:
            time.sleep(0.1)
        assert first.poll() is None, first.communicate()[1][-3000:]
        config_yaml = (run / "config.yaml").read_text()
        for mode in ([], ["--resume", "auto"], ["--lr", "0.1"]):
            line = error_line(train(*long, "--run-dir", run, *mode))
            assert re.fullmatch(rf"adabatch-train: error: run dir {run} is in use by another job \(host "
                                rf"{re.escape(socket.gethostname())}, pid {first.pid}, since \S+\); wait for it to "
                                rf"end, or choose another --run-dir .*", line), line
        assert (run / "config.yaml").read_text() == config_yaml
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(len(records))) and records[0]["lr"] == 0.05
    resumed = train(*long, "--run-dir", run, "--resume", "auto", "--stop-after-steps", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the lock of host {socket.gethostname()}, pid {first.pid}" in resumed.stderr
    assert f"its process {first.pid} on this host is gone" in resumed.stderr
    assert not (run / ".lock").exists()


def lock_file(run, **holder):
    run.mkdir(parents=True, exist_ok=True)
    (run / ".lock").write_text(json.dumps({"host": "node-elsewhere", "host_id": "x", "pid": 1, "start_time": 1,
                                           "since": "2026-01-01T00:00:00+0000", "token": "other", **holder}))


def test_a_lock_from_another_host_is_stale_only_when_its_heartbeat_stops(tmp_path, monkeypatch):
    import threading

    from adabatch_hvd import runlock

    monkeypatch.setattr(runlock, "STALE", 1.5)
    lock_file(tmp_path)  # its heartbeat moves: the holder lives, however old its start
    beating = threading.Event()

    def beat():
        while not beating.wait(0.2):
            os.utime(tmp_path / ".lock")

    thread = threading.Thread(target=beat)
    thread.start()
    try:
        with pytest.raises(UserError, match=r"is in use by another job \(host node-elsewhere, pid 1, since 2026"):
            runlock.RunLock(tmp_path, "mine").acquire()
    finally:
        beating.set()
        thread.join()
    stale = time.time() - 60
    os.utime(tmp_path / ".lock", (stale, stale))  # a dead host's lock: taken over
    lock = runlock.RunLock(tmp_path, "mine")
    lock.acquire()
    assert lock.holds() and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_lock_from_another_pid_namespace_on_this_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    """Containers on one host (`--network host`: the same host name and boot id) do not share pids: a pid
    that is not alive here says nothing about a holder in another container, whose heartbeat moves."""
    from adabatch_hvd import runlock

    monkeypatch.setattr(runlock, "STALE", 1.0)
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    lock_file(tmp_path, host=socket.gethostname(), host_id=f"{boot_id}/pid:[1]", pid=2**22 + 1)
    os.utime(tmp_path / ".lock")
    calls = []
    monkeypatch.setattr(runlock.time, "sleep", lambda s: (calls.append(s), os.utime(tmp_path / ".lock", (
        time.time() + len(calls), time.time() + len(calls)))))  # the holder's heartbeat moves while we watch
    with pytest.raises(UserError, match="is in use by another job"):
        runlock.RunLock(tmp_path, "mine").acquire()
    assert calls  # it watched the heartbeat: not taken over for a pid missing in this namespace


def test_the_same_job_takes_its_lock_over_and_a_lost_race_is_retried(tmp_path):
    from adabatch_hvd import runlock

    lock_file(tmp_path, token="job")  # an elastic job's rank 0 moved to this process
    lock = runlock.RunLock(tmp_path, "job")
    lock.acquire()
    assert lock.holds()
    other = runlock.RunLock(tmp_path, "other")
    with pytest.raises(UserError, match=f"pid {os.getpid()}"):  # a live holder on this host: refused at once
        other.acquire()
    lock.release()
    other.acquire()
    assert other.holds() and not lock.holds()
    other.release()


def test_a_full_disk_is_one_line_and_exit_4_with_the_last_checkpoint_kept(tmp_path):
    """The disk fills while the run writes TensorBoard events and checkpoints: one line, exit 4, no traceback
    from TensorBoard's writer thread, and the checkpoint written before is intact."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", disk], capture_output=True, text=True)
    assert mounted.returncode == 0, f"needs root to mount a small tmpfs: {mounted.stderr}"
    try:
        run = disk / "run"
        proc = subprocess.Popen([sys.executable, "-m", "adabatch_hvd", *TINY, "--synthetic-samples", "20000",
                                 "--synthetic-shape", "1,16,16", "--epochs", "4", "--every-steps", "50",
                                 "--log-every-steps", "1", "--threads", "1", "--run-dir", run], cwd=ROOT,
                                env=hvd_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not (run / "checkpoints" / "index.json").exists() and proc.poll() is None:
            time.sleep(0.02)
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=1k"], capture_output=True)
        _, err = proc.communicate(timeout=300)
        line = error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", err), code=4, alone=False)
        assert line.startswith("adabatch-train: error: no space left on device tmpfs (mounted on "), line
        assert "Traceback" not in err and "Exception in thread" not in err, err[-3000:]
        from adabatch_hvd import checkpoint

        assert checkpoint.first_usable(run / "checkpoints") is not None
        assert not (run / ".lock").exists()
    finally:
        subprocess.run(["umount", "-l", disk])

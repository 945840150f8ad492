"""Running for real: exact resume after SIGKILL, checkpoints, TensorBoard, report, NaN, killed worker."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from adabatch_hvd import checkpoint
from adabatch_hvd.errors import UserError
from conftest import (BIN, ROOT, TIMING, final_weights, horovodrun_cmd, hvd_env, processes_with, records,
                      wait_for)

RUN = ["--config", "configs/fashion_mnist.yaml", "--train-samples", "3000", "--test-samples", "1000",
       "--epochs", "4", "--interval", "2", "--initial-batch", "32", "--max-micro-batch", "16",
       "--every-steps", "3", "--keep", "4", "--quiet", "true"]
STAGE1_FIRST_STEP = 2 * 94  # stage 0: 2 epochs of ceil(3000 / 32) = 94 steps


def hvd_cmd(run_dir, *extra, np=2):
    return horovodrun_cmd([sys.executable, "-m", "adabatch_hvd", *RUN, "--run-dir", run_dir, *extra], np=np)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "straight"
    proc = subprocess.run(hvd_cmd(run), cwd=ROOT, env=hvd_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run


def test_sigkill_mid_epoch_in_stage_two_then_resume_is_exact(uninterrupted, tmp_path):
    run = tmp_path / "killed"
    job = subprocess.Popen(hvd_cmd(run), cwd=ROOT, env=hvd_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    target = STAGE1_FIRST_STEP + 9

    def mid_stage_two():
        return any(checkpoint.position(p)[1] >= target for p in checkpoint.list_checkpoints(run / "checkpoints"))
    try:
        wait_for(mid_stage_two, 300, f"a checkpoint at step >= {target}")
    finally:
        os.killpg(job.pid, signal.SIGKILL)  # horovodrun and both ranks, no chance to clean up
        for pid in processes_with(str(run)):
            os.kill(pid, signal.SIGKILL)
        job.wait(30)
    assert len(records(run)) == 2  # it really died in the middle of the run

    resumed = subprocess.run(hvd_cmd(run, "--resume"), cwd=ROOT, env=hvd_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    line = next(l for l in resumed.stderr.splitlines() if "resuming from" in l)
    epoch, offset = int(line.split("epoch ")[1].split(",")[0]), int(line.split("sample offset ")[1].split(",")[0])
    assert epoch == 2 and 0 < offset < 3000, line  # inside the second stage, mid-epoch

    a, b = final_weights(uninterrupted), final_weights(run)
    worst = max(((a[k].double() - b[k].double()).norm() / a[k].double().norm()).item() for k in a)
    print(f"max relative weight difference after kill + resume: {worst:.3g}")
    assert worst <= 1e-6
    ra, rb = records(uninterrupted), records(run)
    assert [r["epoch"] for r in rb] == [0, 1, 2, 3]
    for x, y in zip(ra, rb):
        for key in x:
            if key not in TIMING:
                assert y[key] == pytest.approx(x[key], rel=1e-9), (key, x, y)


def test_resume_on_another_world_size_keeps_the_global_batch(uninterrupted, tmp_path):
    run = tmp_path / "one"
    first = subprocess.run(hvd_cmd(run, "--stop-after-steps", STAGE1_FIRST_STEP + 12), cwd=ROOT, env=hvd_env(),
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-4000:]
    assert checkpoint.position(checkpoint.latest(run / "checkpoints")) == (2, STAGE1_FIRST_STEP + 12)
    proc = subprocess.run(hvd_cmd(run, "--resume", np=1), cwd=ROOT, env=hvd_env(), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resume changes world_size: 2 -> 1" in proc.stderr  # an allowed change, logged and kept
    history = [json.loads(line) for line in (run / "config-history.jsonl").read_text().splitlines()]
    assert [h["changes"]["world_size"] for h in history] == [{"from": 2, "to": 1}]
    two, one = records(uninterrupted), records(run)
    assert [r["world_size"] for r in one] == [2, 2, 1, 1]
    assert [r["global_batch"] for r in one] == [r["global_batch"] for r in two] == [32, 32, 64, 64]
    assert [(r["per_worker_batch"], r["accum_steps"]) for r in one[2:]] == [(64, 4), (64, 4)]
    assert [(r["per_worker_batch"], r["accum_steps"]) for r in two[2:]] == [(32, 2), (32, 2)]
    assert one[-1]["test_acc"] == pytest.approx(two[-1]["test_acc"], abs=0.02)


def test_tensorboard_events_have_every_tag(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(uninterrupted / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ["train/loss", "train/acc", "test/loss", "test/acc", "lr", "batch/global", "batch/per_worker",
                "batch/micro", "batch/accum_steps", "perf/samples_per_sec", "perf/epoch_seconds",
                "perf/allreduce_wait_share"]:
        assert tag in tags["scalars"], (tag, tags["scalars"])
        assert [e.step for e in acc.Scalars(tag)] == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("batch/global")] == [32, 32, 64, 64]
    assert [e.value for e in acc.Scalars("batch/accum_steps")] == [1, 1, 2, 2]
    assert all(0 <= e.value <= 1 for e in acc.Scalars("perf/allreduce_wait_share"))
    texts = [t.tensor_proto.string_val[0].decode() for t in acc.Tensors("stage/text_summary")]
    assert len(texts) == 2 and "global batch 64" in texts[1] and "was global batch 32" in texts[1]
    hparams = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams)
    assert b"schedule.initial_batch" in hparams["_hparams_/session_start_info"]
    final = [e.value for e in acc.Scalars("hparam/test_acc")]
    assert final == pytest.approx([records(uninterrupted)[-1]["test_acc"]])


def test_report_png_for_two_runs(uninterrupted, tmp_path):
    out = tmp_path / "report.png"
    proc = subprocess.run([str(BIN / "adabatch-report"), str(uninterrupted), str(uninterrupted), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    model = torch.nn.Linear(3, 2)
    for step in (10, 20):
        checkpoint.save({"epoch": 1, "global_step": step, "model": model.state_dict()}, tmp_path, keep=5)
    newest = checkpoint.latest(tmp_path)
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a crash mid-copy
    state, path = checkpoint.load("latest", tmp_path)
    assert state["global_step"] == 10 and path.name == checkpoint.checkpoint_name(1, 10)
    assert "unusable" in caplog.text and newest.name in caplog.text
    with pytest.raises(UserError, match="cannot load checkpoint"):
        checkpoint.load(newest.with_name(newest.name + ".bad"))  # an explicit path must be readable
    for step in (30, 40, 50, 60):
        checkpoint.save({"epoch": 2, "global_step": step}, tmp_path, keep=3)
    assert [checkpoint.position(p) for p in checkpoint.list_checkpoints(tmp_path)] == [(2, 60), (2, 50), (2, 40)]
    assert not list(tmp_path.glob(".tmp-*"))


class Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path, capsys):
    path = tmp_path / checkpoint.checkpoint_name(0, 1)
    torch.save({"format": checkpoint.FORMAT, "epoch": 0, "global_step": 1, "evil": Payload()}, path)
    with pytest.raises(UserError, match="cannot load checkpoint"):
        checkpoint.load(path)
    assert "unpickled arbitrary code" not in capsys.readouterr().out


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # From epoch 1 on the batch is 2^40 (one step per epoch) and, with linear scaling, the LR 1.7e9: a resume
    # may not change the LR of epochs already run, so the divergence is in the schedule from the start.
    tiny = ["--data.name", "synthetic", "--synthetic-samples", "256", "--synthetic-shape", "1,8,8",
            "--model.name", "mlp", "--stages", f"0:32,1:{2**40}", "--lr-decay", "1", "--quiet", "true",
            "--run-dir", tmp_path]
    ok = subprocess.run([sys.executable, "-m", "adabatch_hvd", *map(str, tiny), "--epochs", "1"], cwd=ROOT,
                        env=hvd_env(), capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    saved = {p: p.read_bytes() for p in (tmp_path / "checkpoints").glob("*.pt")}
    bad = subprocess.run([sys.executable, "-m", "adabatch_hvd", *map(str, tiny), "--epochs", "8", "--resume",
                          "--every-steps", "1"], cwd=ROOT, env=hvd_env(), capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 3, bad.stderr[-3000:]
    assert "Traceback" not in bad.stderr
    error = [line for line in bad.stderr.splitlines() if line.startswith("adabatch-train: error:")]
    assert len(error) == 1 and ("NaN/Inf" in error[0] or "training loss is" in error[0]), bad.stderr[-2000:]
    assert "the last good checkpoint" in error[0]
    for path, data in saved.items():  # the good checkpoint is untouched ...
        assert path.read_bytes() == data
    for path in checkpoint.list_checkpoints(tmp_path / "checkpoints"):  # ... and no NaN one was written
        assert all(torch.isfinite(t).all() for t in checkpoint.load(path)[0]["model"].values())


def test_killed_worker_ends_the_job_without_hanging(tmp_path):
    run = tmp_path / "victim"
    job = subprocess.Popen(hvd_cmd(run, "--epochs", "50"), cwd=ROOT, env=hvd_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: len(checkpoint.list_checkpoints(run / "checkpoints")) >= 2, 300, "two checkpoints")
        ranks = {rank: pid for pid, rank in processes_with(str(run)).items() if rank is not None}
        os.kill(ranks["1"], signal.SIGKILL)
        t0 = time.monotonic()
        code = job.wait(timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    print(f"job ended {elapsed:.1f} s after SIGKILL of rank 1, exit code {code}")
    assert code != 0 and elapsed < 60
    assert not processes_with(str(run))  # no rank left behind
    state, _ = checkpoint.load("latest", run / "checkpoints")  # the newest checkpoint is intact
    assert state["global_step"] > 0


def test_an_epoch_record_published_again_adds_no_tensorboard_point(tmp_path):
    """An elastic rollback to the commit at an epoch's end publishes that epoch's record again, maybe
    from a new rank 0: metrics.jsonl keeps one record and TensorBoard one point per epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    script = f"""
import sys
from adabatch_hvd import cli, config, dist
from adabatch_hvd.trainer import Trainer
args = cli._parser("t", "t").parse_args(sys.argv[1:])
cfg = config.from_args(args.config, cli._overrides(args))
dist.init(1)
t = Trainer(cfg)
t.fit()
# the same record from another rank (its own timings), then one of another timeline (another step)
for changes in (["epoch_seconds"], ["world_size", "global_step"]):
    for change in changes:
        t.state.last_record[change] += 1
    t.bind_world()  # rank 0's files opened again, as after an elastic reset
    t.state.record_pending = True
    t._publish_epoch(again=True)
    t._close_files()
t.hold.release()
"""
    args = ["--config", "configs/fashion_mnist.yaml", "--model.name", "mlp", "--train-samples", "200",
            "--test-samples", "100", "--epochs", "2", "--initial-batch", "50", "--quiet", "true"]
    proc = subprocess.run([sys.executable, "-c", script, *args, "--run-dir", str(run)], cwd=ROOT, env=hvd_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(r["epoch"], r["world_size"]) for r in records(run)] == [(0, 1), (1, 2)]  # replaced, not appended
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    # the repeat added nothing; the changed record is a second point at epoch 1, written last
    assert [(e.step, e.value) for e in acc.Scalars("world_size")] == [(0, 1), (1, 1), (1, 2)]
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 1]

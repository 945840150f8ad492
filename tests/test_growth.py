"""schedule.mode=noise (issue 20 item 2): the batch grows when the measured gradient noise scale says so."""

import json
import sys
from pathlib import Path

import pytest
import torch

from adabatch_hvd import checkpoint
from adabatch_hvd.errors import UserError
from adabatch_hvd.growth import Growth, check_offsets, replay
from adabatch_hvd.noise import NoiseScale
from adabatch_hvd.schedule import Schedule
from adabatch_hvd.state import TrainState
from conftest import horovodrun

TIMING = ("epoch_seconds", "samples_per_second", "allreduce_wait_share", "world_size_changes")


def noise_schedule(**kw):
    return Schedule(**{"initial_batch": 32, "epochs": 6, "lr": 0.1, "mode": "noise", "noise_half_life": 100.0,
                       "noise_checks": 2, **kw})


def test_a_noise_run_differs_from_the_timetable_only_in_when_it_grows():
    timetable = Schedule(initial_batch=32, epochs=6, lr=0.1, interval=2, max_batch=128)
    grown = replay(noise_schedule(max_batch=128), [{"epoch": 2}, {"epoch": 4}])
    for e in range(6):
        assert (grown.global_batch(e), grown.lr_at(e)) == (timetable.global_batch(e), timetable.lr_at(e))
    never = noise_schedule(max_batch=128)
    fixed = Schedule(initial_batch=32, epochs=6, lr=0.1, interval=2, mode="fixed")
    for e in range(6):  # one that never grows is the fixed baseline: the LR decays every interval all the same
        assert (never.global_batch(e), never.lr_at(e)) == (fixed.global_batch(e), fixed.lr_at(e))
    assert never.lr_at(2) == 0.1 * 0.375 and never.plan(1)[2].lr == never.lr_at(2)
    late = replay(never, [{"epoch": 3}])  # growth off the interval: x2 from epoch 3, the decay still at 2 and 4
    assert [late.lr_at(e) for e in range(6)] == [0.1, 0.1, 0.1 * 0.375, 0.2 * 0.375, 0.2 * 0.375 ** 2,
                                                  0.2 * 0.375 ** 2]
    assert [p.lr for p in late.plan(1)] == [late.lr_at(e) for e in range(6)]
    assert noise_schedule().global_batch(5) == 32  # nothing decided: no growth
    assert not grown.can_grow(5)  # max_batch bounds it
    assert noise_schedule().can_grow(5) and not noise_schedule().can_grow(6)  # not beyond the last epoch


def test_noise_settings_are_checked():
    with pytest.raises(UserError, match="schedule.noise_multiple must be a finite number > 0, got 0"):
        noise_schedule(noise_multiple=0)
    with pytest.raises(UserError, match="schedule.noise_checks must be >= 1, got 0"):
        noise_schedule(noise_checks=0)
    with pytest.raises(UserError, match="drop schedule.stages"):
        noise_schedule(stages=["0:32"])


def test_checks_fall_on_fixed_offsets_and_need_a_full_streak(monkeypatch):
    assert check_offsets(2048) == [512, 1024, 1536, 2048] and check_offsets(10) == [3, 5, 8, 10]
    schedule = noise_schedule()
    growth = Growth(schedule, 2048)
    st = TrainState(noise=NoiseScale(half_life=100.0))
    st.noise.load_state_dict({"grad_sqr_avg": 1.0, "variance_avg": 50.0, "weight": 1.0, "samples": 99, "steps": 3})
    growth.after_step(st, schedule, 0, 600)  # too few samples seen: the check fails
    assert st.noise_streak == 0
    st.noise.samples = 100
    growth.after_step(st, schedule, 600, 1100)  # B_noise 50 < 64: fails
    assert st.noise_streak == 0
    st.noise.variance_avg = 64.0
    growth.after_step(st, schedule, 1100, 1200)  # no offset crossed: no check
    assert st.noise_streak == 0
    growth.after_step(st, schedule, 1200, 2048)  # two offsets crossed, both pass
    assert st.noise_streak == 2
    monkeypatch.setattr("adabatch_hvd.dist.broadcast_object", lambda obj, root=0, name="": obj)
    decision = growth.at_epoch_end(st, schedule, main=True)
    assert decision["epoch"] == 1 and (decision["from_batch"], decision["to_batch"]) == (32, 64)
    assert st.growth == [decision] and st.noise_streak == 0
    assert replay(schedule, st.growth).global_batch(1) == 64


NOISE_RUN = ["--config", "configs/fashion_mnist.yaml", "--train-samples", "1024", "--test-samples", "128",
             "--epochs", "3", "--initial-batch", "32", "--max-micro-batch", "16", "--model.name", "mlp",
             "--every-steps", "4", "--threads", "1", "--quiet", "true", "--mode", "noise",
             "--schedule.noise_half_life", "500", "--schedule.noise_multiple", "0.05", "--schedule.noise_checks", "3",
             "--schedule.noise_every", "3"]


def _run(run_dir, *extra):
    return horovodrun([sys.executable, "-m", "adabatch_hvd", *NOISE_RUN, "--run-dir", run_dir, *extra])


def _records(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_a_noise_run_stopped_mid_window_resumes_bit_identical(tmp_path):
    """Epoch 0 is 32 steps; its checks fall after steps 8 (256 samples seen, below the half-life: fails), 16, 24 and
    32; the noise scale is measured on every 3rd step. A stop after step 20 lands inside the window of 3 checks that
    decides the first growth, with 1 passed: the resumed run ends with the same decisions, records and weights as the
    run that went straight through."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    _run(straight)
    records = _records(straight)
    assert [r["global_batch"] for r in records] == [32, 64, 128] and "growth" in records[0]
    assert all(r["b_noise"] > 0 for r in records)
    _run(stopped, "--stop-after-steps", "20")
    state, _ = checkpoint.load("latest", stopped / "checkpoints")
    assert state["global_step"] == 20 and state["noise_streak"] == 1 and state["growth"] == []
    # measured on steps 0, 3, ..., 18 (noise_every 3): step 19's samples wait for the next estimate
    assert state["noise_scale"]["pending"] == 32 and state["noise_scale"]["steps"] == 7
    _run(stopped, "--resume", "auto")
    assert _records(stopped) == records
    a, _ = checkpoint.load("latest", straight / "checkpoints")
    b, _ = checkpoint.load("latest", stopped / "checkpoints")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["growth"] == b["growth"] and a["noise_scale"] == b["noise_scale"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tb" / "steps"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert {"noise/b_noise", "noise/grad_sqr", "noise/variance", "step/global_batch"} <= set(events.Tags()["scalars"])

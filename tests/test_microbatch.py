"""schedule.max_micro_batch=auto: candidates, the choice, out-of-memory halving, and the trainer on 2 ranks."""

import json

import pytest

from adabatch_hvd.config import Config, ScheduleConfig
from adabatch_hvd.errors import UserError
from adabatch_hvd.microbatch import MicroBatchTuner, candidates
from conftest import run_worker


def test_candidates_are_divisors_halving_from_the_per_worker_batch():
    assert candidates(64) == [64, 32, 16, 8]
    assert candidates(96) == [96, 48, 24, 12]
    assert candidates(63) == [63, 21, 9, 3]  # odd: the largest divisor at most half the one before
    assert candidates(6) == [6, 3, 1] and candidates(1) == [1]
    assert candidates(256, below=33) == [32, 16, 8, 4]
    assert candidates(8, below=1) == []


def test_the_tuner_times_each_candidate_then_keeps_the_fastest():
    tuner = MicroBatchTuner(probe_steps=2, warmup_steps=1)
    seen, done = [], False
    cost = {32: 3.0, 16: 1.0, 8: 2.0, 4: 5.0}
    while not done:
        size = tuner.size(stage=0, per_worker=32)
        seen.append(size)
        done = tuner.record(99.0 if (len(seen) - 1) % 3 == 0 else cost[size])  # warm-up steps are not timed
    assert seen == [32] * 3 + [16] * 3 + [8] * 3 + [4] * 3
    assert tuner.timings() == cost
    other_rank = {32: 3.5, 16: 4.0, 8: 2.5, 4: 5.0}  # a step waits for the slowest rank
    slowest = MicroBatchTuner.slowest([tuner.timings(), other_rank])
    assert list(slowest) == [32, 16, 8, 4] and slowest[16] == 4.0
    assert MicroBatchTuner.decide(slowest) == 8
    tuner.choose(8, slowest)
    assert not tuner.probing and tuner.size(0, 32) == 8 and tuner.size(0, 32) == 8
    assert tuner.size(1, 64) == 64 and tuner.probing  # a new stage probes again
    restored = MicroBatchTuner()
    restored.load_state_dict(tuner.state_dict())
    assert restored.size(0, 32) == 8 and not restored.probing  # a resume keeps the choice
    assert restored.size(0, 16) == 16  # another world size (per-worker batch) is another key


def test_out_of_memory_halves_and_limits_later_probes():
    tuner = MicroBatchTuner(probe_steps=1, warmup_steps=0)
    assert tuner.size(0, 64) == 64
    assert tuner.out_of_memory(0, 64, 64) == 32  # the probe starts over at half
    assert [tuner.size(0, 64)] == [32] and tuner.probe["sizes"] == [32, 16, 8, 4]
    for _ in range(4):
        tuner.record(1.0)
    tuner.choose(32, {})
    assert tuner.out_of_memory(0, 64, 32) == 16 and tuner.size(0, 64) == 16  # a chosen size halves
    assert tuner.size(1, 256) == 16  # later stages only try up to half of the smallest size that ran out
    with pytest.raises(UserError, match="no micro-batch of the per-worker batch 256 fits in memory"):
        tuner.out_of_memory(1, 256, 1)


def test_config_takes_a_number_or_auto():
    from adabatch_hvd.config import from_args

    assert from_args(None, {"schedule.max_micro_batch": "auto"}).schedule.max_micro_batch == "auto"
    assert from_args(None, {"schedule.max_micro_batch": "64"}).schedule.max_micro_batch == 64
    with pytest.raises(UserError, match="schedule.max_micro_batch must be a number > 0 or 'auto', got 'fast'"):
        from_args(None, {"schedule.max_micro_batch": "fast"})
    assert ScheduleConfig().max_micro_batch is None and Config().schedule.max_micro_batch is None


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_out_of_memory_on_one_rank_halves_and_keeps_exact_parity(tmp_path, where):
    """Rank 1 alone raises torch.cuda.OutOfMemoryError above micro-batch 4 (in the forward pass, or halfway
    through the backward pass after the last layer's gradients went to Horovod): both ranks drop the step,
    redo it with half the micro-batch, and the run still equals one process on the gathered batch."""
    ranks = run_worker("trainer_parity", tmp_path, tmp_path / "run", "oom", where, 4)
    r0, r1 = ranks
    assert r1["raised"] == [8] and r0["raised"] == []  # once: the first step of stage 0 (per-worker batch 8)
    assert r0["steps"] == r0["reference_steps"] == 21  # the redo is not an extra step
    assert max(r0["errors"]) <= 1e-6, r0["errors"]
    assert r0["moved"] > 1e-2
    assert r0["weights"] == r1["weights"]
    for r in ranks:
        assert r["micro"]["too_big"] == 8
        assert max(r["sizes"][1:]) <= 4  # after the failed step nothing above half of 8 was tried
    assert r0["micro"] == r1["micro"]


def test_auto_picks_the_fastest_candidate_and_a_resume_keeps_it(tmp_path):
    ranks = run_worker("auto_micro", tmp_path, tmp_path / "run", timeout=600)
    for r in ranks:
        first, second = r["first"], r["second"]
        assert first["sizes"][:4] == [32] * 4  # 4 steps of each candidate, largest first
        assert sorted(set(first["sizes"])) == [4, 8, 16, 32]
        assert first["micro"]["chosen"] == {"0:32": 8}  # the only one not slowed down
        assert first["steps"] == 20 and second["steps"] == 64  # 2 epochs of 32 steps in all
        assert set(second["sizes"]) == {8}  # the resumed process did not probe
        assert second["micro"]["chosen"] == {"0:32": 8}
    assert ranks[0]["first"]["micro"] == ranks[1]["first"]["micro"]  # rank 0's decision everywhere
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["micro_batch"], r["accum_steps"]) for r in records] == [(8, 4), (8, 4)]
    tried = records[0]["micro_batch_tried"]
    assert set(tried) == {"32", "16", "8", "4"} and min(tried, key=tried.get) == "8"
    assert "micro-batch auto: tried 32 (x1)" in (run / "train.log").read_text()
    assert "chose 8" in (run / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("batch/micro")] == [(0, 8), (1, 8)]

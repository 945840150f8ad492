"""Property tests of the pure AdaBatch schedule."""

import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adabatch_hvd.errors import UserError
from adabatch_hvd.schedule import SCALING_RULES, Schedule, parse_stages

def _within_max_batch(kwargs):
    """A Schedule, or None where the batch grows beyond schedule.MAX_BATCH (2^40): that is an error."""
    try:
        return Schedule(**kwargs)
    except UserError as e:
        assert "global batch exceeds" in str(e), str(e)
        return None


schedules = st.builds(
    dict,
    initial_batch=st.sampled_from([8, 16, 32, 64, 96, 128, 256]),
    epochs=st.integers(1, 60),
    lr=st.floats(1e-4, 1.0),
    growth_factor=st.sampled_from([2, 3, 4]),
    interval=st.integers(1, 25),
    max_batch=st.one_of(st.none(), st.sampled_from([256, 1024, 4096])),
    mode=st.sampled_from(["adaptive", "fixed"]),
    scaling=st.sampled_from(sorted(SCALING_RULES)),
    lr_decay=st.sampled_from([1.0, 0.75, 0.375, 0.1]),
    warmup_epochs=st.sampled_from([0.0, 0.0, 2.0, 5.0]),
).map(_within_max_batch).filter(lambda s: s is not None)


def valid(schedule_fn):
    try:
        return schedule_fn()
    except UserError:
        assume(False)


@settings(max_examples=300, deadline=None)
@given(schedules, st.sampled_from([1, 2, 3, 4, 8]), st.one_of(st.none(), st.sampled_from([8, 16, 32, 64, 100])))
def test_every_epoch_resolves_consistently(s, world, cap):
    try:
        plans = s.plan(world, cap)
    except UserError as e:
        # the only legitimate failures: indivisible global batch, or a cap that doesn't split it
        assert "not divisible by the world size" in str(e) or "equal micro-batches" in str(e), str(e)
        return
    assert [p.epoch for p in plans] == list(range(s.epochs))
    for p in plans:
        assert p.global_batch == p.per_worker_batch * world
        assert p.micro_batch * p.accum_steps == p.per_worker_batch
        if cap is not None:
            assert p.micro_batch <= cap
            assert p.accum_steps == -(-p.per_worker_batch // cap)  # the fewest passes that fit
        else:
            assert p.accum_steps == 1


@settings(max_examples=300, deadline=None)
@given(schedules)
def test_lr_follows_the_rule_at_every_epoch(s):
    b0 = s.initial_batch
    for e in range(s.epochs):
        stage = e // s.interval
        batch = b0 if s.mode == "fixed" else b0 * s.growth_factor**stage
        if s.max_batch is not None:
            batch = min(batch, s.max_batch)
        assert s.global_batch(e) == batch
        warm = 1.0 if e >= s.warmup_epochs else s.warmup_start_factor + (1 - s.warmup_start_factor) * e / s.warmup_epochs
        expected = s.lr * SCALING_RULES[s.scaling](batch / b0) * s.lr_decay**stage * warm
        assert s.lr_at(e) == pytest.approx(expected, rel=1e-12)


def test_paper_rule_adabatch_and_fixed_keep_the_same_alpha_over_r():
    ada = Schedule(initial_batch=128, epochs=100, lr=0.1, interval=20, lr_decay=0.375)
    fixed = Schedule(initial_batch=128, epochs=100, lr=0.1, interval=20, lr_decay=0.375, mode="fixed")
    assert [ada.global_batch(e) for e in (0, 19, 20, 40, 60, 80, 99)] == [128, 128, 256, 512, 1024, 2048, 2048]
    for e in range(100):
        assert ada.lr_at(e) / ada.global_batch(e) == pytest.approx(fixed.lr_at(e) / fixed.global_batch(e))
    # AdaBatch decays the LR by 0.75 per doubling; the fixed baseline by 0.375
    assert ada.lr_at(20) / ada.lr_at(19) == pytest.approx(0.75)
    assert fixed.lr_at(20) / fixed.lr_at(19) == pytest.approx(0.375)


def test_sqrt_and_none_rules_and_reference_batch():
    s = Schedule(initial_batch=256, epochs=4, lr=0.1, interval=1, growth_factor=4, lr_decay=1.0, scaling="sqrt")
    assert [s.lr_at(e) for e in range(3)] == pytest.approx([0.1, 0.2, 0.4])
    s = Schedule(initial_batch=256, epochs=4, lr=0.1, interval=1, lr_decay=0.5, scaling="none")
    assert [s.lr_at(e) for e in range(3)] == pytest.approx([0.1, 0.05, 0.025])
    s = Schedule(initial_batch=1024, epochs=2, lr=0.1, reference_batch=256)  # lr per 256 samples
    assert s.lr_at(0) == pytest.approx(0.4)


def test_warmup_is_linear_within_epochs():
    s = Schedule(initial_batch=128, epochs=10, lr=1.0, interval=20, warmup_epochs=5, warmup_start_factor=0.2)
    assert s.lr_at(0) == pytest.approx(0.2)
    assert s.lr_at(2.5) == pytest.approx(0.6)
    assert s.lr_at(5) == pytest.approx(1.0) and s.lr_at(9.9) == pytest.approx(1.0)


def test_explicit_stages_and_cap():
    s = Schedule(initial_batch=0, epochs=30, lr=0.1, stages=parse_stages("0:64, 5:192,12:512"), max_batch=384,
                 lr_decay=1.0)
    assert [s.global_batch(e) for e in (0, 4, 5, 11, 12, 29)] == [64, 64, 192, 192, 384, 384]
    assert s.stage_of(12) == 2
    assert s.lr_at(12) == pytest.approx(0.1 * 384 / 64)
    p = s.resolve(12, world_size=4, max_micro_batch=40)
    assert (p.per_worker_batch, p.micro_batch, p.accum_steps) == (96, 32, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(initial_batch=0), "schedule.initial_batch must be > 0"),
    (dict(initial_batch=-8), "schedule.initial_batch must be > 0"),
    (dict(growth_factor=1.0), "schedule.growth_factor must be > 1"),
    (dict(growth_factor=0.5), "schedule.growth_factor must be > 1"),
    (dict(max_batch=64), "schedule.max_batch 64 is below the initial batch 128"),
    (dict(epochs=0), "schedule.epochs must be > 0"),
    (dict(lr=0.0), "optim.lr must be a finite number > 0"),
    (dict(lr=-1.0), "optim.lr must be a finite number > 0"),
    (dict(lr=float("nan")), "optim.lr must be a finite number > 0"),
    (dict(interval=0), "schedule.interval must be > 0 epochs, got 0"),
    (dict(growth_factor=1.5, interval=1, epochs=10), "schedule.growth_factor 1.5 .* non-integer batch"),
    (dict(scaling="cubic"), "unknown schedule.scaling 'cubic' (the LR scaling rule)"),
    (dict(mode="growing"), "unknown schedule.mode 'growing'"),
    (dict(lr_decay=0.0), "schedule.lr_decay must be in (0, 1]"),
    (dict(stages=((1, 64),)), "schedule.stages: the first stage must start at epoch 0"),
    (dict(stages=((0, 64), (10, 128), (10, 256))), "schedule.stages: stage epochs must be strictly increasing"),
    (dict(stages=((0, 64), (10, 0))), "schedule.stages: stage '10:0' has a batch <= 0"),
])
def test_impossible_schedules_are_clear_errors(kwargs, message):
    base = dict(initial_batch=128, epochs=40, lr=0.1, interval=20)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        Schedule(**{**base, **kwargs})


def test_resolution_errors_name_the_numbers_and_a_fix():
    s = Schedule(initial_batch=100, epochs=2, lr=0.1)
    with pytest.raises(UserError, match=r"global batch 100 .* not divisible by the world size 3.*e\.g\. 102"):
        s.resolve(0, 3)
    s = Schedule(initial_batch=512, epochs=2, lr=0.1)
    with pytest.raises(UserError, match=r"per-worker batch 256 .* 3 equal micro-batches of at most 100.*64"):
        s.resolve(0, 2, max_micro_batch=100)
    with pytest.raises(UserError, match="max micro-batch must be > 0"):
        s.resolve(0, 2, max_micro_batch=0)
    with pytest.raises(UserError, match="bad stage 'x:1'"):
        parse_stages("0:128,x:1")


def test_uneven_shares_for_a_world_size_the_user_did_not_choose():
    """Elastic runs (even=False): any world size works; the global batch and the LR never change."""
    s = Schedule(initial_batch=100, epochs=4, lr=0.1, interval=2)
    for world in range(1, 9):
        for epoch in range(4):
            p = s.resolve(epoch, world, max_micro_batch=16, even=False)
            assert (p.global_batch, p.lr) == (s.global_batch(epoch), s.lr_at(epoch))
            assert p.per_worker_batch == -(-p.global_batch // world)  # the largest share
            assert p.micro_batch <= 16 and p.micro_batch * p.accum_steps >= p.per_worker_batch
            assert p.micro_batch * (p.accum_steps - 1) < p.per_worker_batch  # no empty micro-batch
    p = s.resolve(0, 3, max_micro_batch=16, even=False)  # 100 = 34 + 33 + 33; 34 = 3 micro-batches of <= 12
    assert (p.per_worker_batch, p.accum_steps, p.micro_batch) == (34, 3, 12)
    assert s.plan(4, 25, even=False) == s.plan(4, 25)  # where the world divides, nothing changes
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        s.plan(3, 16)  # a fixed world size keeps the check


def test_the_schedule_is_the_config_section_plus_the_lr():
    """One definition: the schedule: section's fields and defaults are the Schedule's; one message per check."""
    import dataclasses

    from adabatch_hvd import config
    from adabatch_hvd.schedule import ScheduleConfig

    section = ScheduleConfig()
    s = Schedule(lr=0.1)
    # besides the section: the base LR, and (mode noise) the growth decided while training
    assert {f.name for f in dataclasses.fields(s)} == {f.name for f in dataclasses.fields(section)} | {"lr", "grown"}
    assert all(getattr(s, f.name) == getattr(section, f.name) for f in dataclasses.fields(section) if f.name != "stages")
    assert config.ScheduleConfig is ScheduleConfig and config.Config().schedule == section
    cfg = config.from_args(None, {"schedule.stages": "0:16,2:32", "schedule.epochs": "4", "optim.lr": "0.2"})
    built = config.build_schedule(cfg)
    assert built == Schedule.of(cfg.schedule, 0.2) and built.stages == ((0, 16), (2, 32)) and built.lr == 0.2
    assert cfg.schedule.stages == ["0:16", "2:32"] and "_schedule" not in config.to_dict(cfg)  # the section stays text
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.epochs = 5
    # the same message whichever object finds the bad LR, naming the config key
    for make in (lambda: Schedule(lr=0.0), lambda: config.OptimConfig(lr=0.0),
                 lambda: config.from_args(None, {"optim.lr": "0"})):
        with pytest.raises(UserError, match=r"^optim\.lr must be a finite number > 0, got 0\.0$"):
            make()
    with pytest.raises(TypeError, match="lr="):
        Schedule()


def test_build_schedule_is_built_once_per_config_and_follows_changes():
    from adabatch_hvd import config

    cfg = config.Config()
    first = config.build_schedule(cfg)
    assert config.build_schedule(cfg) is first and first.interval == 2  # cached; the section's default interval
    cfg.schedule.epochs, cfg.schedule.interval = 4, 1  # sections are mutable (tests, benchmarks/worker.py)
    changed = config.build_schedule(cfg)
    assert changed is not first and (changed.epochs, changed.interval, changed.global_batch(3)) == (4, 1, 1024)
    cfg.optim.lr = 0.5
    assert config.build_schedule(cfg).lr == 0.5 and config.build_schedule(cfg) is config.build_schedule(cfg)
    cfg.schedule.interval = 0
    with pytest.raises(UserError, match=r"schedule\.interval must be > 0 epochs, got 0"):
        config.build_schedule(cfg)
    fresh = config.Config()
    config.build_schedule(fresh)
    assert fresh == config.Config()  # the cache is no field: configs still compare by their values

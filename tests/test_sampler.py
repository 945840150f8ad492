"""The sharded sample order simulated for many ranks in one process."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adabatch_hvd import sampler


def epoch_positions(n, global_batch, world, micro, offset=0):
    """Every rank's micro-batches of every step, as the trainer builds them."""
    steps = sampler.steps(n, global_batch, world, offset)
    return steps, [[sampler.micro_batches(sampler.rank_slice(s, world, r), micro) for s in steps]
                   for r in range(world)]


@settings(max_examples=400, deadline=None)
@given(n=st.integers(1, 3000), world=st.integers(1, 8), per_worker=st.integers(1, 300), micro=st.integers(1, 256),
       seed=st.integers(0, 3), epoch=st.integers(0, 5))
def test_every_sample_exactly_once_and_same_step_count(n, world, per_worker, micro, seed, epoch):
    batch = per_worker * world  # the schedule guarantees divisibility
    if n < world:
        return
    order = sampler.permutation(n, seed, epoch)
    steps, per_rank = epoch_positions(n, batch, world, micro)
    seen = [order[i] for rank in per_rank for step in rank for mb in step for i in mb]
    assert sorted(seen) == list(range(n))  # each sample exactly once
    assert all(len(rank) == len(steps) for rank in per_rank)  # same number of optimizer steps everywhere
    for k, s in enumerate(steps):
        sizes = [sum(len(mb) for mb in per_rank[r][k]) for r in range(world)]
        assert sum(sizes) == s.size and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
        assert all(len(mb) <= micro for r in range(world) for mb in per_rank[r][k])
        # Horovod's k covers the busiest rank, so no rank ever exceeds backward_passes_per_step
        assert max(len(per_rank[r][k]) for r in range(world)) == sampler.passes_per_step(s, world, micro)
    full = [s.size for s in steps[:-1]]
    assert all(size == batch for size in full)
    assert steps[-1].size < batch + world


def test_resume_from_an_offset_continues_the_same_sequence():
    n, batch, world = 1000, 96, 4
    whole = sampler.steps(n, batch, world)
    assert sampler.steps(n, batch, world, offset=whole[3].start) == whole[3:]
    # after a world-size change mid-epoch the rest of the epoch is still covered exactly once
    rest = sampler.steps(n, batch, 3, offset=whole[3].start)
    covered = [i for s in rest for r in range(3) for i in sampler.rank_slice(s, 3, r)]
    assert covered == list(range(whole[3].start, n))


def test_permutation_is_seeded_and_changes_every_epoch():
    a, b = sampler.permutation(100, 0, 0), sampler.permutation(100, 0, 1)
    assert a == sampler.permutation(100, 0, 0) and a != b and sorted(a) == list(range(100))
    assert sampler.permutation(5, 0, 0, shuffle=False) == [0, 1, 2, 3, 4]


def test_tail_smaller_than_world_is_merged():
    steps = sampler.steps(10, 4, 3)  # 4, then 6 (a tail of 2 < 3 workers is merged)
    assert [(s.start, s.size) for s in steps] == [(0, 4), (4, 6)]
    assert sampler.passes_per_step(steps[1], 3, micro_batch=1) == 2


@pytest.mark.parametrize("n, batch, world, expected", [(60000, 128, 2, 469), (60000, 512, 2, 118), (50, 50, 2, 1)])
def test_step_counts(n, batch, world, expected):
    assert len(sampler.steps(n, batch, world)) == expected


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 2000), world=st.integers(1, 7), batch=st.integers(1, 300), micro=st.integers(1, 64),
       epoch=st.integers(0, 50), start=st.integers(0, 1999))
def test_digest_of_what_the_ranks_use_is_the_digest_of_every_sample(n, world, batch, micro, epoch, start):
    """Summed over steps and ranks (any world size, uneven shares, a resize at any offset) the
    digest equals the whole epoch's; dropping or repeating a sample always changes it."""
    if n < world:
        return
    offset = min(start, n)
    order = sampler.permutation(n, 0, epoch)
    head = sampler.sample_digest(order[:offset], epoch)  # trained before a resize at `offset`
    steps, per_rank = epoch_positions(n, batch, world, micro, offset)
    used = [order[i] for rank in per_rank for step in rank for mb in step for i in mb]
    whole = sampler.sample_digest(range(n), epoch)
    assert head + sampler.sample_digest(used, epoch) == whole
    assert whole < 2 ** 53  # exact in float64
    if used:
        assert sampler.sample_digest(used[1:], epoch) + head != whole  # a sample missed
        assert sampler.sample_digest(used + used[:1], epoch) + head != whole  # one used twice
        if n > 1:
            other = next(i for i in range(n) if i != used[0])
            assert sampler.sample_digest([other] + used[1:], epoch) + head != whole  # one for another


def test_digest_differs_between_epochs():
    assert sampler.sample_digest(range(10), 0) != sampler.sample_digest(range(10), 1)
    assert sampler.sample_digest([], 3) == 0

"""Sharded, resumable sample order: which samples each rank uses in each optimizer step.

Pure Python (no torch, no horovod). Positions are global *sample offsets* into a per-epoch
permutation (as in adaptdl), so a resume, a batch-size change or a world-size change never skips or
repeats a sample.

Within an epoch every optimizer step takes the next `global_batch` samples of the permutation and
splits them into contiguous per-rank slices, then each slice into micro-batches. The tail is never
dropped: a short last step keeps its real size (the loss scale in `accumulation.py` uses it), and a
tail smaller than the world size is merged into the step before, so no rank is left empty. Every
rank derives the same step list from the same numbers, so all ranks do the same number of
optimizer steps and no allreduce hangs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, List


@dataclass(frozen=True)
class Step:
    """One optimizer step: samples [start, start + size) of the epoch's permutation."""

    start: int
    size: int


def permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    """The epoch's sample order; identical on every rank, different every epoch."""
    order = list(range(num_samples))
    if shuffle:
        random.Random(f"adabatch:{seed}:{epoch}").shuffle(order)
    return order


def steps(num_samples: int, global_batch: int, world_size: int, offset: int = 0) -> List[Step]:
    """The optimizer steps left in an epoch from a sample offset (the same list on every rank)."""
    out = []
    start = offset
    while start < num_samples:
        left = num_samples - start
        size = left if left - global_batch < world_size else global_batch
        out.append(Step(start, size))
        start += size
    return out


def rank_slice(step: Step, world_size: int, rank: int) -> range:
    """This rank's contiguous share of a step's positions; shares differ by at most one sample."""
    base, extra = divmod(step.size, world_size)
    begin = step.start + rank * base + min(rank, extra)
    return range(begin, begin + base + (1 if rank < extra else 0))


def micro_batches(positions: range, micro_batch: int) -> List[range]:
    """Split a rank's positions into chunks of `micro_batch` (the last may be smaller)."""
    return [positions[i : i + micro_batch] for i in range(0, len(positions), micro_batch)]


def passes_per_step(step: Step, world_size: int, micro_batch: int) -> int:
    """Backward passes of the busiest rank in a step: Horovod's backward_passes_per_step for it."""
    busiest = -(-step.size // world_size)
    return max(1, -(-busiest // micro_batch))


def sample_digest(ids: Iterable[int], epoch: int) -> int:
    """An order-free fingerprint of the sample ids used in an epoch: the sum of a hash of each.

    The hash is 1 + a bijection of the id onto 32 bits (for ids below 2**32): never 0, so a missed
    sample always shows, and never the same for two ids, so one used in place of another always
    shows. Summed over every step and rank the digest equals `sample_digest(range(n), epoch)` when
    each sample was used once. The sums stay below 2**53 for up to 2**21 samples per epoch, so they
    add exactly in float64, beside the loss sums.
    """
    salt = (epoch * 0x9E3779B9) & 0xFFFFFFFF
    return sum(1 + _fmix32(i ^ salt) for i in ids)


def _fmix32(h: int) -> int:
    """MurmurHash3's 32-bit finalizer: a bijection that scatters every input bit."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)

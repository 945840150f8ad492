"""Bounds on what is read from files: a user's config, data files and a run dir's records.

Each file is read through `read_limited`, never whole: a file far larger than its kind ever is, or a
device that never ends (`--config /dev/zero`), is one UserError naming the file and the limit, where
reading it whole would end in the out-of-memory killer. Bounds on counts and lengths (epochs, batch,
classes, samples, list items, text) live with the values they bound.
"""

from __future__ import annotations

from .errors import UserError

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB
MAX_METRICS_BYTES = 128 << 20  # metrics.jsonl: schedule.MAX_EPOCHS records of well under 1 KB
MAX_INDEX_BYTES = 4 << 20  # checkpoints/index.json: a name per checkpoint kept
MAX_IDX_BYTES = 1 << 30  # one decompressed Fashion-MNIST file (the training images are 47 MB)
MAX_PICKLE_BYTES = 1 << 30  # one CIFAR pickle (CIFAR-100's training file is 155 MB)


def size_text(n: int) -> str:
    """'1 MiB' for 1048576, '1000 bytes' for 1000."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} bytes"


def read_limited(path, limit: int, what: str, hint: str) -> bytes:
    """The bytes of file `path` when there are at most `limit` of them. Anything longer, a device such
    as /dev/zero included, is a UserError '{what} PATH is larger than LIMIT (read stopped there); {hint}'
    after reading limit + 1 bytes. OSError (not found, a directory, no permission) passes through."""
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UserError(f"{what} {path} is larger than {size_text(limit)} (read stopped there); {hint}")
    return data

"""Writing a file so that a crash leaves the old version or the new one, never a mix."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from .errors import DiskFull


class _Recorded:
    """A file that remembers its write error: torch.save reports one as an unrelated RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self.f, name)


def atomic_write(path: Path, write) -> None:
    """Write `path` through `write(binary_file)` into a temp file beside it, fsync, rename, fsync the dir.

    A crash leaves the old file or the new one, never a mix; on a full disk the temp file is
    removed and `DiskFull` is raised.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _Recorded(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        cause = (f.error if f is not None else None) or e
        if getattr(cause, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(path) from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)

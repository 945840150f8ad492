"""The exception types for what a user can fix: mistakes in the input, and a full disk.

The CLI turns `UserError` into a single line on stderr and exit code 2, and `DiskFull` into one
line naming the device and exit code 4; anything else is a bug and keeps its traceback.
"""

import argparse
import difflib
import os
import sys

# Exit codes of adabatch-train (the launchers pass them on; README "Exit codes").
EXIT_LOST_PEERS = 1  # a rank lost its peers outside elastic mode; --resume auto continues
EXIT_USER = 2  # a mistake in the input (UserError); nothing was changed
EXIT_NON_FINITE = 3  # the loss or weights became NaN/Inf; the last good checkpoint is kept
EXIT_DISK_FULL = 4  # DiskFull; the last checkpoint is kept
# A run stopped on request (SIGTERM, SIGUSR1; see signals.py) after writing a checkpoint: sysexits'
# EX_TEMPFAIL, "try again later". The same command with --resume auto continues.
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT) to adabatch-train itself


class UserError(ValueError):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


class NonFiniteLoss(RuntimeError):
    """The training loss (or the weights) became NaN or Inf; the last good checkpoint is kept."""


class DiskFull(OSError):
    """Writing `path` failed for lack of space (or quota) on its file system."""

    def __init__(self, path):
        super().__init__(f"no space left on {device_of(path)} while writing {path}; free some space there "
                         f"(or move the run dir elsewhere) and resume; the last checkpoint written is kept")
        self.path = path


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage mistake in one line and exit code 2 (not the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def device_of(path) -> str:
    """'DEVICE (mounted on MOUNT)' for the file system holding `path`, from /proc/self/mountinfo."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    try:
        dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                major, minor = fields[2].split(":")
                if os.makedev(int(major), int(minor)) == dev:
                    source = fields[fields.index("-") + 2]
                    return f"device {source} (mounted on {fields[4]})"
    except (OSError, ValueError, IndexError):
        pass
    return f"the device holding {path}"


def print_error(prog: str, e: BaseException) -> None:
    """'PROG: error: MESSAGE' on stderr, always one line (a path or name in it may hold a newline)."""
    print(f"{prog}: error: " + str(e).replace("\n", "\\n"), file=sys.stderr)


def one_line(e: BaseException, limit: int = 200) -> str:
    """'Type: first sentence of the message', short enough for a one-line error."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0].split('. ')[0] if text else ''}"[:limit]


def suggest(name: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""

"""Torch threads per rank (threads.py): run.threads, then OMP_NUM_THREADS, then the usable cores (affinity
and the cgroup v1/v2 CPU quota, read from a fake /proc + /sys/fs/cgroup tree) / local ranks; and a real
process started with OMP_NUM_THREADS=1 runs torch with 1 thread."""

import os
import subprocess
import sys

import pytest

from adabatch_hvd.threads import Choice, cgroup_quota, choose
from conftest import ROOT


def tree(tmp_path, cgroup, files):
    """A fake root: proc/self/cgroup holding `cgroup`, and files {path under sys/fs/cgroup: text}."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for path, text in files.items():
        f = tmp_path / "sys/fs/cgroup" / path
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path


V1_LINES = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n"


@pytest.mark.parametrize("cgroup,files,quota", [
    # v2: the tightest limit from the process's cgroup up to the root
    ("0::/user.slice/job\n", {"user.slice/job/cpu.max": "max 100000\n", "user.slice/cpu.max": "400000 100000\n",
                              "cpu.max": "800000 100000\n"}, 4.0),
    ("0::/a/b\n", {"a/b/cpu.max": "150000 100000\n", "a/cpu.max": "400000 100000\n"}, 1.5),
    ("0::/a\n", {"a/cpu.max": "max 100000\n", "cpu.max": "max\n"}, None),
    ("0::/\n", {}, None),
    ("0::/a\n", {"a/cpu.max": "lots 100000\n"}, None),           # malformed: ignored
    ("0::/a\n", {"a/cpu.max": "100000 0\n"}, None),
    # v1: quota / period; -1 is no quota
    (V1_LINES, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "200000\n",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, 2.0),
    (V1_LINES, {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "-1\n",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"}, None),
    # v1 in a container without a cgroup namespace: the host's path is not there; the mount is its cgroup
    (V1_LINES, {"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    # hybrid: v1 cpu controller, an empty unified hierarchy
    ("1:cpu:/\n0::/\n", {"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n",
                         "unified/cgroup.procs": ""}, 3.0),
    ("garbage without colons\n", {"cpu.max": "100000 100000\n"}, None),
], ids=["v2-tightest-parent", "v2-child", "v2-max", "v2-none", "v2-malformed", "v2-zero-period", "v1", "v1-none",
        "v1-no-cgroupns", "hybrid", "garbage"])
def test_cgroup_quota(tmp_path, cgroup, files, quota):
    assert cgroup_quota(tree(tmp_path, cgroup, files)) == quota


def test_no_proc_no_quota(tmp_path):
    assert cgroup_quota(tmp_path) is None
    assert cgroup_quota("/") is None or cgroup_quota("/") > 0  # this machine's, whatever it is


def test_precedence_run_threads_then_omp_then_default(tmp_path):
    root = tree(tmp_path, "0::/\n", {"cpu.max": "400000 100000\n"})
    assert choose(3, 2, {"OMP_NUM_THREADS": "1"}, root, affine=16) == Choice(3, "from run.threads")
    assert choose(0, 2, {"OMP_NUM_THREADS": " 5 "}, root, affine=16) == Choice(5, "from OMP_NUM_THREADS=5")
    assert choose(0, 2, {}, root, affine=16) == Choice(
        2, "default: 4 usable cores (cgroup quota 4 of 16 affine) / 2 local ranks")
    assert choose(0, 1, {}, root, affine=2) == Choice(2, "default: 2 affine cores (cgroup quota 4) / 1 local rank")
    assert choose(0, 4, {}, tmp_path / "none", affine=2) == Choice(1, "default: 2 affine cores / 4 local ranks")


def test_fractional_quota_rounds_up(tmp_path):
    root = tree(tmp_path, "0::/\n", {"cpu.max": "150000 100000\n"})
    assert choose(0, 1, {}, root, affine=8).count == 2
    root = tree(tmp_path / "small", "0::/\n", {"cpu.max": "10000 100000\n"})
    assert choose(0, 1, {}, root, affine=8) == Choice(1, "default: 1 usable core (cgroup quota 0.1 of 8 affine) "
                                                         "/ 1 local rank")


@pytest.mark.parametrize("value", ["abc", "0", "-1", "4,2", "", "2.5", "100000", "\u00b2", "9" * 5000])
def test_invalid_omp_num_threads_is_ignored_with_a_warning(tmp_path, value):
    choice = choose(0, 2, {"OMP_NUM_THREADS": value}, tmp_path, affine=8)
    assert (choice.count, choice.source) == (4, "default: 8 affine cores / 2 local ranks")
    assert choice.warning == (f"OMP_NUM_THREADS={value[:40]!r} is not an integer in 1..1024; ignored (set it to "
                              f"a thread count per rank, or give --threads)")


INIT = ("from adabatch_hvd import dist; import torch; c = dist.init({threads}); "
        "print(torch.get_num_threads(), c.source, c.warning, sep='|')")


@pytest.mark.parametrize("omp,threads,expected", [
    ("1", 0, "1|from OMP_NUM_THREADS=1|None"),
    ("1", 2, "2|from run.threads|None"),
    ("many", 0, None),  # ignored, with a warning: the default
])
def test_a_real_process_uses_the_chosen_count(omp, threads, expected):
    """dist.init under plain python (Horovod runs one process without horovodrun): torch really uses it."""
    env = dict(os.environ, OMP_NUM_THREADS=omp, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", INIT.format(threads=threads)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if expected is None:
        default = choose(0, 1, {})
        expected = f"{default.count}|{default.source}|OMP_NUM_THREADS='many' is not an integer in 1..1024; " \
                   f"ignored (set it to a thread count per rank, or give --threads)"
    assert proc.stdout.strip().splitlines()[-1] == expected, proc.stdout + proc.stderr

"""`make bench-quick` runs end to end, so the benchmark harness can't rot (figures are not asserted).

It includes section (f) on a 2-host test cluster (tests/cluster.py: root, network namespaces, sshd)."""

import re
import subprocess
import sys

from conftest import ROOT, hvd_env


def test_bench_quick_writes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          env=hvd_env(), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "RESULTS.md").read_text()
    headings = ["## (a) Throughput", "## (b) Accuracy", "## (c) Overhead", "## (d) Cost of stage changes",
                "## (e) Communication", "## Where the time goes", "## (f) Communication-bound", "## (g) The ImageNet",
                "## (h) GPU", "## (i) Against PyTorch Lightning", "## (j) Growth from the gradient noise scale",
                "## Commands run"]
    at = [text.find(h) for h in headings]
    assert -1 not in at and at == sorted(at), dict(zip(headings, at))
    for png in ("throughput.png", "accuracy.png", "comm_throughput.png"):
        assert (tmp_path / png).stat().st_size > 10_000, png
    # (f) ran on the 2-host test cluster at both links of the smoke profile, through the product's launcher
    f = text.split("## (f)")[1].split("\n## ")[0]
    assert "| unlimited |" in f and "| 100mbit |" in f and "Mbit/s" in f
    assert "node1$ launch/run-multinode.sh -H node1:1,node2:1" in f
    assert "**Reduced run** (`--profile smoke`)" in f  # a reduced run says so
    assert "fp16 [413844]" in f and "none [827688]" in f  # fp16 halves the bytes per step
    assert "With the shared-core compute: median" in f  # the co-located compute model was measured
    assert "| lockstep / independent |" in f  # and the decomposition of a step on one host
    g = text.split("## (g)")[1].split("\n## ")[0]
    assert "Median ratio project / torchvision: **" in g
    h = text.split("## (h)")[1].split("\n## ")[0]
    assert "Not run: no NVIDIA GPU" in h or "A GPU is visible" in h
    # (i): both frameworks on the cluster (Lightning in its own environment), and the phases of the default job
    i = text.split("## (i)")[1].split("\n## ")[0]
    for row in ("| adabatch-hvd | defaults |", "| lightning | defaults |", "| adabatch-hvd | fp16 compression |",
                "| lightning | fp16 compression |", "| launcher, ssh |", "| import torch, horovod |",
                "| **launch to the end of the first step** |"):
        assert row in i, row
    assert "**Smoke run**" in i and "lightning_job.py --num-nodes 2" in i
    # (j): every arm ran, the noise arm's decisions are reported (none, in a 2-epoch smoke run, is possible)
    j = text.split("## (j)")[1].split("\n## ")[0]
    for arm in ("fixed-small", "timetable-i1", "timetable-i2", "timetable-i3", "noise"):
        assert re.search(rf"\| {arm}( \(best timetable\))? \| \d", j), arm
    assert (tmp_path / "growth_mlp.png").stat().st_size > 10_000
    # every AdaBatch stage did exactly one allreduce per parameter tensor per optimizer step
    comm = text.split("## (e) Communication")[1].split("##")[0]
    tensors = int(re.search(r"fmnist_cnn, (\d+) parameter tensors", comm).group(1))
    rows = [line for line in comm.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 5
    assert [int(r.split("|")[3]) for r in rows] == [1, 2, 4, 8, 16]  # k doubles with the batch
    assert all(r.split("|")[6].strip() == f"[{tensors}]" for r in rows)

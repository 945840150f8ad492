"""`make bench-quick` runs end to end, so the benchmark harness can't rot (figures are not asserted)."""

import re
import subprocess
import sys

from conftest import ROOT, hvd_env


def test_bench_quick_writes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/bench.py", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          env=hvd_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ["## (a) Throughput", "## (b) Accuracy", "## (c) Overhead", "## (d) Cost of stage changes",
                    "## (e) Communication", "## Where the time goes", "## Commands run"]:
        assert heading in text, heading
    assert (tmp_path / "throughput.png").stat().st_size > 10_000 and (tmp_path / "accuracy.png").stat().st_size > 10_000
    # every AdaBatch stage did exactly one allreduce per parameter tensor per optimizer step
    comm = text.split("## (e) Communication")[1].split("##")[0]
    tensors = int(re.search(r"fmnist_cnn, (\d+) parameter tensors", comm).group(1))
    rows = [line for line in comm.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 5
    assert [int(r.split("|")[3]) for r in rows] == [1, 2, 4, 8, 16]  # k doubles with the batch
    assert all(r.split("|")[6].strip() == f"[{tensors}]" for r in rows)

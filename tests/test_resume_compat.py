"""A checkpoint written before the trainer was split into its rooms (issue 16) resumes, exactly.

tests/fixtures/checkpoint-0.1.0 holds a mid-epoch checkpoint (step 6 of 12) written by the code at
0ce91de, and the records and final weights of the same run trained straight through by that code
(uninterrupted.json says how). Resumed by today's code, the run must end where that one ended: the
same accuracies and sample digests, and the same losses and weights up to float rounding. Rounding,
because the bits of a float32 reduction follow the CPU: on an AMD EPYC the code at 0ce91de, resuming
this checkpoint, ends 3e-8 from its own uninterrupted run (and today's code there ends bit-identical
to 0ce91de's resume); a state part lost in the resume (momentum, RNG, position, partial sums) moves
the weights by orders of magnitude more.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from adabatch_hvd import checkpoint
from conftest import horovodrun

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint-0.1.0"
RUN = ["-m", "adabatch_hvd", "--data.name", "synthetic", "--synthetic-samples", "256", "--data.synthetic_shape",
       "1,8,8", "--test-samples", "64", "--model.name", "mlp", "--epochs", "2", "--interval", "1",
       "--initial-batch", "32", "--every-steps", "4", "--threads", "1", "--quiet", "true"]


def test_a_checkpoint_of_the_previous_layout_resumes_bit_identical(tmp_path):
    import sys

    expected = json.loads((FIXTURE / "uninterrupted.json").read_text())
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(FIXTURE / "ckpt-e0000-s000000006.pt", run / "checkpoints")
    proc = horovodrun([sys.executable, *RUN, "--run-dir", run, "--resume", "auto"])
    assert "resuming from" in proc.stderr and "step 6" in proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # losses up to rounding (the docstring), everything else exactly
    losses = ("train_loss", "test_loss")
    assert [{k: r[k] for k in expected["records"][0] if k not in losses} for r in records] == \
        [{k: v for k, v in r.items() if k not in losses} for r in expected["records"]]
    assert [[r[k] for k in losses] for r in records] == \
        [pytest.approx([r[k] for k in losses], rel=1e-6) for r in expected["records"]]
    state, path = checkpoint.load("latest", run / "checkpoints")
    assert path.name == expected["final_checkpoint"]
    weights = torch.load(FIXTURE / "uninterrupted-weights.pt", weights_only=True)
    assert list(state["model"]) == list(weights)
    gap = max((state["model"][k] - weights[k]).abs().max().item() for k in weights)
    assert gap <= 1e-6, gap

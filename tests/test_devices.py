"""Which GPU a rank takes (pick_device), without a GPU: torch.cuda is stood in for."""

import pytest
import torch

from adabatch_hvd import dist, trainer
from adabatch_hvd.errors import UserError


@pytest.fixture
def gpus(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)

    def setup(visible, local):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(dist, "local_rank", lambda: local)
        return chosen
    return setup


def test_a_rank_bound_to_its_own_gpu_takes_cuda_0(gpus):
    chosen = gpus(visible=1, local=3)  # srun --gpus-per-task=1: local rank 3 sees one GPU
    assert trainer.pick_device("cuda") == torch.device("cuda", 0) and chosen == [0]


def test_a_rank_that_sees_the_node_takes_its_local_rank(gpus):
    chosen = gpus(visible=4, local=3)
    assert trainer.pick_device("auto") == torch.device("cuda", 3) and chosen == [3]


def test_too_few_gpus_is_one_clear_error(gpus):
    gpus(visible=2, local=3)
    with pytest.raises(UserError, match="local rank 3 sees 2 GPUs, fewer than the ranks on its host"):
        trainer.pick_device("cuda")

"""The installed Horovod: build flags, adabatch_hvd.dist on 2 ranks, and the accumulation engine."""

import subprocess

import pytest

from conftest import BIN, hvd_env, run_worker


def test_check_build_lists_pytorch_gloo_and_mpi():
    out = subprocess.run([str(BIN / "horovodrun"), "--check-build"], capture_output=True, text=True,
                         check=True, env=hvd_env()).stdout
    for line in ["[X] PyTorch", "[X] MPI", "[X] Gloo"]:
        # each appears once under controllers and once under tensor operations
        assert out.count(line) == (1 if line == "[X] PyTorch" else 2), out


def test_dist_ops_on_two_ranks(tmp_path, controller):
    ranks = run_worker("dist_ops", tmp_path, controller=controller)
    for r, res in enumerate(ranks):
        assert res["rank"] == r and res["size"] == 2 and res["local_rank"] == r
        assert res["is_main"] == (r == 0)
        assert (res["gloo"], res["mpi"]) == ((True, False) if controller == "gloo" else (False, True))
        assert res["sum"] == [3.0, 10.0]
        assert res["mean"] == [1.5]
        assert res["object"] == {"from": 0, "payload": [1, 2, 3]}
        assert res["threads"] == 1
        assert res["fresh_untouched"]
        # after the broadcast every rank holds rank 0's weights and momentum
        assert res["all_weights"][0] == res["all_weights"][1]
        assert res["all_momentum"][0] == res["all_momentum"][1]
    assert ranks[1]["weights_changed"] and not ranks[0]["weights_changed"]


def test_engine_parity_across_k_changes(tmp_path, controller):
    """DistributedOptimizer with k = 1, 2, 4 and loss / k equals SGD on the gathered global batch."""
    ranks = run_worker("engine_parity", tmp_path, "1", controller=controller)
    assert ranks[0]["ks"] == [1, 1, 2, 2, 4, 4, 1]
    assert max(ranks[0]["errors"]) <= 1e-6, ranks[0]["errors"]
    assert ranks[0]["weights"] == ranks[1]["weights"]


def test_engine_parity_negative_control(tmp_path):
    """Without the 1/k loss scale the update is k times too large: the comparison must catch it."""
    errors = run_worker("engine_parity", tmp_path, "0")[0]["errors"]
    assert max(errors[:2]) <= 1e-6  # k = 1 steps still agree
    assert errors[2] > 1e-3, errors  # the first k = 2 step does not

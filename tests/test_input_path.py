"""The GPU input path (issue 18 item 4): pinned batches copied without blocking, cudnn.benchmark for models with
convolutions, and channels-last inputs (model.channels_last). With the defaults the CPU path is the one it was.

No GPU is needed: the CUDA branches run here against recorded calls (Tensor.pin_memory and .to, Module.to).
"""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from torch import nn

from adabatch_hvd import config
from adabatch_hvd.data import DatasetInfo, build_dataset
from adabatch_hvd.errors import UserError
from adabatch_hvd.models import build_model, place
from adabatch_hvd.stepper import to_device
from conftest import ROOT, hvd_env, records
from test_data import write_image_folder

INFO = DatasetInfo(num_classes=10, in_channels=3, image_size=16)
CUDA = torch.device("cuda", 0)


# ---- pinned memory ------------------------------------------------------------------------------------
def test_on_the_cpu_a_batch_comes_back_as_it_was(monkeypatch):
    def pinned(t):
        raise AssertionError("a CPU batch was pinned")

    monkeypatch.setattr(torch.Tensor, "pin_memory", pinned)
    batch = (torch.randn(4, 3, 16, 16), torch.arange(4))
    assert to_device(batch, torch.device("cpu")) is batch


def test_on_cuda_each_tensor_is_pinned_then_copied_without_blocking(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: calls.append(("pin", t)) or t)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *args, **kw: calls.append(("to", t, args, kw)) or t)
    x, y = torch.randn(4, 3, 16, 16), torch.arange(4)
    moved = to_device((x, y), CUDA)
    assert moved[0] is x and moved[1] is y
    assert calls == [("pin", x), ("to", x, (CUDA,), {"non_blocking": True}),
                     ("pin", y), ("to", y, (CUDA,), {"non_blocking": True})]


def test_the_dataloader_pins_only_when_asked(tmp_path):
    """ImageNet's workers hand their batches to a DataLoader: on CUDA its own thread pins them."""
    write_image_folder(tmp_path, ["a", "b"], lambda label, k: torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert build_dataset("imagenet", tmp_path, True)._workers(1).pin_memory is False
    assert build_dataset("imagenet", tmp_path, True, pin_memory=True)._workers(1).pin_memory is True


# ---- cudnn.benchmark --------------------------------------------------------------------------------
def test_cudnn_benchmark_is_set_for_convolutions_on_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # and put back afterwards
    place(build_model("fmnist_cnn", INFO), torch.device("cpu"), cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is False  # the CPU: untouched
    monkeypatch.setattr(nn.Module, "to", lambda module, *args, **kw: module)  # "moved" to a GPU this machine lacks
    place(build_model("mlp", INFO), CUDA, cudnn_benchmark=True)
    place(build_model("fmnist_cnn", INFO), CUDA, cudnn_benchmark=False)
    assert torch.backends.cudnn.benchmark is False  # no convolution, or turned off
    place(build_model("fmnist_cnn", INFO), CUDA, cudnn_benchmark=True)
    assert torch.backends.cudnn.benchmark is True


# ---- channels-last ----------------------------------------------------------------------------------
def test_channels_last_reaches_the_convolutions_and_leaves_parameters_and_gradients_contiguous():
    torch.manual_seed(0)
    model = place(build_model("resnet20", INFO), torch.device("cpu"), channels_last=True)
    seen = []
    model.stem[0].register_forward_hook(lambda module, inputs, out: seen.extend([inputs[0], out]))
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert all(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in seen)
    # what Horovod's broadcast and allreduce take
    assert all(p.is_contiguous() and p.grad.is_contiguous() for p in model.parameters())
    flat = torch.randn(3, 4)
    assert place(nn.Linear(4, 2), torch.device("cpu"), channels_last=True)(flat).shape == (3, 2)  # not 4-D: as given


TRAIN = """
import json, sys
import torch
from adabatch_hvd import config, dist
from adabatch_hvd.trainer import Trainer
dist.init(1)
layouts = {}
for name in ("default", "channels_last"):
    cfg = config.from_args(None, {**json.loads(sys.argv[1]), "run.run_dir": f"{sys.argv[2]}/{name}",
                                  "model.channels_last": name == "channels_last"})
    trainer = Trainer(cfg)
    seen = set()  # the first convolution's input layouts, training and evaluation
    trainer.model.features[0].register_forward_pre_hook(
        lambda module, inputs: seen.add(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    trainer.fit()
    layouts[name] = {"channels-last inputs": sorted(seen),
                     "contiguous parameters": all(p.is_contiguous() for p in trainer.model.parameters())}
try:  # converting the parameters instead: Horovod refuses them, at the start of every run
    dist.broadcast_state(trainer.model.to(memory_format=torch.channels_last))
except ValueError as e:
    layouts["refused"] = str(e)
print(json.dumps(layouts))
"""
TINY = {"data.name": "synthetic", "data.synthetic_samples": 256, "data.synthetic_shape": "3,16,16",
        "data.test_samples": 128, "model.name": "fmnist_cnn", "schedule.epochs": 2, "schedule.interval": 1,
        "schedule.initial_batch": 32, "run.quiet": True, "run.threads": 1}


def test_channels_last_trains_as_the_default_layout_does(tmp_path):
    """Two epochs of the default model, Horovod of size 1, with and without model.channels_last: its convolutions
    get channels-last inputs, its parameters stay contiguous, and the losses and accuracies are the same but for
    rounding (other convolution kernels: 3e-8 apart here)."""
    proc = subprocess.run([sys.executable, "-c", TRAIN, json.dumps(TINY), tmp_path], cwd=ROOT, env=hvd_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layouts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert layouts == {"default": {"channels-last inputs": [False], "contiguous parameters": True},
                       "channels_last": {"channels-last inputs": [True], "contiguous parameters": True},
                       "refused": "Tensor is required to be contiguous."}
    default, channels_last = records(tmp_path / "default"), records(tmp_path / "channels_last")
    assert len(default) == len(channels_last) == 2
    for want, got in zip(default, channels_last):
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (key, got, want)


# ---- the config keys ----------------------------------------------------------------------------------
def test_the_keys_are_in_the_yaml_and_on_the_command_line_and_bad_values_are_refused(tmp_path):
    cfg = config.Config()
    assert yaml.safe_load(config.dump_yaml(cfg))["model"] == {"name": "fmnist_cnn", "channels_last": False,
                                                            "cudnn_benchmark": True}
    parser = config.parser("adabatch-train", "")
    assert "--channels-last" in parser.format_help() and "--no-cudnn-benchmark" in parser.format_help()
    for argv, want in ((["--channels-last"], (True, True)), (["--no-cudnn-benchmark"], (False, False)),
                       (["--model.channels_last", "yes", "--cudnn-benchmark", "off"], (True, False))):
        cfg = config.from_args(None, config.overrides(parser.parse_args(argv)))
        assert (cfg.model.channels_last, cfg.model.cudnn_benchmark) == want, argv
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  channels_last: true\n")
    assert config.from_args(str(path), {}).model.channels_last is True
    with pytest.raises(UserError, match=r"^model\.channels_last: expected bool, got 'maybe'$"):
        config.from_args(None, {"model.channels_last": "maybe"})
    path.write_text("model:\n  cudnn_benchmark: 2\n")
    with pytest.raises(UserError, match=r"^model\.cudnn_benchmark: expected bool, got 2$"):
        config.from_args(str(path), {})

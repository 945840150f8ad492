"""Models: every name builds, trains a step on grey 28x28 and colour 32x32 inputs, and has the published shape."""

import pytest
import torch
from torch import nn

from adabatch_hvd.data import DatasetInfo
from adabatch_hvd.errors import UserError
from adabatch_hvd.models import MODELS, build_model, has_batchnorm

INPUTS = [DatasetInfo(num_classes=10, in_channels=1, image_size=28),
          DatasetInfo(num_classes=100, in_channels=3, image_size=32)]


def step(model, info, batch=2):
    """Forward and backward on random data; returns the logits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, info.in_channels, info.image_size, info.image_size, generator=g)
    y = torch.randint(0, info.num_classes, (batch,), generator=g)
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    return out


@pytest.mark.parametrize("info", INPUTS, ids=["fmnist", "cifar100"])
@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_a_step(name, info):
    torch.manual_seed(0)
    model = build_model(name, info)
    out = step(model, info)
    assert out.shape == (2, info.num_classes) and torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first_conv_or_linear = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert first_conv_or_linear.weight.shape[1] == info.in_channels or name == "mlp"
    assert first_conv_or_linear.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name, depth, params", [("resnet20", 20, 269_722), ("resnet32", 32, 464_154),
                                                 ("resnet56", 56, 853_018)])
def test_cifar_resnets_match_the_paper(name, depth, params):
    # He et al. 2016 Table 6 gives 0.27M / 0.46M / 0.85M; option-A shortcuts add no weights.
    model = build_model(name, DatasetInfo(num_classes=10, in_channels=3, image_size=32))
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()) == depth


def test_vgg19_bn_has_sixteen_conv_bn_layers():
    model = build_model("vgg19_bn", DatasetInfo(num_classes=10, in_channels=3, image_size=32))
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 16
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 16


def test_fmnist_cnn_shape():
    model = build_model("fmnist_cnn", INPUTS[0])
    # conv 1->16 and 16->32 (3x3), then 32*7*7 -> 128 -> 10.
    assert sum(p.numel() for p in model.parameters()) == 160 + 4_640 + (1568 * 128 + 128) + 1290
    with pytest.raises(UserError, match="at least 4x4"):
        build_model("fmnist_cnn", DatasetInfo(num_classes=10, in_channels=1, image_size=3))


def test_torchvision_models_by_name():
    import torchvision

    model = build_model("resnet50", DatasetInfo(num_classes=7, in_channels=3, image_size=64))
    assert isinstance(model, torchvision.models.ResNet)
    assert step(model, DatasetInfo(num_classes=7, in_channels=3, image_size=64)).shape == (2, 7)
    grey = DatasetInfo(num_classes=10, in_channels=1, image_size=32)
    model = build_model("resnet18", grey)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64 and model.conv1.stride == (2, 2)
    assert step(model, grey).shape == (2, 10)


def test_has_batchnorm():
    info = INPUTS[0]
    assert [has_batchnorm(build_model(n, info)) for n in ("mlp", "fmnist_cnn", "alexnet", "resnet20", "vgg19_bn")] \
        == [False, False, False, True, True]


def test_unknown_model_suggests_the_nearest():
    with pytest.raises(UserError, match=r"did you mean 'resnet20'\?"):
        build_model("resnet-20", INPUTS[1])
    with pytest.raises(UserError, match="choose one of fmnist_cnn, mlp") as err:
        build_model("no_such_model_xyz", INPUTS[1])
    assert "\n" not in str(err.value)

"""Models by name: small CIFAR/Fashion-MNIST networks of our own, and any torchvision classifier.

Ours take their input channels, class count and image size from `DatasetInfo`, so each one runs on
28x28 grey Fashion-MNIST as well as 32x32 colour CIFAR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import DatasetInfo
from .errors import UserError, suggest

MODELS = ("fmnist_cnn", "mlp", "resnet20", "resnet32", "resnet56", "vgg19_bn", "alexnet")
# fmnist_cnn and mlp grow with the image area, which comes from a data file's header or synthetic_shape
# (the others pool adaptively): 2^30 weights in one layer are 4 GiB of float32.
MAX_LAYER_WEIGHTS = 1 << 30

# torchvision's configuration "E": channel counts, with "M" for a 2x2 max-pool.
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]


def _check_layer(name: str, info: DatasetInfo, weights: int) -> None:
    """Refuse a first linear layer of more than MAX_LAYER_WEIGHTS weights before it is allocated."""
    if weights > MAX_LAYER_WEIGHTS:
        raise UserError(f"{name} on {info.in_channels}x{info.image_size}x{info.image_size} images would have a "
                        f"layer of {weights:,} weights, more than the limit of {MAX_LAYER_WEIGHTS:,}; use smaller "
                        f"images or another model")


class FashionCNN(nn.Module):
    """The fast CPU default for Fashion-MNIST: two conv+pool stages and two linear layers.

    It has no BatchNorm on purpose: every layer then treats samples independently, so k accumulated
    micro-batches give exactly the gradient of one big batch, and the parity tests can be exact.
    """

    def __init__(self, info: DatasetInfo):
        super().__init__()
        side = info.image_size // 4  # two 2x2 pools; the padded convs keep the size
        if side < 1:
            raise UserError(f"fmnist_cnn needs images of at least 4x4, got {info.image_size}")
        _check_layer("fmnist_cnn", info, 32 * side * side * 128)
        # Measured on augmented Fashion-MNIST: 16/32 padded channels train faster per core-second
        # and reach a higher accuracy by epoch 3-4 than 32/64 unpadded ones. Pooling before the
        # ReLU gives the same result on 4x fewer elements.
        self.features = nn.Sequential(
            nn.Conv2d(info.in_channels, 16, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(16, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * side * side, 128), nn.ReLU(inplace=True), nn.Linear(128, info.num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def mlp(info: DatasetInfo) -> nn.Module:
    """A tiny BatchNorm-free MLP (flatten, 64 hidden units) for fast, exact parity tests."""
    _check_layer("mlp", info, info.in_channels * info.image_size ** 2 * 64)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(info.in_channels * info.image_size ** 2, 64), nn.ReLU(inplace=True),
        nn.Linear(64, info.num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity shortcut (He et al. 2016, option A when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def shortcut(self, x):
        # Option A: subsample and zero-pad the new channels, so the shortcut adds no parameters
        # (the paper's choice for its CIFAR experiments).
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images (He et al. 2016, sec. 4.2): 3 stages of n blocks at 16/32/64 channels."""

    def __init__(self, n: int, info: DatasetInfo):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(info.in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, info.num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def vgg19_bn(info: DatasetInfo) -> nn.Module:
    """VGG-19 with BatchNorm for small images: torchvision's conv stack "E" and one linear classifier.

    Pools use ceil_mode so five halvings still leave 1x1 from 28x28 (floor would reach 0x0).
    """
    layers, cin = [], info.in_channels
    for v in _VGG19:
        if v == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            cin = v
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, info.num_classes))


def alexnet(info: DatasetInfo) -> nn.Module:
    """The common 5-conv CIFAR AlexNet (64-192-384-256-256 channels, one linear classifier).

    Pools use ceil_mode so 28x28 inputs keep a 1x1 map, as 32x32 ones do.
    """
    def pool():
        return nn.MaxPool2d(2, ceil_mode=True)

    return nn.Sequential(
        nn.Conv2d(info.in_channels, 64, 11, stride=4, padding=5), nn.ReLU(inplace=True), pool(),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), pool(),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), pool(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, info.num_classes),
    )


_BUILDERS = {
    "fmnist_cnn": FashionCNN,
    "mlp": mlp,
    "resnet20": lambda info: CifarResNet(3, info),
    "resnet32": lambda info: CifarResNet(5, info),
    "resnet56": lambda info: CifarResNet(9, info),
    "vgg19_bn": vgg19_bn,
    "alexnet": alexnet,
}


def _torchvision_model(name: str, info: DatasetInfo) -> nn.Module:
    """torchvision classifier `name`, untrained, with its first conv rebuilt when the input is not RGB."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UserError(f"unknown model {name!r}{suggest(name, MODELS + tuple(known))}; choose one of "
                        f"{', '.join(MODELS)} or a name from torchvision.models.list_models()")
    model = torchvision.models.get_model(name, weights=None, num_classes=info.num_classes)
    if info.in_channels != 3:
        path, conv = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d))
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, nn.Conv2d(info.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                        conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                        conv.padding_mode))
    return model


def build_model(name: str, info: DatasetInfo) -> nn.Module:
    """A freshly initialised model `name` for inputs and classes described by `info`."""
    builder = _BUILDERS.get(name)
    return builder(info) if builder else _torchvision_model(name, info)


def place(model: nn.Module, device: torch.device, channels_last: bool = False,
          cudnn_benchmark: bool = False) -> nn.Module:
    """`model` on `device`, run as model.channels_last and model.cudnn_benchmark ask; on the CPU, by default, it
    is only moved.

    channels_last converts each 4-D input (a forward pre-hook: training and evaluation alike), not the parameters:
    Horovod's broadcast and allreduce refuse tensors that are not contiguous. A convolution given a channels-last
    input runs in that layout and so does what follows it; the weight is converted per call (small beside the
    activations) and its gradient comes back in the parameter's layout. cudnn.benchmark is process-wide and only
    helps convolutions, so it is set for models with some, on CUDA only.
    """
    model = model.to(device)
    if channels_last:
        model.register_forward_pre_hook(_channels_last)
    if cudnn_benchmark and device.type == "cuda" and any(isinstance(m, nn.modules.conv._ConvNd)
                                                         for m in model.modules()):
        torch.backends.cudnn.benchmark = True
    return model


def _channels_last(module, inputs):
    x, *rest = inputs
    return (x.contiguous(memory_format=torch.channels_last), *rest) if x.dim() == 4 else None


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any layer normalises over the batch, making results depend on how a batch is split."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

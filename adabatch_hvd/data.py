"""Data sets that yield exactly the micro-batches the sampler asks for, with reproducible augmentation.

Every random choice (crop, flip) is a pure function of (seed, epoch, sample index), so a sample looks
the same whichever rank loads it and however the global batch is split into micro-batches. Resume
after a crash and the accumulation-parity tests both rely on that. Nothing here touches the global RNG.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol, Sequence

import torch
import torch.nn.functional as F

from .config import DATA_SETS
from .errors import UserError, one_line, suggest
from .limits import MAX_IDX_BYTES, MAX_PICKLE_BYTES, size_text

MAX_SAMPLES = 100_000_000  # of an in-memory data set: its labels alone take 800 MB
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841
MAX_CHANNELS = 1024  # of synthetic images; real ones have 1 or 3
DATASETS = tuple(DATA_SETS)  # the names, in the registry's order (config.DATA_SETS: sizes, roots, readers)

# (padding for the random crop, per-channel mean, per-channel std) of the training images.
_FASHION = (2, (0.2860,), (0.3530,))
_CIFAR10 = (4, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_CIFAR100 = (4, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Uniform bytes have mean 1/2 and std 1/sqrt(12) of full scale, so synthetic inputs get unit variance.
_UNIFORM = ((0.5,), (0.2887,))

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DatasetInfo:
    """What a model needs to know about its inputs and labels."""

    num_classes: int
    in_channels: int
    image_size: int


class Dataset(Protocol):
    """What the trainer uses: `info`, `len()`, and `iterate()` over given micro-batches."""

    info: DatasetInfo

    def __len__(self) -> int: ...

    def iterate(self, micro_batches: Iterable, epoch: int, workers: int = 0) -> Iterator[Batch]: ...


def _mix(*parts: int) -> int:
    """A 63-bit seed from several integers; unlike seed + epoch, distinct tuples never collide in practice."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _normalizer(mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) such that uint8 x * scale - shift equals ToTensor then Normalize(mean, std)."""
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return 1.0 / (255.0 * std_t), torch.tensor(mean).view(1, -1, 1, 1) / std_t


def _crop_flip(x: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad, crop back to size at `shifts` (dy, dx) and mirror where `flips`, for a whole uint8 batch.

    One gather does the crop and the flip for every sample at once; a per-sample loop would cost
    more than the model on small images.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = shifts[:, :1] + torch.arange(h)
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + shifts[:, 1:]
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


class InMemoryImages:
    """A uint8 image tensor [N, C, H, W] with labels, batched by indexing the tensor directly."""

    def __init__(self, images, labels, info, mean, std, *, pad: int = 0, augment: bool = False, seed: int = 0):
        self.images, self.labels, self.info = images, labels, info
        self.pad, self.augment, self.seed = pad, augment, seed
        self._scale, self._shift = _normalizer(mean, std)
        self._plan_epoch, self._plan = None, None

    def __len__(self) -> int:
        return len(self.labels)

    def augmentation_plan(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop offsets [N, 2] and flip flags [N] of every sample in `epoch`, drawn from (seed, epoch) only."""
        if self._plan_epoch != epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            shifts = torch.randint(0, 2 * self.pad + 1, (len(self), 2), generator=g)
            flips = torch.randint(0, 2, (len(self),), generator=g).bool()
            self._plan_epoch, self._plan = epoch, (shifts, flips)
        return self._plan

    def iterate(self, micro_batches: Iterable, epoch: int, workers: int = 0) -> Iterator[Batch]:
        """One normalized (x, y) per micro-batch, in order; `workers` is ignored since indexing is cheap."""
        for batch in micro_batches:
            idx = torch.as_tensor(batch, dtype=torch.long)
            x = self.images.index_select(0, idx)
            if self.augment:
                shifts, flips = self.augmentation_plan(epoch)
                x = _crop_flip(x, shifts[idx], flips[idx], self.pad)
            yield x.float().mul_(self._scale).sub_(self._shift), self.labels.index_select(0, idx)


class SyntheticImages:
    """Random images and labels for throughput runs: fixed by the seed, no augmentation."""

    # Large shapes (e.g. 3x224x224) would need gigabytes for every sample; a pool this size is
    # reused round-robin instead, which costs a benchmark nothing.
    POOL_BYTES = 64 << 20

    def __init__(self, samples: int, shape: Sequence[int], classes: int, seed: int):
        c, h, w = shape
        g = torch.Generator().manual_seed(_mix(seed, samples, c, h, w, classes))
        pool = max(1, min(samples, self.POOL_BYTES // (c * h * w)))
        self.images = torch.randint(0, 256, (pool, c, h, w), dtype=torch.uint8, generator=g)
        self.labels = torch.randint(0, classes, (samples,), generator=g)
        self.info = DatasetInfo(num_classes=classes, in_channels=c, image_size=h)
        self._scale, self._shift = _normalizer(*_UNIFORM)

    def __len__(self) -> int:
        return len(self.labels)

    def iterate(self, micro_batches: Iterable, epoch: int, workers: int = 0) -> Iterator[Batch]:
        """One (x, y) per micro-batch; `epoch` and `workers` make no difference here."""
        for batch in micro_batches:
            idx = torch.as_tensor(batch, dtype=torch.long)
            y = self.labels.index_select(0, idx)  # first, so an out-of-range index raises
            x = self.images.index_select(0, idx % len(self.images))
            yield x.float().mul_(self._scale).sub_(self._shift), y


class _SeededSamples(torch.utils.data.Dataset):
    """ImageFolder samples keyed by (epoch, index), transformed with the CPU RNG seeded by (seed, epoch, index).

    torchvision's transforms draw from the global CPU generator, so that is the one seeded, and its
    state is put back afterwards, so callers' RNG streams are untouched. Not torch.manual_seed /
    fork_rng: they also queue lazy CUDA and XPU seeds, each recording a formatted stack trace, which
    cost about a fifth of the whole decode-and-augment time per image.
    """

    def __init__(self, folder, transform, seed: int):
        self.folder, self.transform, self.seed = folder, transform, seed

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key):
        epoch, index = key
        try:
            image, label = self.folder[index]
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a file that is not an image
            raise UserError(f"cannot read image {self.folder.samples[index][0]} ({one_line(e)}); replace or "
                            f"remove it") from None
        rng = torch.default_generator
        state = rng.get_state()
        rng.manual_seed(_mix(self.seed, epoch, index))
        try:
            return self.transform(image), label
        finally:
            rng.set_state(state)


class _Batches:
    """The batch sampler of a long-lived DataLoader: each pass yields the batches set for it."""

    def __init__(self):
        self.batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class FolderImages:
    """An ImageFolder tree decoded by DataLoader workers, for data sets too big for memory.

    The workers persist across epochs, stages and evaluations (torch's persistent_workers): one
    DataLoader per worker count, fed with (epoch, index) keys, so starting a pass costs no forks.
    One pass at a time: a new iterate() call ends the previous pass, which then must not be read on.
    """

    def __init__(self, folder, transform, info: DatasetInfo, seed: int):
        self.folder, self.transform, self.info, self.seed = folder, transform, info, seed
        self.samples = _SeededSamples(folder, transform, seed)
        self.pin_memory = False  # set by build_dataset: for CUDA, the loader's own thread pins the workers' batches
        self._loader, self._pass = None, 0

    def __len__(self) -> int:
        return len(self.folder)

    def _workers(self, workers: int) -> torch.utils.data.DataLoader:
        if self._loader is None or self._loader.num_workers != workers:
            # The generator only seeds the workers (the samples are seeded by key); without it
            # DataLoader would draw from the global RNG.
            self._loader = torch.utils.data.DataLoader(
                self.samples, batch_sampler=_Batches(), num_workers=workers, persistent_workers=True,
                pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(_mix(self.seed)))
        return self._loader

    def iterate(self, micro_batches: Iterable, epoch: int, workers: int = 0) -> Iterator[Batch]:
        """One (x, y) per micro-batch, in order, decoded by `workers` processes (0: in this one)."""
        batches = [[(epoch, i) for i in (b.tolist() if torch.is_tensor(b) else b)] for b in micro_batches]
        if workers == 0:
            for keys in batches:
                yield torch.utils.data.default_collate([self.samples[k] for k in keys])
            return
        loader = self._workers(workers)
        self._pass += 1
        this_pass = self._pass
        loader.batch_sampler.batches = batches
        done = 0
        try:
            for batch in loader:  # iter() here, when the pass starts, resets the workers to these batches
                if self._pass != this_pass:
                    break
                done += 1
                yield batch
        except UserError as e:  # from a worker process, its message carries the worker's traceback
            raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None
        if done < len(batches):
            raise RuntimeError("FolderImages.iterate() was called again while an earlier pass was being read; "
                               "it serves one pass at a time")


def _read_idx_gz(path: str) -> torch.Tensor:
    """One IDX .gz of unsigned bytes (Fashion-MNIST's format) as a uint8 tensor of the shape in its header.

    Read here rather than by torchvision's reader: importing torchvision costs every rank about 2 s at
    start. The sizes in the header are checked against MAX_SAMPLES and MAX_IDX_BYTES first, and no more
    is decompressed than they claim, so a damaged header or a gzip bomb is an error, not a full memory.
    """
    with gzip.open(path, "rb") as src:
        head = src.read(4)
        ndim = head[3] if len(head) == 4 else 0
        dims = struct.unpack(f">{ndim}I", src.read(4 * ndim)) if 1 <= ndim <= 4 else ()
        size = math.prod(dims)
        if dims and (dims[0] > MAX_SAMPLES or size > MAX_IDX_BYTES):
            raise UserError(f"{path}: its header claims {' x '.join(map(str, dims))} bytes, more than the limit "
                            f"of {MAX_SAMPLES} samples and {size_text(MAX_IDX_BYTES)}; the file is damaged or "
                            f"not Fashion-MNIST")
        if head[:3] != b"\0\0\x08" or len(dims) != ndim or not dims:
            raise ValueError("not an IDX file of unsigned bytes")
        data = src.read(size + 1)
    if len(data) != size:
        raise ValueError(f"{len(data) if len(data) <= size else 'more'} bytes of data where the header claims {size}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*dims) if size else \
        torch.zeros(dims, dtype=torch.uint8)


def _check_labels(name: str, labels: torch.Tensor, num_classes: int, where: str, hint: str) -> None:
    """Every label must name one of the classes, or the loss fails mid-epoch with an index error."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise UserError(f"{name}: {len(bad)} labels in {where} are outside 0..{num_classes - 1} "
                        f"(e.g. {bad[0].item()}); {hint}")


def _fashion_mnist(name: str, root: str, train: bool, augment: bool, seed: int) -> InMemoryImages:
    prefix = "train" if train else "t10k"
    files = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    hint = "apt-get install dataset-fashion-mnist (or run launch/setup.sh)"
    missing = [f for f in files if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise UserError(f"fashion-mnist: {', '.join(missing)} not found in '{root}'; {hint}")
    try:
        images = _read_idx_gz(os.path.join(root, files[0]))
        labels = _read_idx_gz(os.path.join(root, files[1]))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the reader raise
        raise UserError(f"fashion-mnist: cannot read {files} in '{root}' ({one_line(e)}); reinstall: {hint}") from e
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.shape[1] != images.shape[2]:
        raise UserError(f"fashion-mnist: {files} in '{root}' do not hold matching square images and labels "
                        f"(images {tuple(images.shape)}, {len(labels)} labels); reinstall: {hint}")
    _check_labels("fashion-mnist", labels, 10, os.path.join(root, files[1]), hint)
    pad, mean, std = _FASHION
    info = DatasetInfo(num_classes=10, in_channels=1, image_size=images.shape[-1])
    return InMemoryImages(images.unsqueeze(1), labels.long(), info, mean, std,
                          pad=pad, augment=augment and train, seed=seed)


def _unverified(cls):
    """A torchvision CIFAR class that checks the files exist but skips their md5 sums.

    Hashing 170 MB costs seconds at every start, and it would reject test fixtures and subsets;
    unpickling still fails loudly on a damaged file.
    """
    return type(cls.__name__ + "Unverified", (cls,), {
        "train_list": [[name, None] for name, _ in cls.train_list],
        "test_list": [[name, None] for name, _ in cls.test_list],
        "meta": {**cls.meta, "md5": None},
    })


def _cifar(name: str, root: str, train: bool, augment: bool, seed: int) -> InMemoryImages:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, archive, spec = (CIFAR10, "cifar-10-python.tar.gz", _CIFAR10) if name == "cifar10" else (
        CIFAR100, "cifar-100-python.tar.gz", _CIFAR100)
    where = os.path.join(root, cls.base_folder)
    hint = f"download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into '{root}'"
    for f in os.listdir(where) if os.path.isdir(where) else []:  # torchvision unpickles each file whole
        if os.path.getsize(os.path.join(where, f)) > MAX_PICKLE_BYTES:
            raise UserError(f"{name}: {os.path.join(where, f)} is larger than {size_text(MAX_PICKLE_BYTES)}, far "
                            f"more than a {name.upper()} file; re-{hint}")
    try:
        ds = _unverified(cls)(root, train=train, download=False)
    except RuntimeError as e:
        raise UserError(f"{name}: no python-version {name.upper()} files in '{where}'; {hint}") from e
    except Exception as e:  # noqa: BLE001 - whatever a damaged pickle makes the reader raise
        raise UserError(f"{name}: cannot read the files in '{where}' ({one_line(e)}); re-{hint}") from e
    if ds.data.dtype != "uint8":
        raise UserError(f"{name}: the images in '{where}' are {ds.data.dtype}, not 8-bit pixels; re-{hint}")
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    try:
        labels = torch.tensor(ds.targets, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise UserError(f"{name}: the labels in '{where}' are not integers ({e}); re-{hint}") from None
    if labels.ndim != 1 or len(labels) != len(images):
        raise UserError(f"{name}: '{where}' holds {len(images)} images but {labels.numel()} labels; re-{hint}")
    _check_labels(name, labels, len(ds.classes), where, f"re-{hint}")
    pad, mean, std = spec
    info = DatasetInfo(num_classes=len(ds.classes), in_channels=3, image_size=images.shape[-1])
    return InMemoryImages(images, labels, info, mean, std, pad=pad, augment=augment and train, seed=seed)


def _imagenet(name: str, root: str, train: bool, augment: bool, seed: int) -> FolderImages:
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import find_classes

    split = os.path.join(root, "train" if train else "val")
    layout = (f"imagenet: expected ImageFolder layout '{root}/train/<class>/*.JPEG' and "
              f"'{root}/val/<class>/*.JPEG' (val sorted into the same class folders)")
    try:
        # Labels come from train/'s folders for both splits, so a val/ with a missing class
        # cannot silently shift every label after it.
        classes, _ = find_classes(os.path.join(root, "train"))
        if len(classes) > MAX_CLASSES:
            raise UserError(f"imagenet: '{root}/train' has {len(classes)} class folders, more than the limit of "
                            f"{MAX_CLASSES}; give the data set's root")
        folder = ImageFolder(split)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UserError(f"{layout}; {e}") from e
    if folder.classes != classes:
        raise UserError(f"{layout}; '{split}' has {len(folder.classes)} class folders, train/ has {len(classes)}")
    if train and augment:
        steps = [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(256), T.CenterCrop(224)]
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)])
    info = DatasetInfo(num_classes=len(classes), in_channels=3, image_size=224)
    return FolderImages(folder, transform, info, seed)


def build_dataset(name: str, root: str | None, train: bool, *, augment: bool = True, seed: int = 0,
                  synthetic_samples: int = 4096, synthetic_shape=(3, 32, 32),
                  synthetic_classes: int = 10, pin_memory: bool = False) -> Dataset:
    """The training (`train=True`) or test split of data set `name`, read from `root` (None: the default).

    `augment` only applies to training splits; `seed` fixes augmentation (and the synthetic data).
    `pin_memory` (a run on CUDA): DataLoader workers' batches are pinned in the loader's thread; the
    other sets' batches are pinned on their way to the GPU (stepper.to_device).
    """
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}{suggest(name, DATASETS)}; choose one of {', '.join(DATASETS)}")
    entry = DATA_SETS[name]
    root = entry.root if root is None else str(root)
    if entry.reader:  # a reader of files: (name, root, train, augment, seed)
        data = globals()[entry.reader](name, root, train, augment, seed)
        if isinstance(data, FolderImages):
            data.pin_memory = pin_memory
        return data
    shape = tuple(int(s) for s in synthetic_shape)
    if len(shape) != 3 or shape[1] != shape[2] or min(shape) < 1 or shape[0] > MAX_CHANNELS:
        raise UserError(f"synthetic_shape must be (channels, size, size) with 1..{MAX_CHANNELS} channels, got "
                        f"{tuple(synthetic_shape)}")
    if shape[0] * shape[1] * shape[2] > SyntheticImages.POOL_BYTES:
        raise UserError(f"synthetic_shape {shape} is {shape[0] * shape[1] * shape[2]} bytes per image, above the "
                        f"{SyntheticImages.POOL_BYTES >> 20} MiB image pool; use a smaller shape")
    if not (1 <= synthetic_samples <= MAX_SAMPLES and 1 <= synthetic_classes <= MAX_CLASSES):
        raise UserError(f"synthetic data needs 1..{MAX_SAMPLES} samples and 1..{MAX_CLASSES} classes, "
                        f"got {synthetic_samples} and {synthetic_classes}")
    # The test split gets its own draw, so evaluating on it is not evaluating on training data.
    return SyntheticImages(synthetic_samples, shape, synthetic_classes, _mix(seed, int(train)))

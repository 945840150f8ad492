"""Data sets: real Fashion-MNIST, CIFAR and ImageFolder files on disk, and reproducible augmentation."""

import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adabatch_hvd.data import DATASETS, DatasetInfo, build_dataset
from adabatch_hvd.errors import UserError

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


@pytest.fixture(scope="module")
def fashion_train():
    return build_dataset("fashion-mnist", None, True, seed=3)


def collect(ds, batches, epoch, workers=0):
    """All micro-batches of one pass, concatenated."""
    xs, ys = zip(*ds.iterate(batches, epoch, workers))
    return torch.cat(xs), torch.cat(ys)


def to_bytes(x, mean, std):
    """Undo normalisation back to the uint8 pixels it came from."""
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def test_fashion_mnist_reads_the_debian_files(fashion_train):
    test = build_dataset("fashion-mnist", None, False)
    assert (len(fashion_train), len(test)) == (60000, 10000)
    assert fashion_train.info == test.info == DatasetInfo(num_classes=10, in_channels=1, image_size=28)
    # Fashion-MNIST is exactly balanced: 6000 / 1000 images per class.
    assert torch.equal(torch.bincount(fashion_train.labels), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    assert fashion_train.labels[:4].tolist() == [9, 0, 0, 3]
    x, y = collect(test, [list(range(10000))], epoch=0)
    assert x.dtype == torch.float32 and x.shape == (10000, 1, 28, 28)
    assert y.dtype == torch.int64 and torch.equal(y, test.labels)
    # Normalised with the training statistics, the test set comes out near zero mean, unit std.
    assert abs(x.mean().item()) < 0.01 and abs(x.std().item() - 1) < 0.01


def test_augmentation_ignores_how_batches_are_split_and_which_instance_loads(fashion_train):
    idx = [5, 17, 3, 42, 100, 59999, 0]
    whole = collect(fashion_train, [idx], epoch=1)
    split = collect(fashion_train, [torch.tensor(idx[:2]), idx[2:3], idx[3:]], epoch=1)
    other_rank = collect(build_dataset("fashion-mnist", None, True, seed=3), [idx[::-1]], epoch=1)
    assert torch.equal(whole[0], split[0]) and torch.equal(whole[1], split[1])
    assert torch.equal(whole[0], other_rank[0].flip(0))
    assert not torch.equal(whole[0], collect(fashion_train, [idx], epoch=2)[0])
    other_seed = build_dataset("fashion-mnist", None, True, seed=4)
    assert not torch.equal(whole[0], collect(other_seed, [idx], epoch=1)[0])


@settings(max_examples=25, deadline=None)
@given(idx=st.lists(st.integers(0, 59999), min_size=1, max_size=30), cuts=st.sets(st.integers(1, 29)),
       epoch=st.integers(0, 1000))
def test_any_split_gives_the_same_samples(fashion_train, idx, cuts, epoch):
    bounds = [0, *sorted(c for c in cuts if c < len(idx)), len(idx)]
    batches = [idx[a:b] for a, b in zip(bounds, bounds[1:])]
    assert torch.equal(collect(fashion_train, [idx], epoch)[0], collect(fashion_train, batches, epoch)[0])


def test_augmentation_is_a_padded_crop_with_optional_mirror(fashion_train):
    idx = list(range(0, 60000, 300))
    x, _ = collect(fashion_train, [idx], epoch=7)
    got = to_bytes(x, (FASHION_MEAN,), (FASHION_STD,))
    padded = torch.nn.functional.pad(fashion_train.images[idx], (2, 2, 2, 2))
    changed = mirrored = 0
    for k, i in enumerate(idx):
        crops = [padded[k, :, dy:dy + 28, dx:dx + 28] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(got[k], c) for c in crops)
        mirror = any(torch.equal(got[k], c.flip(-1)) for c in crops)
        assert plain or mirror, i
        changed += not torch.equal(got[k], fashion_train.images[i])
        mirrored += mirror and not plain
    # 49 of 50 (shift, flip) choices change the image, and about half of the samples are mirrored.
    assert changed > 0.8 * len(idx) and 0.3 * len(idx) < mirrored < 0.7 * len(idx)


def test_iterating_leaves_the_global_rng_alone(fashion_train):
    before = torch.get_rng_state()
    collect(fashion_train, [[1, 2, 3]], epoch=11)
    assert torch.equal(before, torch.get_rng_state())


def write_pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def random_images(n, seed):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_cifar10_round_trips_the_python_pickle_format(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    train_images, train_labels = random_images(10, 0), [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    for b in range(5):
        rows = train_images[2 * b:2 * b + 2].reshape(2, -1).numpy()  # R plane, G plane, B plane per row
        write_pickle(folder / f"data_batch_{b + 1}", {"data": rows, "labels": train_labels[2 * b:2 * b + 2]})
    test_images = random_images(3, 1)
    write_pickle(folder / "test_batch", {"data": test_images.reshape(3, -1).numpy(), "labels": [7, 0, 8]})
    write_pickle(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})

    train = build_dataset("cifar10", tmp_path, True, augment=False)
    assert len(train) == 10 and train.info == DatasetInfo(num_classes=10, in_channels=3, image_size=32)
    x, y = collect(train, [[0, 1, 2], list(range(3, 10))], epoch=0)
    assert torch.equal(to_bytes(x, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), train_images)
    assert y.tolist() == train_labels
    test = build_dataset("cifar10", str(tmp_path), False)
    x, y = collect(test, [[2, 0]], epoch=0)
    assert torch.equal(to_bytes(x, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), test_images[[2, 0]])
    assert y.tolist() == [8, 7]
    augmented = build_dataset("cifar10", tmp_path, True)
    assert not torch.equal(collect(augmented, [list(range(10))], epoch=0)[0], collect(train, [list(range(10))], 0)[0])


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    images = random_images(4, 2)
    write_pickle(folder / "train", {"data": images.reshape(4, -1).numpy(), "fine_labels": [99, 0, 57, 3],
                                    "coarse_labels": [19, 4, 2, 1]})
    write_pickle(folder / "test", {"data": images[:2].reshape(2, -1).numpy(), "fine_labels": [1, 2],
                                   "coarse_labels": [0, 0]})
    write_pickle(folder / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                                   "coarse_label_names": [f"g{i}" for i in range(20)]})
    train = build_dataset("cifar100", tmp_path, True, augment=False)
    assert train.info == DatasetInfo(num_classes=100, in_channels=3, image_size=32)
    x, y = collect(train, [[3, 0], [2]], epoch=0)
    assert y.tolist() == [3, 99, 57]
    assert torch.equal(to_bytes(x, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)), images[[3, 0, 2]])
    assert len(build_dataset("cifar100", tmp_path, False)) == 2


def write_image_folder(root, classes, make):
    from torchvision.transforms.functional import to_pil_image

    for split in ("train", "val"):
        for label, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for k in range(2):
                to_pil_image(make(label, k)).save(root / split / name / f"{k}.png")


def test_imagenet_folder_labels_and_center_crop(tmp_path):
    colours = torch.tensor([[255, 0, 0], [0, 0, 255]], dtype=torch.uint8)
    write_image_folder(tmp_path, ["cat", "dog"], lambda label, k: colours[label].view(3, 1, 1).expand(3, 20, 30))
    val = build_dataset("imagenet", tmp_path, False)
    assert len(val) == 4 and val.info == DatasetInfo(num_classes=2, in_channels=3, image_size=224)
    x, y = collect(val, [[3, 0], [1, 2]], epoch=0)
    assert x.shape == (4, 3, 224, 224) and y.tolist() == [1, 0, 0, 1]
    pixels = to_bytes(x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert torch.equal(pixels, colours[y].view(4, 3, 1, 1).expand(4, 3, 224, 224))


def test_imagenet_augmentation_is_seeded_per_sample(tmp_path):
    g = torch.Generator().manual_seed(0)
    write_image_folder(tmp_path, ["a", "b"], lambda label, k: torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8,
                                                                           generator=g))
    train = build_dataset("imagenet", tmp_path, True, seed=5)
    before = torch.get_rng_state()
    whole = collect(train, [[0, 1, 2, 3]], epoch=1)
    assert torch.equal(before, torch.get_rng_state())
    in_workers = collect(train, [[0, 1], torch.tensor([2, 3])], epoch=1, workers=2)
    assert torch.equal(whole[0], in_workers[0]) and whole[1].tolist() == in_workers[1].tolist() == [0, 0, 1, 1]
    assert not torch.equal(whole[0], collect(train, [[0, 1, 2, 3]], epoch=2)[0])


def pid_folder(tmp_path):
    """A FolderImages whose 'image' is the id of the process that loaded it."""
    import os

    from torchvision.datasets import ImageFolder

    from adabatch_hvd.data import FolderImages

    write_image_folder(tmp_path, ["a", "b"], lambda label, k: torch.zeros(3, 8, 8, dtype=torch.uint8))
    info = DatasetInfo(num_classes=2, in_channels=3, image_size=8)
    return FolderImages(ImageFolder(tmp_path / "train"), lambda image: torch.tensor([os.getpid()]), info, seed=0)


def test_imagenet_workers_persist_across_epochs(tmp_path):
    import os

    ds = pid_folder(tmp_path)
    pids = [collect(ds, [[0, 1], [2, 3]], epoch, workers=2)[0].flatten().tolist() for epoch in range(3)]
    workers = set(pids[0])
    assert len(workers) == 2 and os.getpid() not in workers  # two worker processes, one per batch
    assert set(pids[1]) == set(pids[2]) == workers  # the same processes served every epoch


def test_imagenet_a_new_pass_ends_the_previous_one(tmp_path):
    g = torch.Generator().manual_seed(1)
    write_image_folder(tmp_path, ["a", "b"], lambda label, k: torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8,
                                                                           generator=g))
    train = build_dataset("imagenet", tmp_path, True, seed=5)
    expected = collect(train, [[0], [1], [2], [3]], epoch=2)
    stopped = train.iterate([[3], [2], [1], [0]], 1, workers=2)
    next(stopped)  # a pass left early (as the trainer does at run.stop_after_steps) ...
    assert torch.equal(collect(train, [[0], [1], [2], [3]], epoch=2, workers=2)[0], expected[0])  # ... is dropped
    abandoned = train.iterate([[0], [1], [2]], 1, workers=2)
    next(abandoned)
    collect(train, [[0, 1]], epoch=2, workers=2)
    with pytest.raises(RuntimeError, match="one pass at a time"):
        next(abandoned)  # reading on would mix another pass's samples in


def test_imagenet_val_must_have_the_train_classes(tmp_path):
    write_image_folder(tmp_path, ["a", "b"], lambda label, k: torch.zeros(3, 8, 8, dtype=torch.uint8))
    for f in (tmp_path / "val" / "a").iterdir():
        f.unlink()
    (tmp_path / "val" / "a").rmdir()
    with pytest.raises(UserError, match="has 1 class folders, train/ has 2"):
        build_dataset("imagenet", tmp_path, False)


@pytest.mark.parametrize("name, hint", [
    ("fashion-mnist", "apt-get install dataset-fashion-mnist (or run launch/setup.sh)"),
    ("cifar10", "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"),
    ("cifar100", "cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html"),
    ("imagenet", "/train/<class>/*.JPEG"),
])
def test_missing_root_says_how_to_get_the_data(tmp_path, name, hint):
    with pytest.raises(UserError) as err:
        build_dataset(name, tmp_path / "nowhere", True)
    assert hint in str(err.value) and "\n" not in str(err.value)


def test_damaged_files_are_user_errors(tmp_path):
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (tmp_path / f).write_bytes(b"not gzip")
    with pytest.raises(UserError, match="cannot read"):
        build_dataset("fashion-mnist", tmp_path, True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        (folder / f).write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="cannot read"):
        build_dataset("cifar10", tmp_path, True)


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(UserError, match=r"did you mean 'cifar10'\?"):
        build_dataset("cifar-10", None, True)
    with pytest.raises(UserError, match="fashion-mnist, cifar10"):
        build_dataset("mnist-ish", None, True)
    assert DATASETS == ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")


def test_synthetic_is_fixed_by_the_seed():
    ds = build_dataset("synthetic", None, True, seed=1, synthetic_samples=100, synthetic_shape=(3, 16, 16),
                       synthetic_classes=7)
    assert len(ds) == 100 and ds.info == DatasetInfo(num_classes=7, in_channels=3, image_size=16)
    x, y = collect(ds, [torch.arange(60), list(range(60, 100))], epoch=0)
    assert x.shape == (100, 3, 16, 16) and x.dtype == torch.float32
    assert y.min() >= 0 and y.max() == 6 and len(torch.unique(y)) == 7
    again = build_dataset("synthetic", "", True, seed=1, synthetic_samples=100, synthetic_shape=(3, 16, 16),
                          synthetic_classes=7)
    assert torch.equal(x, collect(again, [range(100)], epoch=5)[0])
    other = build_dataset("synthetic", "", True, seed=2, synthetic_samples=100, synthetic_shape=(3, 16, 16),
                          synthetic_classes=7)
    assert not torch.equal(y, other.labels)
    empty_x, empty_y = next(ds.iterate([[]], epoch=0))
    assert empty_x.shape == (0, 3, 16, 16) and empty_y.shape == (0,)


def test_synthetic_rejects_bad_shapes():
    with pytest.raises(UserError, match="synthetic_shape"):
        build_dataset("synthetic", None, True, synthetic_shape=(3, 32, 16))

import pytest
import torch

from compress.batches import iterate_batches
from compress.data import load_data
from compress.errors import CompressError


def _check_bundle(b, num_classes, size):
    assert b.num_classes == num_classes and b.input_size == (3, size, size)
    x, y = next(iterate_batches(b.train, 16, shuffle=True, augment=True))
    assert x.shape[1:] == (3, size, size) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.long and int(y.max()) < num_classes
    assert len(b.mean) == 3 and len(b.std) == 3 and min(b.std) > 0
    assert len(b.val) > 0


def test_digits_split_is_deterministic_and_disjoint():
    a, b = load_data("digits"), load_data("digits", seed=5)
    _check_bundle(a, 10, 32)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert len(a.train) + len(a.val) == 1797 and a.test is None


def test_digits_grayscale_is_replicated_to_three_channels():
    x, _ = load_data("digits", image_size=16).val.batch(torch.arange(4))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_subset_is_seeded():
    a, b, c = (load_data("digits", subset=100, seed=s) for s in (1, 1, 2))
    assert len(a.train) == 100 and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.train.images, c.train.images)


def test_fashion_mnist_from_a_directory(fashion_dir):
    b = load_data(f"fashion-mnist:{fashion_dir}")
    _check_bundle(b, 10, 28)
    assert len(b.test) == 50


def test_fashion_mnist_system_package():
    b = load_data("fashion-mnist")
    assert (len(b.train), len(b.val), len(b.test)) == (55000, 5000, 10000)


def test_cifar10(cifar10_dir):
    b = load_data(f"cifar10:{cifar10_dir}")
    _check_bundle(b, 10, 32)
    assert b.classes[0] == "c0" and len(b.train) + len(b.val) == 300 and len(b.test) == 20


def test_cifar100_resized(cifar100_dir):
    b = load_data(f"cifar100:{cifar100_dir}", image_size=24)
    _check_bundle(b, 100, 24)


def test_imagefolder(imagefolder_dir):
    b = load_data(f"imagefolder:{imagefolder_dir}", image_size=32)
    _check_bundle(b, 3, 32)
    assert b.classes == ["cat", "dog", "fox"] and len(b.val) == 9


def test_synthetic_is_deterministic_and_learnable_sized():
    a, b = load_data("synthetic:200"), load_data("synthetic:200")
    _check_bundle(a, 10, 32)
    assert torch.equal(a.train.images, b.train.images)


@pytest.mark.parametrize("spec, words", [
    ("mnist", "unknown data spec"),
    ("cifar10", "needs a directory"),
    ("cifar10:/nonexistent", "no data_batch_1"),
    ("imagefolder:/nonexistent", "needs /nonexistent/train"),
    ("fashion-mnist:/nonexistent", "apt-get install dataset-fashion-mnist"),
    ("synthetic:abc", "needs an integer"),
])
def test_bad_specs_name_the_problem(spec, words):
    with pytest.raises(CompressError, match=words):
        load_data(spec)


def test_truncated_idx_file_is_reported(fashion_dir, tmp_path):
    import shutil

    for f in fashion_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    import gzip

    p = tmp_path / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(CompressError, match="truncated"):
        load_data(f"fashion-mnist:{tmp_path}")

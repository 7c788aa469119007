"""Shared fixtures: small real data on disk in each supported layout, and a quickly trained run."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A CIFAR-10 python-pickle directory with 60 train / 20 test images per batch file."""
    root = tmp_path_factory.mktemp("cifar10") / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", 60) for i in range(1, 6)], ("test_batch", 20)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    return root.parent


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    rng = np.random.default_rng(1)
    for name, n in (("train", 400), ("test", 100)):
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(np.arange(n) % 100)}
        (root / name).write_bytes(pickle.dumps(batch))
    return root


@pytest.fixture(scope="session")
def imagefolder_dir(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(2)
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("cat", "dog", "fox"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory) -> Path:
    """Idx files in Fashion-MNIST's layout (gzip), small: 200 train, 50 test."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(3)

    def write(name: str, arr: np.ndarray) -> None:
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        with gzip.open(root / f"{name}.gz", "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    write("train-images-idx3-ubyte", rng.integers(0, 256, (200, 28, 28)))
    write("train-labels-idx1-ubyte", np.arange(200) % 10)
    write("t10k-images-idx3-ubyte", rng.integers(0, 256, (50, 28, 28)))
    write("t10k-labels-idx1-ubyte", np.arange(50) % 10)
    return root


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """A resnet20 trained briefly on digits at 16 px: a real run directory for load/eval/bad-input tests."""
    from compress.training import train_run

    out = tmp_path_factory.mktemp("runs") / "digits"
    train_run("resnet20", "digits", out, epochs=1, image_size=16, subset=300, seed=0)
    return out

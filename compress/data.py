"""Datasets by short spec (design.md `--data SPEC`): uint8 tensors in memory, or image files read on demand.

Everything is offline: a missing dataset is an error that says where we looked and how to get it.
Splits are deterministic: where a source has no validation split, a fixed-seed stratified slice of
its training split is held out, so model selection never touches the test split.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from compress.errors import CompressError

SPLIT_SEED = 0  # fixed: validation sets must not move with the training seed
FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSet:
    """A split: uint8 images [N, C, H, W] at the model's size (C = 1 or 3), or files loaded per batch."""

    labels: torch.Tensor
    images: torch.Tensor | None = None
    files: list[Path] | None = None
    image_size: int = 32
    flip: bool = False  # horizontal flips are label-preserving (not for digits)
    crop: bool = True  # random-translation crops (off for centred, size-normalised Fashion-MNIST)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def raw(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [n, C, H, W] (C = 1 or 3) and labels for the given indices."""
        if self.images is not None:
            return self.images[idx], self.labels[idx]
        return torch.stack([read_image(self.files[i], self.image_size) for i in idx.tolist()]), self.labels[idx]

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1], 3 channels, and labels for the given indices."""
        x, y = self.raw(idx)
        x = x.float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous(), y

    def subset(self, idx: torch.Tensor) -> ImageSet:
        images = self.images[idx] if self.images is not None else None
        files = [self.files[i] for i in idx.tolist()] if self.files is not None else None
        return ImageSet(self.labels[idx], images, files, self.image_size, self.flip, self.crop)


@dataclass
class DataBundle:
    spec: str
    train: ImageSet
    val: ImageSet
    test: ImageSet | None
    num_classes: int
    classes: list[str]
    input_size: tuple[int, int, int]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)


def load_data(spec: str, image_size: int | None = None, subset: int | None = None, seed: int = 0) -> DataBundle:
    """Parse a `--data` spec and load it. `subset` keeps N training images (seeded by `seed`)."""
    name, _, arg = spec.partition(":")
    loaders = {"digits": _digits, "fashion-mnist": _fashion, "cifar10": _cifar10, "cifar100": _cifar100,
               "imagefolder": _imagefolder, "synthetic": _synthetic}
    if name not in loaders:
        raise CompressError(f"unknown data spec {spec!r}; use one of: digits, fashion-mnist[:DIR], cifar10:DIR, "
                            "cifar100:DIR, imagefolder:DIR, synthetic[:N]")
    if image_size is not None and not 8 <= image_size <= 1024:
        raise CompressError(f"--image-size {image_size} is out of range (8..1024)")
    bundle = loaders[name](arg, image_size)
    if subset is not None:
        if subset < 1:
            raise CompressError(f"--subset must be positive, got {subset}")
        if subset < len(bundle.train):
            pick = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(seed))[:subset]
            bundle.train = bundle.train.subset(pick.sort().values)
    bundle.mean, bundle.std = _channel_stats(bundle.train)
    return bundle


# ---------------------------------------------------------------- sources


def _digits(arg: str, image_size: int | None) -> DataBundle:
    from sklearn.datasets import load_digits

    if arg:
        raise CompressError("the digits spec takes no argument (it is bundled with scikit-learn)")
    d = load_digits()
    images = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(d.target.astype(np.int64))
    size = image_size or 32
    images = _resize_uint8(images, size)
    train_idx, val_idx = _stratified_split(labels, 0.2)
    all_set = ImageSet(labels, images, image_size=size)
    return DataBundle("digits", all_set.subset(train_idx), all_set.subset(val_idx), None, 10,
                      [str(i) for i in range(10)], (3, size, size))


def _fashion(arg: str, image_size: int | None) -> DataBundle:
    root = Path(arg or FASHION_DIR)
    files = {k: _find_idx(root, k) for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    size = image_size or 28
    train_x, test_x = (_resize_uint8(_read_idx(files[k]).unsqueeze(1), size) for k in ("train-images", "t10k-images"))
    train_y, test_y = (_read_idx(files[k]).long() for k in ("train-labels", "t10k-labels"))
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise CompressError(f"Fashion-MNIST files in {root} disagree on the number of images and labels")
    train_idx, val_idx = _stratified_split(train_y, 1 / 12)  # 5000 of the official 60000
    # Fashion-MNIST items are centred and size-normalised: flips help, translations mostly slow learning.
    full = ImageSet(train_y, train_x, image_size=size, flip=True, crop=False)
    return DataBundle(f"fashion-mnist:{root}" if arg else "fashion-mnist", full.subset(train_idx),
                      full.subset(val_idx), ImageSet(test_y, test_x, image_size=size, flip=True, crop=False), 10,
                      FASHION_CLASSES, (3, size, size))


def _cifar10(arg: str, image_size: int | None) -> DataBundle:
    root = _cifar_root(arg, "cifar10", "cifar-10-batches-py", "data_batch_1")
    train = [_unpickle(root / f"data_batch_{i}") for i in range(1, 6)]
    test = _unpickle(root / "test_batch")
    meta = root / "batches.meta"
    classes = [c.decode() for c in _unpickle(meta)[b"label_names"]] if meta.exists() else CIFAR10_CLASSES
    x = np.concatenate([b[b"data"] for b in train])
    y = np.concatenate([np.asarray(b[b"labels"]) for b in train])
    return _cifar_bundle(f"cifar10:{arg}", x, y, test[b"data"], np.asarray(test[b"labels"]), classes, image_size)


def _cifar100(arg: str, image_size: int | None) -> DataBundle:
    root = _cifar_root(arg, "cifar100", "cifar-100-python", "train")
    train, test = _unpickle(root / "train"), _unpickle(root / "test")
    meta = root / "meta"
    classes = ([c.decode() for c in _unpickle(meta)[b"fine_label_names"]] if meta.exists()
               else [str(i) for i in range(100)])
    return _cifar_bundle(f"cifar100:{arg}", train[b"data"], np.asarray(train[b"fine_labels"]), test[b"data"],
                         np.asarray(test[b"fine_labels"]), classes, image_size)


def _imagefolder(arg: str, image_size: int | None) -> DataBundle:
    if not arg:
        raise CompressError("imagefolder needs a directory: --data imagefolder:DIR (with DIR/train/<class>/...)")
    root = Path(arg)
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise CompressError(f"imagefolder:{root} needs {root}/train/<class>/ and {root}/val/<class>/ directories")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise CompressError(f"no class directories in {root}/train")
    size = image_size or 224
    splits = {s: _folder_split(root / s, classes, size) for s in ("train", "val", "test") if (root / s).is_dir()}
    return DataBundle(f"imagefolder:{root}", splits["train"], splits["val"], splits.get("test"), len(classes),
                      classes, (3, size, size))


def _synthetic(arg: str, image_size: int | None) -> DataBundle:
    """Ten classes of noisy, randomly shifted colour textures: deterministic, quick to learn, not trivial."""
    try:
        n = int(arg) if arg else 2000
    except ValueError:
        raise CompressError(f"synthetic:N needs an integer, got {arg!r}") from None
    if n < 20:
        raise CompressError(f"synthetic:N needs at least 20 images, got {n}")
    size = image_size or 32
    g = torch.Generator().manual_seed(1234)
    protos = F.interpolate(torch.rand(10, 3, 6, 6, generator=g), size=(size, size), mode="bilinear",
                           align_corners=False)
    labels = torch.arange(n) % 10
    shifts = torch.randint(-size // 8, size // 8 + 1, (n, 2), generator=g)
    base = torch.stack([torch.roll(protos[c], tuple(s.tolist()), dims=(1, 2))
                        for c, s in zip(labels, shifts, strict=True)])
    images = (0.6 * base + 0.4 * torch.rand(n, 3, size, size, generator=g)).mul(255).round().to(torch.uint8)
    train_idx, val_idx = _stratified_split(labels, 0.2)
    full = ImageSet(labels, images, image_size=size, flip=True)
    return DataBundle(f"synthetic:{n}", full.subset(train_idx), full.subset(val_idx), None, 10,
                      [f"class{i}" for i in range(10)], (3, size, size))


# ---------------------------------------------------------------- helpers


def _stratified_split(labels: torch.Tensor, val: float | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a fixed-seed stratified train/validation split (`val`: fraction or count)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    n_val = val if isinstance(val, int) else int(np.ceil(val * len(idx)))
    counts = np.bincount(labels.numpy())
    stratify = labels.numpy() if n_val >= len(counts) and counts[counts > 0].min() >= 2 else None
    train_idx, val_idx = train_test_split(idx, test_size=val, stratify=stratify, random_state=SPLIT_SEED)
    return torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(val_idx))


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = []
    for chunk in images.split(4096):
        r = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out.append(r.round().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def _channel_stats(ds: ImageSet) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the training split (3 channels; grayscale is replicated)."""
    if ds.images is None:  # image folders: estimate from up to 512 images
        pick = torch.arange(min(len(ds), 512))
        x, _ = ds.batch(pick)
    else:
        x = ds.images[: 20000].float().div(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}-idx{3 if 'images' in stem else 1}-ubyte", stem):
        for suffix in (".gz", ""):
            p = root / f"{name}{suffix}"
            if p.is_file():
                return p
    raise CompressError(f"Fashion-MNIST not found: no {stem}-idx*-ubyte[.gz] in {root} "
                        "(install it with `apt-get install dataset-fashion-mnist`, or pass fashion-mnist:DIR)")


def _read_idx(path: Path) -> torch.Tensor:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise CompressError(f"cannot read {path}: {exc}") from None
    if len(raw) < 8 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise CompressError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CompressError(f"{path} is truncated ({body.size} bytes of data, expected {int(np.prod(dims))})")
    return torch.from_numpy(body.reshape(dims).copy())


def _cifar_root(arg: str, name: str, subdir: str, probe: str) -> Path:
    if not arg:
        raise CompressError(f"{name} needs a directory: --data {name}:DIR (the python-pickle batches)")
    root = Path(arg)
    for cand in (root, root / subdir):
        if (cand / probe).is_file():
            return cand
    raise CompressError(f"{name}: no {probe} in {root} or {root / subdir} (download the 'python version' "
                        "archive from https://www.cs.toronto.edu/~kriz/cifar.html and extract it there)")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise CompressError(f"missing CIFAR file {path}") from None
    except Exception as exc:
        raise CompressError(f"{path} is not a CIFAR python batch ({type(exc).__name__})") from None


def _cifar_bundle(spec, x, y, tx, ty, classes, image_size) -> DataBundle:
    size = image_size or 32
    to_t = lambda a: _resize_uint8(torch.from_numpy(np.asarray(a, dtype=np.uint8).reshape(-1, 3, 32, 32)), size)  # noqa: E731
    train_x, test_x = to_t(x), to_t(tx)
    train_y, test_y = torch.from_numpy(np.asarray(y, dtype=np.int64)), torch.from_numpy(np.asarray(ty, dtype=np.int64))
    train_idx, val_idx = _stratified_split(train_y, 0.1)
    full = ImageSet(train_y, train_x, image_size=size, flip=True)
    return DataBundle(spec, full.subset(train_idx), full.subset(val_idx), ImageSet(test_y, test_x, image_size=size,
                      flip=True), len(classes), classes, (3, size, size))


def _folder_split(d: Path, classes: list[str], size: int) -> ImageSet:
    files, labels = [], []
    for k, c in enumerate(classes):
        for p in sorted((d / c).rglob("*")) if (d / c).is_dir() else []:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
                labels.append(k)
    if not files:
        raise CompressError(f"no images found under {d}/<class>/ (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageSet(torch.tensor(labels), files=files, image_size=size, flip=True)


def read_image(path: Path, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: resize the short side to `size`, then centre-crop."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            arr = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.uint8)
    except OSError as exc:
        raise CompressError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)

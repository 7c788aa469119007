"""Batches for every training-like stage: one epoch's seeded order, this rank's share, on the runtime's device.

An epoch is a seeded permutation cut into *global* batches of `batch_size`; under torchrun each rank
takes one contiguous slice of every global batch, so the ranks together see exactly the batches a
single process would (the averaged DDP gradient is the single-process one, and the learning-rate
schedule is the same). Augmentation (random crops, flips) is drawn per global batch from the epoch's
generator and applied to each rank's slice, so results do not depend on the number of ranks or
loader workers.

Two paths bring the images: in-memory uint8 tensors (digits, Fashion-MNIST, CIFAR: indexing is
faster than any worker) and image folders, which a persistent `DataLoader` streams — files are
opened and decoded in `--workers` processes, a few batches ahead, so memory stays bounded whatever the
folder's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from compress.data import ImageSet, read_image
from compress.runtime import Runtime, current

PREFETCH = 2   # batches each worker decodes ahead


@dataclass
class Augment:
    """Random crop offsets and flips of one global batch (None: not drawn for this set)."""

    pad: int
    dy: torch.Tensor | None
    dx: torch.Tensor | None
    flip: torch.Tensor | None

    @classmethod
    def draw(cls, g: torch.Generator, n: int, size: int, crop: bool, flip: bool) -> Augment:
        pad = max(1, size // 8)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=g) if crop else None
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=g) if crop else None
        flips = torch.rand(n, generator=g) < 0.5 if flip else None
        return cls(pad, dy, dx, flips)

    def part(self, lo: int, hi: int) -> Augment:
        cut = (lambda t: None if t is None else t[lo:hi])  # noqa: E731
        return Augment(self.pad, cut(self.dy), cut(self.dx), cut(self.flip))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-padded random crops of the input size, then horizontal flips."""
        out = x
        if self.dy is not None:
            n, _, h, w = x.shape
            p = self.pad
            padded = F.pad(x, (p, p, p, p))
            dy, dx = self.dy.tolist(), self.dx.tolist()
            out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        if self.flip is not None:
            mask = self.flip.to(out.device)
            out[mask] = out[mask].flip(-1)
        return out


def epoch_plan(n: int, batch_size: int, shuffle: bool, seed: int) -> tuple[list[torch.Tensor], torch.Generator]:
    """The global batches of one epoch and the generator that augmentation continues to draw from."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
    return list(order.split(batch_size)), g


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images → float in [0, 1] with 3 channels (grayscale replicated)."""
    x = x.float().div_(255.0)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


def batches(imageset: ImageSet, batch_size: int, *, shuffle: bool = False, seed: int = 0, augment: bool = False,
            rt: Runtime | None = None, shard: bool = True, limit: int | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (images, labels) on the runtime's device.

    `shard=False` gives every rank the whole global batches (work that must end identical on every rank
    without communication, e.g. BN re-estimation). `limit` stops after that many images.
    """
    rt = rt or current()
    plan, g = epoch_plan(len(imageset), batch_size, shuffle, seed)
    if limit is not None:
        plan = plan[:steps_per_epoch(min(limit, len(imageset)), batch_size)]
    split = shard and rt.distributed
    slices, augments = [], []
    for idx in plan:
        if split and len(idx) < rt.world_size:        # every rank needs at least one image: wrap around
            idx = torch.cat([idx, plan[0][: rt.world_size - len(idx)]])
        aug = Augment.draw(g, len(idx), imageset.image_size, imageset.crop, imageset.flip) if augment else None
        lo, hi = _bounds(len(idx), rt) if split else (0, len(idx))
        slices.append(idx[lo:hi])
        augments.append(aug.part(lo, hi) if aug is not None else None)
    for (images, labels), aug in zip(_fetch(imageset, slices, rt), augments, strict=True):
        x = to_float(rt.to_device(images))
        if aug is not None:
            x = aug.apply(x)
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, rt.to_device(labels)


def shard_indices(n: int, rt: Runtime | None = None) -> torch.Tensor:
    """This rank's contiguous share of 0..n-1 (evaluation: every index counted exactly once)."""
    rt = rt or current()
    lo, hi = _bounds(n, rt)
    return torch.arange(lo, hi)


def eval_batches(imageset: ImageSet, batch_size: int, rt: Runtime | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shard of a split, in order, without augmentation."""
    rt = rt or current()
    for images, labels in _fetch(imageset, list(shard_indices(len(imageset), rt).split(batch_size)), rt):
        x = to_float(rt.to_device(images))
        if rt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, rt.to_device(labels)


def _bounds(n: int, rt: Runtime) -> tuple[int, int]:
    """[lo, hi) of rank `rt.rank` when n items are cut into world_size nearly equal contiguous parts."""
    base, extra = divmod(n, rt.world_size)
    lo = rt.rank * base + min(rt.rank, extra)
    return lo, lo + base + (1 if rt.rank < extra else 0)


# ---------------------------------------------------------------- fetching


def _fetch(imageset: ImageSet, slices: list[torch.Tensor], rt: Runtime
           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 images and labels for each index slice: straight from memory, or decoded by the loader's workers."""
    if imageset.images is not None or rt.workers == 0:
        for idx in slices:
            yield imageset.raw(idx)
        return
    loader, sampler = _loader(imageset, rt)
    sampler.lists = slices
    yield from loader


class _Files(Dataset):
    """One file of an image folder → (uint8 [3, S, S], label), decoded in a worker."""

    def __init__(self, imageset: ImageSet):
        self.files, self.labels, self.size = imageset.files, imageset.labels, imageset.image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return read_image(self.files[i], self.size), self.labels[i]


class _IndexLists(Sampler):
    """A batch sampler whose batches are set before each epoch (the loader and its workers persist)."""

    def __init__(self):
        self.lists: list[torch.Tensor] = []

    def __iter__(self):
        return (idx.tolist() for idx in self.lists)

    def __len__(self) -> int:
        return len(self.lists)


_LOADERS: dict[int, tuple[ImageSet, DataLoader, _IndexLists]] = {}


def _loader(imageset: ImageSet, rt: Runtime) -> tuple[DataLoader, _IndexLists]:
    """One persistent DataLoader per file-backed split (workers start once per command, not per epoch)."""
    entry = _LOADERS.get(id(imageset))
    if entry is None or entry[0] is not imageset or entry[1].num_workers != rt.workers:
        sampler = _IndexLists()
        loader = DataLoader(_Files(imageset), batch_sampler=sampler, num_workers=rt.workers, pin_memory=rt.cuda,
                            persistent_workers=True, prefetch_factor=PREFETCH)
        entry = _LOADERS[id(imageset)] = (imageset, loader, sampler)
    return entry[1], entry[2]


def release_loaders() -> None:
    """Stop every loader's worker processes (end of a command)."""
    _LOADERS.clear()


def iterate_batches(imageset: ImageSet, batch_size: int, shuffle: bool = False, seed: int = 0,
                    augment: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of float CPU batches in this process alone (tools and tests; stages use `batches`)."""
    return batches(imageset, batch_size, shuffle=shuffle, seed=seed, augment=augment, rt=Runtime())

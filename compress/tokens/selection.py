"""How good are the token sets a token-sparse module keeps? Accuracy at inference's token counts with the
predictors' top-k sets, against random sets and the bottom-k sets of the same sizes, and with the sets the
DynamicViT stage samples while training; plus how much of each kind of set is object rather than background.

Why: the stage trains the backbone on token sets *sampled* from the predictors' keep probabilities, and
inference keeps the *top-k*. While the predictors are unsure (keep probabilities of about 0.6–0.85, as
after a few epochs on a small dataset) the two kinds of sets differ, and accuracy on the top-k sets can fall
below accuracy on random ones — a backbone-side mismatch that more predictor training or
`--token-finetune-epochs` fixes, not a ranking the predictors failed to learn (bottom-k then scores far
lower still). docs/tokens.md reads these figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from compress.tokens.model import TokenSparseViT, returning_indices

OBJECT_MARGIN = 0.1    # a patch is "object" if its brightest pixel exceeds the image's darkest patch by this much


@torch.no_grad()
def selection_report(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, seed: int = 0,
                     batch_size: int = 250) -> dict[str, float]:
    """Top-1 accuracy (fractions) on `images` (raw, as the data bundle gives them) with the top-k, random,
    bottom-k and sampled token sets; `object_*`: the share of kept patches (last stage) that are object
    where the background is uniform (Fashion-MNIST, digits), for the top-k and the sampled sets."""
    net = _sparse(module)
    generator = torch.Generator().manual_seed(seed)
    was_training = module.training
    module.eval()
    objects = _object_patches(images, net)
    out = {"object_all": float(objects.mean())}
    try:
        for name, rescore in (("top_k", None), ("random", _random_scores(generator)), ("bottom_k", _negated)):
            with _rescored(net, rescore):
                hits, share = _run(module, images, labels, objects, batch_size, _top_k)
            out[name] = hits
            if name == "top_k":
                out["object_top_k"] = share
        with _sampling(net, generator):
            out["sampled"], out["object_sampled"] = _run(module, images, labels, objects, batch_size, _sampled)
    finally:
        module.train(was_training)
    return out


def _run(module: nn.Module, images: torch.Tensor, labels: torch.Tensor, objects: torch.Tensor, batch_size: int,
         forward: Callable) -> tuple[float, float]:
    """Accuracy and the object share of the last stage's kept patches over `images`, in batches
    (`objects`: the images' [B, N] object-patch map)."""
    device = next(module.parameters()).device
    hits = on_object = kept = 0.0
    for start in range(0, len(images), batch_size):
        end = start + batch_size
        logits, last = forward(module, images[start:end].to(device))
        hits += float((logits.argmax(1).cpu() == labels[start:end]).sum())
        on_object += float((objects[start:end] * last).sum())
        kept += float(last.sum())
    return hits / len(images), on_object / max(kept, 1.0)


def _top_k(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    net = _sparse(module)
    with returning_indices(module):
        logits, *kept = module(x)
    last = torch.zeros(x.shape[0], net.patches).scatter_(1, kept[-1].cpu(), 1.0)
    return logits, last


def _sampled(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = module(x)
    return out.logits, out.keep_mask.float().cpu()


def _random_scores(generator: torch.Generator) -> Callable:
    return lambda logits: torch.randn(logits.shape, generator=generator).to(logits)


def _negated(logits: torch.Tensor) -> torch.Tensor:
    return -logits


@contextmanager
def _rescored(net: TokenSparseViT, rescore: Callable | None) -> Iterator[None]:
    """Inside: every prediction module's (keep, drop) logits go through `rescore` (None: unchanged)."""
    hooks = [] if rescore is None else [p.register_forward_hook(lambda _m, _i, out: rescore(out))
                                        for p in net.predictors]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@contextmanager
def _sampling(net: TokenSparseViT, generator: torch.Generator) -> Iterator[None]:
    """Inside: the masked-training path (Gumbel-sampled sets) runs, while every layer stays in eval mode."""
    net.training, net.sparse_training, net.generator = True, True, generator
    try:
        yield
    finally:
        net.training, net.sparse_training, net.generator = False, False, None


def _object_patches(images: torch.Tensor, net: TokenSparseViT) -> torch.Tensor:
    """[B, N] 1.0 where a patch holds object: its brightest pixel is OBJECT_MARGIN above the darkest patch's."""
    rows, cols, patch = net.adapter.patch_grid(net.backbone)
    grey = images.mean(1)[:, :rows * patch, :cols * patch]
    patches = grey.unfold(1, patch, patch).unfold(2, patch, patch).reshape(images.shape[0], rows * cols, -1)
    brightest = patches.amax(-1)
    background = patches.amin(-1).amin(1, keepdim=True)
    return (brightest > background + OBJECT_MARGIN).float()


def _sparse(module: nn.Module) -> TokenSparseViT:
    net = getattr(module, "net", module)
    if not isinstance(net, TokenSparseViT):
        raise ValueError("selection_report needs a token-sparse module")
    return net

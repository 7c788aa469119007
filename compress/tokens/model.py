"""DynamicViT (Rao et al., NeurIPS 2021): a ViT that drops uninformative tokens between stages.

A light prediction module before each of a few blocks scores every patch token from its own
feature and the image's global feature. Two forward paths share the weights:

- *masked training* (`sparse_training` on, training mode): Gumbel-softmax hard keep/drop decisions,
  multiplied into a running decision mask; tokens stay in the tensor and attention is masked
  (compress/tokens/attention.py), so the decisions receive gradients. Returns a `SparseOutput`
  with what the losses need (compress/tokens/losses.py).
- *gather* (inference, export, and plain fine-tuning): at each stage the top-k patch tokens by
  predicted keep score are gathered — k is fixed per stage (`keep`), so every shape is static and
  the module exports to ONNX/TensorRT; fvcore counts its FLOPs at the real token counts. Prefix
  tokens (the class token) are never scored and always kept. Kept tokens are put back in their
  spatial order (the blocks are permutation-equivariant, so logits do not depend on it) which makes
  the kept *set* the only thing a backend can disagree on.

The keep schedule lives in model.json "tokens" (`token_spec` / `sparsify_from_spec`), so a run
rebuilds from JSON + a weights-only state_dict.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from compress.errors import CompressError
from compress.tokens.backbones import ADAPTERS, adapter_for

STAGE_FRACTIONS = (0.25, 0.5, 0.75)    # DynamicViT's DeiT-S schedule: before blocks 3, 6, 9 of 12


class SparseOutput(NamedTuple):
    """Masked-training output: logits, final (normed) patch tokens, the final keep mask [B, N] and
    each stage's keep decisions [B, N] (cumulative, as the ratio loss reads them)."""

    logits: torch.Tensor
    tokens: torch.Tensor
    keep_mask: torch.Tensor
    decisions: list[torch.Tensor]


class TokenPredictor(nn.Module):
    """Prediction module (the reference's PredictorLG): LayerNorm → Linear → GELU gives per-token
    features; half stay local, half are averaged over the kept tokens into a global feature; the
    concatenation goes through a C → C/2 → C/4 → 2 MLP giving (keep, drop) logits per token."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.score = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                   nn.Linear(dim // 4, 2))

    def forward(self, x: torch.Tensor, policy: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x)
        local, glob = h.split([self.dim // 2, self.dim - self.dim // 2], dim=-1)
        if policy is None:                                  # every token present is kept (inference)
            glob = glob.mean(1, keepdim=True)
        else:
            glob = (glob * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True).clamp_min(1.0)
        return self.score(torch.cat([local, glob.expand(-1, local.shape[1], -1)], dim=-1))


def default_stages(depth: int, n: int = len(STAGE_FRACTIONS)) -> list[int]:
    """Blocks before which the predictors act: ¼, ½, ¾ of the depth (12 → 3, 6, 9; 8 → 2, 4, 6; 6 → 1, 3, 4);
    fewer stages when the depth is too small to hold them apart."""
    return sorted({int(depth * (i + 1) / (n + 1)) for i in range(n)})


def keep_counts(patches: int, keep_ratio: float, stages: int) -> list[int]:
    """Patch tokens kept after each stage: ⌊N·ρ^s⌋ (cumulative, as the reference), at least 1."""
    return [max(1, int(patches * keep_ratio ** (s + 1))) for s in range(stages)]


def check_keep_ratio(keep_ratio: float) -> None:
    if not 0.0 < keep_ratio < 1.0:
        raise CompressError(f"--token-keep must be in (0, 1), got {keep_ratio}")


def check_stages(depth: int, stages: list[int]) -> None:
    if not stages:
        raise CompressError("--token-stages needs at least one block index")
    if sorted(set(stages)) != list(stages) or stages[0] < 0 or stages[-1] >= depth:
        raise CompressError(f"--token-stages must be increasing block indices in 0..{depth - 1}, got {stages}")


class TokenSparseViT(nn.Module):
    """A ViT (`backbone`, unchanged) plus one `TokenPredictor` per stage; see the module docstring."""

    def __init__(self, backbone: nn.Module, stages: list[int], keep: list[int]):
        super().__init__()
        self.adapter = adapter_for(backbone)
        self.backbone = backbone
        self.stages = [int(s) for s in stages]
        self.keep = [int(k) for k in keep]
        self.prefix = self.adapter.prefix_tokens(backbone)
        self.patches = self.adapter.num_patches(backbone)
        depth = len(self.adapter.blocks(backbone))
        if len(self.stages) != len(self.keep):
            raise CompressError("one keep count per token stage is needed")
        check_stages(depth, self.stages)
        if any(b > a for a, b in zip([self.patches, *self.keep], self.keep, strict=False)) or self.keep[-1] < 1:
            raise CompressError(f"kept token counts must shrink from {self.patches} patches, got {self.keep}")
        self.predictors = nn.ModuleList(TokenPredictor(self.adapter.embed_dim(backbone)) for _ in self.stages)
        self.sparse_training = False        # set by the DynamicViT training stage
        self.return_indices = False         # export: also output each stage's kept patch indices
        self.generator: torch.Generator | None = None   # Gumbel noise source (None: the global RNG)

    def forward(self, x: torch.Tensor):
        if self.training and self.sparse_training:
            return self._forward_masked(x)
        return self._forward_gather(x)

    def _forward_gather(self, x: torch.Tensor):
        a, net, p = self.adapter, self.backbone, self.prefix
        t = a.embed(net, x)
        positions = torch.arange(self.patches, device=t.device).expand(t.shape[0], -1)
        kept = []
        stage_of = {b: s for s, b in enumerate(self.stages)}
        for i, block in enumerate(a.blocks(net)):
            s = stage_of.get(i)
            if s is not None:
                logits = self.predictors[s](t[:, p:])
                score = logits[..., 0] - logits[..., 1]      # monotone in the keep probability
                idx = score.topk(self.keep[s], dim=1).indices.sort(dim=1).values
                patches = t[:, p:].gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))
                t = torch.cat([t[:, :p], patches], dim=1)
                positions = positions.gather(1, idx)
                kept.append(positions)
            t = block(t)
        logits = a.head(net, a.final_norm(net, t), None)
        return (logits, *kept) if self.return_indices else logits

    def _forward_masked(self, x: torch.Tensor) -> SparseOutput:
        a, net, p = self.adapter, self.backbone, self.prefix
        t = a.embed(net, x)
        b = t.shape[0]
        prev = t.new_ones(b, self.patches, 1)
        policy = None
        decisions = []
        stage_of = {blk: s for s, blk in enumerate(self.stages)}
        for i, block in enumerate(a.blocks(net)):
            s = stage_of.get(i)
            if s is not None:
                keep = gumbel_keep(self.predictors[s](t[:, p:], prev), self.generator) * prev
                decisions.append(keep.squeeze(-1))
                prev = keep
                policy = torch.cat([keep.new_ones(b, p), keep.squeeze(-1)], dim=1)
            t = block(t) if policy is None else a.masked_block(block, t, policy)
        t = a.final_norm(net, t)
        return SparseOutput(a.head(net, t, policy), t[:, p:], prev.squeeze(-1), decisions)


@torch.no_grad()
def dense_forward(net: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain ViT's logits and final (normed) patch tokens: the teacher's side of the distillation."""
    a = adapter_for(net)
    t = a.embed(net, x)
    for block in a.blocks(net):
        t = block(t)
    t = a.final_norm(net, t)
    return a.head(net, t, None), t[:, a.prefix_tokens(net):]


def gumbel_keep(logits: torch.Tensor, generator: torch.Generator | None = None, tau: float = 1.0) -> torch.Tensor:
    """Hard Gumbel-softmax keep decision [B, N, 1] from (keep, drop) logits, straight-through gradient."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    soft = ((logits.float() + gumbel) / tau).softmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return (hard - soft.detach() + soft)[..., :1].to(logits.dtype)


# ------------------------------------------------------------------ model.json


def sparsify(net: nn.Module, keep_ratio: float, stages: list[int] | None = None) -> TokenSparseViT:
    """Wrap a ViT with fresh prediction modules for keep ratio ρ per stage (cumulative ρ, ρ², ρ³…)."""
    adapter = adapter_for(net)
    depth = len(adapter.blocks(net))
    stages = default_stages(depth) if stages is None else list(stages)
    check_keep_ratio(keep_ratio)
    check_stages(depth, stages)
    return TokenSparseViT(net, stages, keep_counts(adapter.num_patches(net), keep_ratio, len(stages)))


def token_spec(model: TokenSparseViT, keep_ratio: float | None = None) -> dict[str, Any]:
    """model.json "tokens": everything `sparsify_from_spec` needs, plus the schedule in words."""
    return {"method": "dynamicvit", "backbone": model.adapter.kind, "stages": list(model.stages),
            "keep": list(model.keep), "keep_ratio": keep_ratio, "patch_tokens": model.patches,
            "prefix_tokens": model.prefix, "tokens_per_block": tokens_per_block(model)}


def sparsify_from_spec(net: nn.Module, spec: dict[str, Any]) -> TokenSparseViT:
    """Rebuild the token-sparse module recorded in model.json "tokens" around a freshly built `net`."""
    try:
        model = TokenSparseViT(net, spec["stages"], spec["keep"])
    except KeyError as exc:
        raise CompressError(f"model.json \"tokens\" is missing the key {exc}") from None
    if spec.get("backbone", model.adapter.kind) != model.adapter.kind or spec.get("patch_tokens") != model.patches:
        raise CompressError("model.json \"tokens\" does not describe this model's tokens")
    return model


def tokens_per_block(model: TokenSparseViT) -> list[int]:
    """How many tokens (prefix + patches) each block processes at inference."""
    counts, n = [], model.patches
    stage_of = {b: s for s, b in enumerate(model.stages)}
    for i in range(len(model.adapter.blocks(model.backbone))):
        if i in stage_of:
            n = model.keep[stage_of[i]]
        counts.append(model.prefix + n)
    return counts


def index_output_names(module: nn.Module) -> list[str]:
    """Names of the extra outputs an exported token-sparse module carries: each stage's kept patch
    indices (original positions, ascending) — [] for any other module."""
    net = getattr(module, "net", module)
    return [f"kept_tokens_{i + 1}" for i in range(len(net.stages))] if isinstance(net, TokenSparseViT) else []


@contextmanager
def returning_indices(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Inside: a token-sparse (deployable) module returns (logits, kept indices of each stage…)."""
    net = getattr(module, "net", module)
    if not enabled or not isinstance(net, TokenSparseViT):
        yield
        return
    before, net.return_indices = net.return_indices, True
    try:
        yield
    finally:
        net.return_indices = before


def backbone_of(net: nn.Module) -> nn.Module:
    """The ViT inside a token-sparse module (or `net` itself): what channel pruning operates on."""
    return net.backbone if isinstance(net, TokenSparseViT) else net


__all__ = ["ADAPTERS", "STAGE_FRACTIONS", "SparseOutput", "TokenPredictor", "TokenSparseViT", "backbone_of",
           "check_keep_ratio", "check_stages", "default_stages", "dense_forward", "gumbel_keep", "index_output_names",
           "keep_counts", "returning_indices", "sparsify", "sparsify_from_spec", "token_spec", "tokens_per_block"]

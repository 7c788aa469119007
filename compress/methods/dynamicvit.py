"""DynamicViT (Rao et al., NeurIPS 2021): token sparsification alone, every channel kept.

The method itself lives in compress/tokens (prediction modules, masked attention, top-k gather, the
DynamicViT training stage); the prune pipeline runs it for any method given `--token-keep`. This entry
makes `--method dynamicvit` the token-only choice: no channel search, no `--flops-ratio` (the FLOPs
follow from `--token-keep`). See docs/tokens.md.
"""

from __future__ import annotations

from compress.methods.base import Method, PruneContext, SearchResult, register


@register
class DynamicViT(Method):
    name = "dynamicvit"
    summary = "token sparsification of ViTs only (Rao et al. 2021): prediction modules keep ⌊N·ρ^s⌋ tokens per stage"
    prunes_channels = False

    def search(self, ctx: PruneContext) -> SearchResult:
        return SearchResult(masks={})       # every channel is kept

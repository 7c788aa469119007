"""Random channel selection: the sanity floor every criterion must beat."""

from __future__ import annotations

from compress.methods.base import Method, PruneContext, SearchResult, register
from compress.pruning.importance import random_scores


@register
class Random(Method):
    name = "random"
    summary = "uniformly random units (seeded by --seed)"

    def search(self, ctx: PruneContext) -> SearchResult:
        return SearchResult(scores=random_scores(ctx.groups, seed=ctx.seed))

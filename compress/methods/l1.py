"""L1 filter pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017)."""

from __future__ import annotations

from compress.methods.base import Method, PruneContext, SearchResult, register
from compress.pruning.importance import l1_scores


@register
class L1(Method):
    name = "l1"
    summary = "L1 norm of each output filter of a group's root layer (Li et al. 2017)"

    def search(self, ctx: PruneContext) -> SearchResult:
        first = (ctx.before_sparse or {}).get("l1")           # sparse training moved the ranking from these
        return SearchResult(scores=l1_scores(ctx.groups),
                            initial_masks=ctx.select_masks(first) if first is not None else None)

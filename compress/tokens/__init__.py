"""Token sparsification for vision transformers (DynamicViT): prediction modules, masked attention for
training, top-k gather for a static-shape deployable module, and its model.json record."""

from compress.tokens.model import (
    SparseOutput,
    TokenPredictor,
    TokenSparseViT,
    backbone_of,
    default_stages,
    index_output_names,
    keep_counts,
    returning_indices,
    sparsify,
    sparsify_from_spec,
    token_spec,
    tokens_per_block,
)

__all__ = ["SparseOutput", "TokenPredictor", "TokenSparseViT", "backbone_of", "default_stages", "index_output_names",
           "keep_counts", "returning_indices", "sparsify", "sparsify_from_spec", "token_spec", "tokens_per_block"]

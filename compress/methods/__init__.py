"""Pruning methods (`compress prune --method`): the interface, the registry and the baselines."""

from compress.methods.base import (
    METHODS,
    Method,
    MethodOption,
    PruneContext,
    SearchResult,
    all_options,
    discover,
    get_method,
    list_methods,
    register,
)

__all__ = ["METHODS", "Method", "MethodOption", "PruneContext", "SearchResult", "all_options", "discover",
           "get_method", "list_methods", "register"]

"""Every merge method, as a configured instance, with the paper it comes from."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from .base import MergeMethod
from .gta import GeneralizedTaskArithmetic

MERGE_METHODS: dict[str, MergeMethod] = {
    m.name(): m
    for m in (
        GeneralizedTaskArithmetic("ties", "magnitude", True, True, "https://arxiv.org/abs/2306.01708"),
        GeneralizedTaskArithmetic("dare_ties", "random", True, True, "https://arxiv.org/abs/2311.03099"),
        GeneralizedTaskArithmetic("task_arithmetic", None, False, False, "https://arxiv.org/abs/2212.04089"),
        GeneralizedTaskArithmetic("linear", None, False, True, "https://arxiv.org/abs/2203.05482"),
    )
}


def merge_with_spec(taus: Sequence[torch.Tensor], spec: dict[str, Any]) -> torch.Tensor:
    """Merge task vectors by a recorded spec {"method", "params", "shard_params"}. A single tau
    comes back as a copy: there is nothing to reconcile, and trimming would only lose edits."""
    if len(taus) == 1:
        return taus[0].clone()
    shard_params = spec.get("shard_params") or [{} for _ in taus]
    return get_merge_method(spec["method"]).merge(list(taus), spec.get("params") or {}, shard_params)


def get_merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method '{name}'; available: {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[name]

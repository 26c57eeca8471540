"""Every merge method, as a configured instance, with the paper it comes from."""

from __future__ import annotations

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


def get_merge_method(name: str) -> MergeMethod:
    if name not in MERGE_METHODS:
        raise ConfigError(f"unknown merge method '{name}'; available: {', '.join(sorted(MERGE_METHODS))}")
    return MERGE_METHODS[name]

"""Merge methods for knowledge shards (task vectors): TIES and its relatives."""

from .base import MergeMethod, ParamDef
from .registry import MERGE_METHODS, get_merge_method, merge_with_spec

__all__ = ["MERGE_METHODS", "MergeMethod", "ParamDef", "get_merge_method", "merge_with_spec"]

"""WISE: side memory + activation router + knowledge shards merged with TIES (arXiv 2405.14768)."""

from ..registry import register_method
from .config import WiseConfig, default_config
from .layer import WiseLayer
from .method import WiseEditor, merge_shards, router_threshold, shard_mask
from .retrieve import WiseRetrieveEditor, WiseRetrieveLayer

register_method(name="wise", config_cls=WiseConfig, method_cls=WiseEditor)
register_method(name="wise-retrieve", config_cls=WiseConfig, method_cls=WiseRetrieveEditor)

__all__ = [
    "WiseConfig", "WiseEditor", "WiseLayer", "WiseRetrieveEditor", "WiseRetrieveLayer", "default_config",
    "merge_shards", "router_threshold", "shard_mask",
]

"""MEMOIR: zero-initialised residual memory with sample-dependent TopHash masks (arXiv 2506.07899)."""

from ..registry import register_method
from .config import MemoirConfig, default_config
from .layer import MemoirLayer
from .method import MemoirEditor, MemoirState

register_method(name="memoir", config_cls=MemoirConfig, method_cls=MemoirEditor)

__all__ = ["MemoirConfig", "MemoirEditor", "MemoirLayer", "MemoirState", "default_config"]

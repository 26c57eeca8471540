"""Comparison baselines (ALGORITHMS.md §3): FT-L fine-tunes W itself; GRACE keeps a key-value codebook."""

from ..registry import register_method
from .ft_l import FtlConfig, FtlEditor, FtlLayer
from .grace import Codebook, GraceConfig, GraceEditor, GraceLayer

register_method(name="ft-l", config_cls=FtlConfig, method_cls=FtlEditor)
register_method(name="grace", config_cls=GraceConfig, method_cls=GraceEditor)

__all__ = ["Codebook", "FtlConfig", "FtlEditor", "FtlLayer", "GraceConfig", "GraceEditor", "GraceLayer"]

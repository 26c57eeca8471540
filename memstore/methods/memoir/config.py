"""MEMOIR hyperparameters (ALGORITHMS.md §2), with per-model-family defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import ConfigError
from ..base import ContextConfig, hyperparameter


@dataclass
class MemoirConfig(ContextConfig):
    # Layer 24 of 30 on SmolLM2: rephrases find their own edit's mask, unrelated prompts none
    # (docs/BENCHMARKS.md, MEMOIR routing probe); fewer layers above also make edits cheaper.
    layer_fraction: ClassVar[float] = 0.83

    top_k_ratio: float = hyperparameter(0.2, "k / d_ff: fraction of input columns an edit's TopHash mask lets through")
    threshold: float = hyperparameter(0.5, "tau: route to the memory iff the best stored mask overlaps the query's by at least this")
    lr: float = hyperparameter(10.0, "SGD learning rate on the memory's masked columns")
    max_steps: int = hyperparameter(30, "optimisation steps per edit at most")
    grad_clip: float = hyperparameter(5.0, "gradient-norm clip per step")
    stop_loss: float = hyperparameter(0.05, "early stop once the edit loss is below this")
    edit_batch_size: int = hyperparameter(1, "edits trained together, each through its own mask (1: one at a time, as published)")
    protect: int = hyperparameter(4, "earlier edits sharing the most columns with a new edit, kept right while it trains (0: off)")
    background_size: int = hyperparameter(100, "irrelevant prompts whose mean feature is the background subtracted before top-k")
    center: bool = hyperparameter(False, "the memory reads the input minus the background mean (off: the paper's m * a)")
    precondition: float = hyperparameter(0.0, "lambda as a multiple of the mean eigenvalue of earlier edits' key covariance C; each step is multiplied by lambda (C + lambda I)^-1, away from inputs earlier edits read (0: off)")
    index: str = hyperparameter("flat", "FAISS index over the edit masks: flat (exact) or hnsw (graph, sub-linear)")
    seed: int = hyperparameter(0, "seed of the TopHash permutation")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.top_k_ratio < 1.0:
            raise ConfigError(f"top_k_ratio must be in (0, 1), got {self.top_k_ratio}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.max_steps < 1 or self.lr <= 0:
            raise ConfigError("max_steps must be >= 1 and lr > 0")
        if self.precondition < 0:
            raise ConfigError(f"precondition must be >= 0, got {self.precondition}")
        if self.edit_batch_size < 1:
            raise ConfigError(f"edit_batch_size must be >= 1, got {self.edit_batch_size}")
        if self.index not in ("flat", "hnsw"):
            raise ConfigError(f"index must be flat or hnsw, got '{self.index}'")



def default_config(model_type: str | None = None, **overrides) -> MemoirConfig:
    return MemoirConfig.for_model(model_type, **overrides)

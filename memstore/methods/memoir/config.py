"""MEMOIR hyperparameters (ALGORITHMS.md §2), with per-model-family defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ...errors import ConfigError
from ..base import MethodConfig


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class MemoirConfig(MethodConfig):
    # Layer 24 of 30 on SmolLM2: rephrases find their own edit's mask, unrelated prompts none
    # (docs/BENCHMARKS.md, MEMOIR routing probe); fewer layers above also make edits cheaper.
    layer_fraction: ClassVar[float] = 0.83

    top_k_ratio: float = _f(0.2, "k / d_ff: fraction of input columns an edit's TopHash mask lets through")
    threshold: float = _f(0.5, "tau: route to the memory iff the best stored mask overlaps the query's by at least this")
    lr: float = _f(10.0, "SGD learning rate on the memory's masked columns")
    max_steps: int = _f(30, "optimisation steps per edit at most")
    grad_clip: float = _f(5.0, "gradient-norm clip per step")
    stop_loss: float = _f(0.05, "early stop once the edit loss is below this")
    protect: int = _f(4, "earlier edits sharing the most columns with a new edit, kept right while it trains (0: off)")
    background_size: int = _f(100, "irrelevant prompts whose mean feature is the background subtracted before top-k")
    center: bool = _f(False, "the memory reads the input minus the background mean (off: the paper's m * a)")
    index: str = _f("flat", "FAISS index over the edit masks: flat (exact) or hnsw (graph, sub-linear)")
    prefix_seeds: tuple[str, ...] = _f(("I", "You", "Because", "Yes", "Q: "), "seeds of the generated context prefixes")
    prefix_lengths: tuple[int, ...] = _f((5, 10), "lengths in tokens of the generated context prefixes")
    chat_template: bool = _f(False, "wrap prompts in the tokenizer's chat template (instruct models)")
    seed: int = _f(0, "seed of the TopHash permutation")

    def __post_init__(self) -> None:
        self.prefix_seeds = tuple(self.prefix_seeds)
        self.prefix_lengths = tuple(int(n) for n in self.prefix_lengths)
        if not 0.0 < self.top_k_ratio < 1.0:
            raise ConfigError(f"top_k_ratio must be in (0, 1), got {self.top_k_ratio}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.max_steps < 1 or self.lr <= 0:
            raise ConfigError("max_steps must be >= 1 and lr > 0")
        if self.index not in ("flat", "hnsw"):
            raise ConfigError(f"index must be flat or hnsw, got '{self.index}'")



def default_config(model_type: str | None = None, **overrides) -> MemoirConfig:
    return MemoirConfig.for_model(model_type, **overrides)

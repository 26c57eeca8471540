"""WISE hyperparameters, with per-model-family defaults (ALGORITHMS.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError
from ..base import ContextConfig, hyperparameter


@dataclass
class WiseConfig(ContextConfig):
    mask_ratio: float = hyperparameter(0.2, "rho: fraction of W' entries a knowledge shard may change (Bernoulli mask)")
    edits_per_shard: int = hyperparameter(100, "save_freq: edits a shard holds before a new shard (new mask) starts")
    shards_per_memory: int = hyperparameter(1, "WISE-Retrieve (merge_freq / save_freq): shards merged into each side memory; "
                                   "a memory closes once it holds this many full shards")
    # 1 by default: on the real model the full scan sends most prompts to some other memory (37% of
    # edit prompts to their own at 20 memories); the nearest stored key finds the edit's memory and the
    # exact check still gates it: Rel 0.55 -> 1.00, Gen 0.36 -> 0.60, Loc kept (docs/BENCHMARKS.md).
    prefilter_candidates: int = hyperparameter(1, "WISE-Retrieve: a prompt's router scores only the memories of the "
                                      "c stored edit keys nearest its own key (FAISS pre-filter); 0 scores every memory "
                                      "(the published exhaustive route)")
    merge_method: str = hyperparameter("ties", "how shards merge into one side memory: ties, dare_ties, task_arithmetic, linear")
    merge_density: float = hyperparameter(0.53, "TIES trim: fraction of each shard's entries kept by magnitude")
    optimizer: str = hyperparameter("adam", "optimiser of the side memory: sgd (as the reference) or adam")
    lr: float = hyperparameter(0.03, "learning rate on the side memory")
    weight_decay: float = hyperparameter(0.0, "weight decay of the optimiser")
    max_steps: int = hyperparameter(30, "optimisation steps per edit at most")
    replay: int = hyperparameter(4, "earlier edits of the open shard replayed in each step, against forgetting")
    stop_loss: float = hyperparameter(0.05, "early stop once the edit loss is below this and the margins hold")
    stop_margin: float = hyperparameter(1.0, "early stop tolerates this much remaining margin loss")
    alpha: float = hyperparameter(5.0, "margin: irrelevant prompts' activation score is pushed below alpha")
    beta: float = hyperparameter(20.0, "margin: edited prompts' activation score is pushed above beta")
    gamma: float = hyperparameter(10.0, "margin: edited score exceeds irrelevant score by at least gamma")
    act_ratio: float = hyperparameter(0.8, "router threshold = act_ratio * min activation score of the edited prompts")
    router_reduce: str = hyperparameter("max", "how per-token activation scores make a prompt's score: mean or max")
    background_rank: int = hyperparameter(128, "side memory ignores the top-r principal directions of background activations (0: off)")
    max_update: float = hyperparameter(1.0, "norm constraint: each entry of W' stays within W +/- max_update")
    seed: int = hyperparameter(0, "seed of the shard masks and of the irrelevant-prompt choice")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.edits_per_shard < 1:
            raise ConfigError("edits_per_shard must be at least 1")
        if self.shards_per_memory < 1:
            raise ConfigError(f"shards_per_memory must be at least 1, got {self.shards_per_memory}")
        if self.prefilter_candidates < 0:
            raise ConfigError(f"prefilter_candidates must be >= 0 (0: score every memory), got {self.prefilter_candidates}")
        if not 0.0 < self.merge_density <= 1.0:
            raise ConfigError(f"merge_density must be in (0, 1], got {self.merge_density}")
        if self.max_steps < 1 or self.lr <= 0:
            raise ConfigError("max_steps must be >= 1 and lr > 0")
        if not 0.0 < self.act_ratio <= 1.0:
            raise ConfigError(f"act_ratio must be in (0, 1], got {self.act_ratio}")



def default_config(model_type: str | None = None, **overrides) -> WiseConfig:
    return WiseConfig.for_model(model_type, **overrides)

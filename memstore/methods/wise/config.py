"""WISE hyperparameters, with per-model-family defaults (ALGORITHMS.md §1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ConfigError
from ..base import MethodConfig


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class WiseConfig(MethodConfig):
    mask_ratio: float = _f(0.2, "rho: fraction of W' entries a knowledge shard may change (Bernoulli mask)")
    edits_per_shard: int = _f(100, "save_freq: edits a shard holds before a new shard (new mask) starts")
    shards_per_memory: int = _f(1, "WISE-Retrieve (merge_freq / save_freq): shards merged into each side memory; "
                                   "a memory closes once it holds this many full shards")
    merge_method: str = _f("ties", "how shards merge into one side memory: ties, dare_ties, task_arithmetic, linear")
    merge_density: float = _f(0.53, "TIES trim: fraction of each shard's entries kept by magnitude")
    optimizer: str = _f("adam", "optimiser of the side memory: sgd (as the reference) or adam")
    lr: float = _f(0.03, "learning rate on the side memory")
    weight_decay: float = _f(0.0, "weight decay of the optimiser")
    max_steps: int = _f(30, "optimisation steps per edit at most")
    replay: int = _f(4, "earlier edits of the open shard replayed in each step, against forgetting")
    stop_loss: float = _f(0.05, "early stop once the edit loss is below this and the margins hold")
    stop_margin: float = _f(1.0, "early stop tolerates this much remaining margin loss")
    alpha: float = _f(5.0, "margin: irrelevant prompts' activation score is pushed below alpha")
    beta: float = _f(20.0, "margin: edited prompts' activation score is pushed above beta")
    gamma: float = _f(10.0, "margin: edited score exceeds irrelevant score by at least gamma")
    act_ratio: float = _f(0.8, "router threshold = act_ratio * min activation score of the edited prompts")
    router_reduce: str = _f("max", "how per-token activation scores make a prompt's score: mean or max")
    background_rank: int = _f(128, "side memory ignores the top-r principal directions of background activations (0: off)")
    max_update: float = _f(1.0, "norm constraint: each entry of W' stays within W +/- max_update")
    prefix_seeds: tuple[str, ...] = _f(("I", "You", "Because", "Yes", "Q: "), "seeds of the generated context prefixes")
    prefix_lengths: tuple[int, ...] = _f((5, 10), "lengths in tokens of the generated context prefixes")
    chat_template: bool = _f(False, "wrap prompts in the tokenizer's chat template (instruct models)")
    seed: int = _f(0, "seed of the shard masks and of the irrelevant-prompt choice")

    def __post_init__(self) -> None:
        self.prefix_seeds = tuple(self.prefix_seeds)
        self.prefix_lengths = tuple(int(n) for n in self.prefix_lengths)
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if self.edits_per_shard < 1:
            raise ConfigError("edits_per_shard must be at least 1")
        if self.shards_per_memory < 1:
            raise ConfigError(f"shards_per_memory must be at least 1, got {self.shards_per_memory}")
        if not 0.0 < self.merge_density <= 1.0:
            raise ConfigError(f"merge_density must be in (0, 1], got {self.merge_density}")
        if self.max_steps < 1 or self.lr <= 0:
            raise ConfigError("max_steps must be >= 1 and lr > 0")
        if not 0.0 < self.act_ratio <= 1.0:
            raise ConfigError(f"act_ratio must be in (0, 1], got {self.act_ratio}")



def default_config(model_type: str | None = None, **overrides) -> WiseConfig:
    return WiseConfig.for_model(model_type, **overrides)

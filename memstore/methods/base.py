"""The editing-method interface: a method fits shards on edits and builds the layer that serves them.

A method is a package under memstore/methods/ that registers itself (see registry.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class MethodConfig:
    """Base of every method's hyperparameters. Subclasses add fields with `help` metadata."""

    # Default edited layer as a fraction of depth, when --layer is not given (measured per method).
    layer_fraction: ClassVar[float] = 0.6
    # Per model family (config.model_type) defaults; margins and scales depend on the model.
    family_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def for_model(cls, model_type: str | None = None, **overrides: Any) -> "MethodConfig":
        """The family's defaults for this model type, then `overrides`."""
        return cls(**{**cls.family_defaults.get(model_type or "", {}), **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> "MethodConfig":
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(changes) - names)
        if bad:
            raise ConfigError(f"unknown hyperparameter(s) {bad}; known: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def hyperparameter(default: Any, help: str) -> Any:
    """A config field with its `--set` help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class ContextConfig(MethodConfig):
    """Hyperparameters of the methods that train an edit in the 11 contexts: the prompt alone and
    behind 10 short prefixes the model generates from these seeds (ALGORITHMS.md §1)."""

    prefix_seeds: tuple[str, ...] = hyperparameter(("I", "You", "Because", "Yes", "Q: "),
                                                   "seeds of the generated context prefixes")
    prefix_lengths: tuple[int, ...] = hyperparameter((5, 10), "lengths in tokens of the generated context prefixes")
    chat_template: bool = hyperparameter(False, "wrap prompts in the tokenizer's chat template (instruct models)")

    def __post_init__(self) -> None:
        self.prefix_seeds = tuple(self.prefix_seeds)  # JSON / YAML give lists
        self.prefix_lengths = tuple(int(n) for n in self.prefix_lengths)


class RoutingState:
    """Per-forward routing context shared by the model hook and the memory layer.

    `positions` (B, T) marks the tokens that decide a row's route (the prompt, not padding);
    during cached generation `held` keeps the prefill decision for every generated token.
    """

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None
        self.prefill: bool = True
        self.held: torch.Tensor | None = None
        self.override: torch.Tensor | None = None  # set by `route_on` for teacher-forced eval

    def reset(self) -> None:
        self.positions, self.prefill, self.held = None, True, None


class MemoryLayer(nn.Module):
    """Wraps the edited projection; never mutates it. `base_layer` is the exact original module."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.routing = RoutingState()
        self.enabled = True

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    @contextlib.contextmanager
    def disable(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    def unflatten(self, x: torch.Tensor) -> torch.Tensor | None:
        """OPT flattens (B, T, d) to (B*T, d) around its MLP: the (B, T, d) view, or None if not flat."""
        if x.dim() != 2:
            return None
        grid = self.routing.override if self.routing.override is not None else self.routing.positions
        if grid is None or grid.numel() != x.shape[0]:
            grid = self.routing.held[:, None] if self.routing.held is not None else None
        if grid is not None and x.shape[0] % grid.shape[0] == 0:
            return x.view(grid.shape[0], -1, x.shape[-1])
        return None

    def route_positions(self, scores: torch.Tensor) -> torch.Tensor:
        """Mask (B, T) of the tokens whose scores decide each row's route."""
        mask = self.routing.override if self.routing.override is not None else self.routing.positions
        if mask is None or mask.shape != scores.shape:
            return torch.ones_like(scores, dtype=torch.bool)
        return mask.to(scores.device, torch.bool)


@dataclass
class ShardPayload:
    """What a method stores for one shard: named tensors plus JSON-able metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


class EditingMethod(Protocol):
    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]

    def make_layer(self, base: nn.Module, payloads: Sequence[ShardPayload]) -> MemoryLayer: ...

"""A merge method is a small frozen object with declared parameters (after mergekit)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParamDef:
    name: str
    required: bool = False
    default: Any = None
    help: str = ""


class MergeMethod(ABC):
    @abstractmethod
    def name(self) -> str: ...

    def reference_url(self) -> str | None:
        return None

    def parameters(self) -> list[ParamDef]:
        """Global parameters of one merge."""
        return []

    def shard_parameters(self) -> list[ParamDef]:
        """Per-shard parameters (e.g. weight, density)."""
        return []

    @abstractmethod
    def merge(self, deltas: Sequence[torch.Tensor], params: dict[str, Any] | None = None,
              shard_params: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        """Merge task vectors tau_i = W'_i - W into one tau."""

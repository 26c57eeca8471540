"""The loop every sequential editor shares: attach a training layer, train the edits one after
another (or in groups of `batch_size`, for a method that trains edits together) into it, report
each edit's stats. MEMOIR, FT-L and GRACE build on it; WISE has its own
(shards, replay, and the plain full-model loop it is timed against)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..edits import Edit
from ..model import EditSite
from .attach import attached
from .base import MemoryLayer
from .wise.method import EditStats


class SequentialEditor:
    model: nn.Module
    site: EditSite
    edits: list[Edit]
    batch_size: int = 1  # edits per `train_edits` call

    def training_layer(self) -> MemoryLayer:
        """The layer attached while training (the one `train_edit` writes into)."""
        raise NotImplementedError

    def train_edit(self, layer: MemoryLayer, edit: Edit) -> EditStats:
        raise NotImplementedError

    def train_edits(self, layer: MemoryLayer, edits: Sequence[Edit]) -> list[EditStats]:
        """Train a group of `batch_size` edits (one at a time unless the method trains them together)."""
        return [self.train_edit(layer, edit) for edit in edits]

    def apply(self, edits: Sequence[Edit], progress: Callable[[int, EditStats], None] | None = None,
              plain: bool = False) -> list[EditStats]:
        if plain:
            raise ValueError("the plain (whole-model) training loop exists for WISE only")
        stats: list[EditStats] = []
        layer = self.training_layer()
        with attached(self.model, self.site, layer):
            for i in range(0, len(edits), self.batch_size):
                for one in self.train_edits(layer, edits[i:i + self.batch_size]):
                    stats.append(one)
                    if progress:
                        progress(len(stats), one)
        return stats

    def all_edits(self) -> list[Edit]:
        return list(self.edits)

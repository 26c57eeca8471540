"""The loop every sequential editor shares: attach a training layer, train the edits one after
another into it, report each edit's stats. MEMOIR, FT-L and GRACE build on it; WISE has its own
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

    def training_layer(self) -> MemoryLayer:
        """The layer attached while training (the one `train_edit` writes into)."""
        raise NotImplementedError

    def train_edit(self, layer: MemoryLayer, edit: Edit) -> EditStats:
        raise NotImplementedError

    def apply(self, edits: Sequence[Edit], progress: Callable[[int, EditStats], None] | None = None,
              plain: bool = False) -> list[EditStats]:
        if plain:
            raise ValueError("the plain (whole-model) training loop exists for WISE only")
        stats: list[EditStats] = []
        layer = self.training_layer()
        with attached(self.model, self.site, layer):
            for edit in edits:
                stats.append(self.train_edit(layer, edit))
                if progress:
                    progress(len(stats), stats[-1])
        return stats

    def all_edits(self) -> list[Edit]:
        return list(self.edits)

"""WISE-Retrieve: several side memories, and each prompt is served by at most one of them.

WISE (arXiv 2405.14768), WISE-Retrieve (Fig. 2 note and the 3K-edit scaling study; ALGORITHMS.md
§1). Knowledge shards are trained exactly as in WISE-Merge (method.py), but instead of one merged
side memory, every `shards_per_memory` shards are merged into a memory of their own
(merge_freq / save_freq). Serving computes every memory's activation score ||tau_j a|| on the
prompt, divides it by that memory's own threshold (act_ratio x min score of its own edits) and
routes the row to the memory with the largest ratio above 1; a row with none gets the bare
output. The decision is made on the prompt and held for generated tokens, as in WiseLayer.

Replay term (the paper's fix for routing precision, 60% -> 88% at 3K edits): while an edit is
trained into memory j, the margin gets a second negative, the prompt of an edit stored in another
memory, so memory j learns to stay quiet on the others' edits (benchmarks/probe_shards.py: right
memory 57% -> 90% of edit prompts at T=30).
Run: `wisemem eval DATA -T 30 --method wise-retrieve --set edits_per_shard=10`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...edits import Edit
from ...prompting import format_prompt, pad_batch, pad_id, prompt_ids
from ..base import MemoryLayer
from .layer import WiseLayer, reduce_scores
from .method import (
    EditStats,
    Shard,
    TrainBatch,
    WiseEditor,
    merge_shards,
    router_threshold,
)


class WiseRetrieveLayer(MemoryLayer):
    """y = W a, plus tau_c a for the one memory c the row is routed to (none: exactly W a)."""

    def __init__(self, base_layer: nn.Module, deltas: torch.Tensor | None = None,
                 thresholds: torch.Tensor | None = None, reduce: str = "mean",
                 basis: torch.Tensor | None = None) -> None:
        super().__init__(base_layer)
        if deltas is not None and (thresholds is None or thresholds.shape != deltas.shape[:1]):
            raise ValueError("WiseRetrieveLayer needs one threshold per memory: thresholds of shape (K,)")
        self.reduce = reduce
        self.register_buffer("basis", basis, persistent=False)  # (d_in, r) background directions, or None
        self.register_buffer("deltas", deltas, persistent=False)  # (K, d_out, d_in) or None
        self.register_buffer("thresholds", thresholds, persistent=False)  # (K,)
        # The runner reports one threshold: the loosest memory's.
        self.threshold = float(thresholds.min()) if thresholds is not None and len(thresholds) else math.inf
        self.last_choice: torch.Tensor | None = None  # (B,) memory each row used in the last forward, -1 none
        self.last_row_scores: torch.Tensor | None = None  # (B, K) the scores that made (or would make) the choice

    @property
    def n_memories(self) -> int:
        return 0 if self.deltas is None else int(self.deltas.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.unflatten(x)
        if flat is not None:
            return self.forward(flat).reshape(x.shape[0], -1)
        base = self.base_layer(x)  # (B, T, d_out)
        if not self.enabled or self.deltas is None:
            return base
        a = x.to(self.deltas.dtype)
        if self.basis is not None:
            a = a - torch.matmul(torch.matmul(a, self.basis), self.basis.t())  # (B, T, d_in)
        K, d_out, d_in = self.deltas.shape
        # All memories in one matmul against the stacked (K * d_out, d_in) deltas; a broadcast
        # batched matmul would copy every delta once per row.
        side = torch.matmul(a, self.deltas.reshape(K * d_out, d_in).t()).unflatten(-1, (K, d_out))  # (B, T, K, d_out)
        choice = self._route(side.norm(dim=-1).transpose(1, 2))  # (B,)
        self.last_choice = choice
        routed = choice >= 0
        if not bool(routed.any()):
            return base
        rows = torch.arange(x.shape[0], device=side.device)
        picked = side[rows, :, choice.clamp_min(0).to(side.device)]  # (B, T, d_out)
        return torch.where(routed.to(base.device)[:, None, None], base + picked.to(base.dtype), base)

    @torch.no_grad()
    def _route(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) memory per row from per-token scores (B, K, T); held from the prefill while generating."""
        positions = self.route_positions(scores[:, 0])  # (B, T)
        row = reduce_scores(scores, positions[:, None], self.reduce)  # (B, K)
        self.last_row_scores = row
        held = self.routing.held
        if not self.routing.prefill and held is not None and held.shape[0] == scores.shape[0]:
            return held.to(scores.device)
        thresholds = self.thresholds.to(row.device, row.dtype)
        above = row > thresholds  # an infinite threshold (a memory with no edits) never fires
        # Normalised by its own threshold: memories trained to different score scales compete fairly.
        ratio = torch.where(above, row / thresholds, torch.full_like(row, -math.inf))
        choice = torch.where(above.any(-1), ratio.argmax(-1), torch.full_like(ratio[:, 0], -1, dtype=torch.long))
        if self.routing.prefill:
            self.routing.held = choice
        return choice


class WiseRetrieveEditor(WiseEditor):
    """WISE training with one side memory per group of `shards_per_memory` shards, plus the replay
    negatives; `layer()` serves the memories by top-1 retrieval."""

    _current: Shard | None = None  # the shard being trained: decides which memory is "own"

    # ---- memories ---------------------------------------------------------------------------
    def memory_of(self, shard: Shard) -> int | None:
        """Memory index of a shard (None if it is not one of ours): groups of `shards_per_memory`
        consecutive shards; a group closes once it holds that many shards and the last is full."""
        index = next((i for i, s in enumerate(self.shards) if s is shard), None)
        return None if index is None else index // self.config.shards_per_memory

    def memories(self) -> list[list[Shard]]:
        k = self.config.shards_per_memory
        return [self.shards[i:i + k] for i in range(0, len(self.shards), k)]

    def edit_owners(self) -> list[int]:
        """Memory index of every edit, in `all_edits()` order."""
        return [m for m, group in enumerate(self.memories()) for s in group for _ in s.edits]

    # ---- training: the replay negatives -----------------------------------------------------
    def _train_into(self, layer: WiseLayer, shard: Shard, edit: Edit, plain: bool) -> EditStats:
        self._current = shard
        try:
            return super()._train_into(layer, shard, edit, plain)
        finally:
            self._current = None

    def other_memory_prompts(self) -> list[str]:
        """Prompts of edits stored in memories other than the one being trained."""
        own = None if self._current is None else self.memory_of(self._current)
        if own is None:
            return []
        return [e.prompt for m, group in enumerate(self.memories()) if m != own for s in group for e in s.edits]

    def _edit_batch(self, edit: Edit, replay: Sequence[Edit]) -> TrainBatch:
        """WISE's rows, plus one negative row from another memory's edit when one exists, so that
        half of the margin's negatives are other memories' edits."""
        tb = super()._edit_batch(edit, replay)
        others = self.other_memory_prompts()
        if not others:
            return tb
        return self._with_negative(tb, self._rng.choice(others))

    def _with_negative(self, tb: TrainBatch, prompt: str) -> TrainBatch:
        batch, cfg = tb.batch, self.config
        seqs = [batch.input_ids[r, :n].tolist() for r, n in enumerate(batch.lengths)]
        q = prompt_ids(self.tokenizer, prompt, cfg.chat_template)
        grown = pad_batch(seqs + [q], batch.prompt_lens + [len(q)], pad_id(self.tokenizer), self.device)
        span_mask = torch.zeros(grown.input_ids.shape, dtype=tb.span_mask.dtype, device=self.device)
        span_mask[:-1, :tb.span_mask.shape[1]] = tb.span_mask
        span_mask[-1, :len(q)] = 1.0
        return TrainBatch(grown, span_mask, tb.n_ctx, tb.n_replay)

    def _objective(self, tb: TrainBatch, row_ce: torch.Tensor, row_score: torch.Tensor):
        """WISE's objective with every row after the replayed edits a negative (equal to WISE's
        for a single negative): hinge terms averaged over negatives and (edit, negative) pairs."""
        cfg, n = self.config, tb.n_ctx
        edit_loss = row_ce[:n].mean()
        replay_loss = row_ce[n:n + tb.n_replay].mean() if tb.n_replay else row_ce.new_zeros(())
        d_e, d_i = row_score[:n], row_score[n + tb.n_replay:]  # (n,), (m,)
        act = (F.relu(d_i - cfg.alpha).mean() + F.relu(cfg.beta - d_e).mean()
               + F.relu(d_i[None, :] - d_e[:, None] + cfg.gamma).mean())
        return edit_loss, replay_loss, act

    # ---- serving ----------------------------------------------------------------------------
    def memory_deltas(self) -> list[torch.Tensor]:
        return [merge_shards([s.tau for s in group], self.config) for group in self.memories()]

    def memory_threshold(self, delta: torch.Tensor, edits: Sequence[Edit]) -> float:
        """act_ratio x the lowest score of this memory's own edit prompts (inf with no edits)."""
        cfg = self.config
        prompts = [format_prompt(self.tokenizer, e.prompt, cfg.chat_template) for e in edits]
        return router_threshold(self.model, self.tokenizer, self.site, delta, prompts, cfg.act_ratio,
                                cfg.router_reduce, self.basis)

    def layer(self) -> WiseRetrieveLayer:  # type: ignore[override]
        base = self.site.module(self.model)
        groups = self.memories()
        if not groups:
            return WiseRetrieveLayer(base, None, None, self.config.router_reduce, self.basis)
        deltas = self.memory_deltas()
        thresholds = [self.memory_threshold(d, [e for s in g for e in s.edits]) for d, g in zip(deltas, groups)]
        return WiseRetrieveLayer(base, torch.stack(deltas), torch.tensor(thresholds, device=deltas[0].device),
                                 self.config.router_reduce, self.basis)

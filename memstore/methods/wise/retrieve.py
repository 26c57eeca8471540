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
Pre-filter (DESIGN.md principle 6): with a `KeyIndex` of the stored edits' routing keys, a row
scores only the memories of the `candidates` stored keys nearest its own key (mean of its prompt's
inputs, background removed) and the exact score check decides among those; no index, or
candidates 0, scores every memory. One candidate is the default: on the embedded model the
nearest key names the edit's memory far more often than the scores do (docs/BENCHMARKS.md).
A held row (a generated token) scores nothing: it computes only the memory it was routed to.
Run: `wisemem eval DATA -T 30 --method wise-retrieve --set edits_per_shard=10`; a store:
`wisemem init --method wise-retrieve` (memstore/retrieve_memory.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from ...edits import Edit
from ...index import KeyIndex, key_ids
from ...model import EditSite
from ...prompting import format_prompt, pad_batch, pad_id, prompt_ids
from ..base import MemoryLayer
from .config import WiseConfig
from .layer import WiseLayer, reduce_scores
from .method import (
    EditStats,
    Shard,
    TrainBatch,
    WiseEditor,
    merge_shards,
    routing_inputs,
    scores_of,
    threshold_of,
)


class WiseRetrieveLayer(MemoryLayer):
    """y = W a, plus tau_c a for the one memory c the row is routed to (none: exactly W a)."""

    def __init__(self, base_layer: nn.Module, deltas: torch.Tensor | None = None,
                 thresholds: torch.Tensor | None = None, reduce: str = "mean",
                 basis: torch.Tensor | None = None, index: KeyIndex | None = None, candidates: int = 0) -> None:
        super().__init__(base_layer)
        if deltas is not None and (thresholds is None or thresholds.shape != deltas.shape[:1]):
            raise ValueError("WiseRetrieveLayer needs one threshold per memory: thresholds of shape (K,)")
        self.reduce = reduce
        self.register_buffer("basis", basis, persistent=False)  # (d_in, r) background directions, or None
        self.register_buffer("deltas", deltas, persistent=False)  # (K, d_out, d_in) or None
        self.register_buffer("thresholds", thresholds, persistent=False)  # (K,)
        self.index, self.candidates = index, candidates  # pre-filter: memories of the `candidates` nearest keys
        # The runner reports one threshold: the loosest memory's.
        self.threshold = float(thresholds.min()) if thresholds is not None and len(thresholds) else math.inf
        self.last_choice: torch.Tensor | None = None  # (B,) memory each row used in the last forward, -1 none
        self.last_row_scores: torch.Tensor | None = None  # (B, K) scores that made the choice (0: not scored)
        self.last_candidates: torch.Tensor | None = None  # (B, K) memories the pre-filter let the router score

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
        a = self._read(x)
        held = self.routing.held
        route = None
        if not self.routing.prefill and held is not None and held.shape[0] == x.shape[0]:
            choice = held.to(a.device)  # a generated token keeps its row's memory: nothing to score
        else:
            route = self._route(a)
            choice = route.choice
        self.last_choice = choice
        out = base
        for j in choice[choice >= 0].unique().tolist():  # each memory once, on the rows routed to it
            rows = (choice == j).nonzero().squeeze(1)
            # Scoring already computed tau_j a for the prompt: reuse it; a held step computes it here.
            side = route.side(j)[rows] if route is not None else torch.matmul(a[rows], self.deltas[j].t())
            out = out.index_add(0, rows.to(base.device), side.to(base.dtype))
        return out

    def _read(self, x: torch.Tensor) -> torch.Tensor:
        """What the memories read: the input with its background directions removed."""
        a = x.to(self.deltas.dtype)
        if self.basis is not None:
            a = a - torch.matmul(torch.matmul(a, self.basis), self.basis.t())  # (B, T, d_in)
        return a

    def row_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K) activation score of each row of input x (B, T, d_in) under every memory, reduced
        over the row's routing positions (what the router compares with the thresholds)."""
        return self._row_scores(self._sides(self._read(x), torch.arange(self.n_memories)))

    def _sides(self, a: torch.Tensor, memories: torch.Tensor) -> torch.Tensor:
        """(B, T, M, d_out): tau_j a for the given memories on `a`, the input as the memories read it."""
        K, d_out, d_in = self.deltas.shape
        if len(memories) == K:  # every memory: one matmul against the stacked (K * d_out, d_in) deltas
            return torch.matmul(a, self.deltas.reshape(K * d_out, d_in).t()).unflatten(-1, (K, d_out))
        if not len(memories):
            return a.new_zeros(*a.shape[:2], 0, d_out)
        # a few candidates: one matmul each, rather than copying their deltas out of the stack
        return torch.stack([torch.matmul(a, self.deltas[j].t()) for j in memories.tolist()], 2)

    def _row_scores(self, sides: torch.Tensor) -> torch.Tensor:
        """(B, M) row scores from per-memory outputs (B, T, M, d_out)."""
        scores = sides.norm(dim=-1).transpose(1, 2)  # (B, M, T)
        return reduce_scores(scores, self.route_positions(scores[:, 0])[:, None], self.reduce)

    def candidate_mask(self, a: torch.Tensor) -> torch.Tensor:
        """(B, K) memories each row may be routed to: those of its `candidates` nearest stored keys
        (the row's key: mean of `a` over its routing positions), or every memory without a pre-filter."""
        B, K = a.shape[0], self.n_memories
        if self.index is None or self.candidates <= 0:
            return torch.ones(B, K, dtype=torch.bool, device=a.device)
        positions = self.route_positions(a[..., 0]).to(a.dtype)  # (B, T)
        keys = (a * positions[..., None]).sum(1) / positions.sum(1, keepdim=True).clamp_min(1)  # (B, d_in)
        near = self.index.search(keys, self.candidates)  # (B, c) memory ids, -1 past the end
        mask = torch.zeros(B, K + 1, dtype=torch.bool)
        mask[torch.arange(B)[:, None], torch.where(near < 0, K, near)] = True  # column K collects the -1s
        return mask[:, :K].to(a.device)

    @torch.no_grad()
    def _route(self, a: torch.Tensor) -> Route:
        """The prompt's route (memory per row, -1: none); held for the generated tokens."""
        route = self.decide(a)
        self.last_candidates, self.last_row_scores = route.candidates, route.scores
        if self.routing.prefill:
            self.routing.held = route.choice
        return route

    @torch.no_grad()
    def decide(self, a: torch.Tensor, prefilter: bool = True) -> Route:
        """The route of rows `a` (as the memories read them); `prefilter=False` scores every memory
        (the exhaustive scan)."""
        allowed = self.candidate_mask(a) if prefilter else torch.ones(a.shape[0], self.n_memories, dtype=torch.bool,
                                                                       device=a.device)
        scored = allowed.any(0).nonzero().squeeze(1)  # the memories any row of the batch may use
        sides = self._sides(a, scored)
        row = a.new_zeros(a.shape[0], self.n_memories)
        if len(scored):
            row[:, scored] = self._row_scores(sides)
        thresholds = self.thresholds.to(row.device, row.dtype)
        above = (row > thresholds) & allowed  # an infinite threshold (a memory with no edits) never fires
        # Normalised by its own threshold: memories trained to different score scales compete fairly.
        ratio = torch.where(above, row / thresholds, torch.full_like(row, -math.inf))
        choice = torch.where(above.any(-1), ratio.argmax(-1), torch.full_like(ratio[:, 0], -1, dtype=torch.long))
        return Route(choice, allowed, row, scored, sides)


@dataclass
class Route:
    choice: torch.Tensor  # (B,) memory per row, -1: none
    candidates: torch.Tensor  # (B, K) memories each row was allowed (the pre-filter's pick)
    scores: torch.Tensor  # (B, K) row scores, 0 where not scored
    scored: torch.Tensor  # (M,) the memories scored, in `sides` order
    sides: torch.Tensor  # (B, T, M, d_out) tau_j a of each scored memory

    def side(self, memory: int) -> torch.Tensor:
        """(B, T, d_out) the output of one scored memory (a chosen memory always is)."""
        return self.sides[:, :, int((self.scored == memory).nonzero()[0, 0])]


@dataclass
class PrefilterRecall:
    queries: int
    routed: int  # queries the exhaustive scan routes to a memory
    hits: int  # of those, queries whose memory is among the pre-filter's candidates
    recall: float  # hits / routed (1.0 when nothing is routed)


@torch.no_grad()
def prefilter_recall(model: nn.Module, tokenizer, site: EditSite, layer: WiseRetrieveLayer, prompts: Sequence[str],
                     chat_template: bool = False) -> PrefilterRecall:
    """How often the key index keeps the right memory: the fraction of prompts whose exhaustive top-1
    memory is among the candidates `layer` pre-selects (equal to how often the pre-filtered route
    equals the exhaustive one, since the exact check decides among candidates). `layer` is not mounted."""
    layer.routing.reset()  # no mount: every token of a prompt decides its route
    routed = hits = 0
    texts = [format_prompt(tokenizer, p, chat_template) for p in prompts]
    for acts in routing_inputs(model, tokenizer, site, texts, layer.basis):  # (T, d_in), prompt tokens only
        a = acts[None].to(layer.deltas.device, layer.deltas.dtype)
        exact = int(layer.decide(a, prefilter=False).choice[0])
        if exact >= 0:
            routed += 1
            hits += bool(layer.candidate_mask(a)[0, exact])
    return PrefilterRecall(len(texts), routed, hits, hits / routed if routed else 1.0)


def memory_groups(closed: Sequence[bool], full: Sequence[bool], per_memory: int) -> list[list[int]]:
    """Which shards (indices, in order) make up each memory. A merged (closed) shard is a memory
    alone; consecutive full trained shards form groups of `per_memory`, the last group possibly
    still filling (ending with the open shard); a trained shard that is neither full nor last (a
    revert emptied it partly) is a memory alone, and so is each full shard of a group it cut short."""
    groups: list[list[int]] = []
    run: list[int] = []
    for i, (is_closed, is_full) in enumerate(zip(closed, full)):
        if is_closed or (not is_full and i < len(closed) - 1):
            groups += [[j] for j in run] + [[i]]
            run = []
            continue
        run.append(i)
        if len(run) == per_memory:
            groups.append(run)
            run = []
    return groups + ([run] if run else [])


class WiseRetrieveEditor(WiseEditor):
    """WISE training with one side memory per group of `shards_per_memory` shards, plus the replay
    negatives; `layer()` serves the memories by top-1 retrieval."""

    _current: Shard | None = None  # the shard being trained: decides which memory is "own"
    # Prompts of edits in memories this editor does not hold: negatives too (a store's revert
    # rebuilds one memory while the others stay as they are).
    outside_prompts: Sequence[str] = ()

    # ---- memories ---------------------------------------------------------------------------
    def memories(self) -> list[list[Shard]]:
        cap = self.config.edits_per_shard
        groups = memory_groups([s.closed for s in self.shards], [len(s.edits) >= cap for s in self.shards],
                               self.config.shards_per_memory)
        return [[self.shards[i] for i in g] for g in groups]

    def memory_of(self, shard: Shard) -> int | None:
        """Memory index of a shard (None if it is not one of ours)."""
        return next((m for m, group in enumerate(self.memories()) if any(s is shard for s in group)), None)

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
        if self._current is None:
            return []
        own = self.memory_of(self._current)
        inside = [e.prompt for m, group in enumerate(self.memories()) if m != own for s in group for e in s.edits]
        return [*self.outside_prompts, *inside]

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

    def layer(self) -> WiseRetrieveLayer:  # type: ignore[override]
        """The memories, served; with `prefilter_candidates` > 0, behind a key index of every edit."""
        base, cfg = self.site.module(self.model), self.config
        groups = self.memories()
        if not groups:
            return WiseRetrieveLayer(base, None, None, cfg.router_reduce, self.basis)
        deltas = self.memory_deltas()
        sizes = [sum(len(s.edits) for s in g) for g in groups]
        prompts = [format_prompt(self.tokenizer, e.prompt, cfg.chat_template) for g in groups for s in g for e in s.edits]
        # One pass of the lower model over the edit prompts gives every threshold and every key.
        reads = list(routing_inputs(self.model, self.tokenizer, self.site, prompts, self.basis))
        routing = [memory_routing(reads[end - n:end], delta, cfg) for delta, n, end in zip(deltas, sizes, accumulate(sizes))]
        thresholds = [threshold for _, threshold in routing]
        index = None
        if cfg.prefilter_candidates:
            index = KeyIndex.build(torch.stack([k for keys, _ in routing for k in keys]), key_ids(sizes))
        return WiseRetrieveLayer(base, torch.stack(deltas), torch.tensor(thresholds, device=deltas[0].device),
                                 cfg.router_reduce, self.basis, index, cfg.prefilter_candidates)


def memory_routing(reads: Sequence[torch.Tensor], delta: torch.Tensor, config: WiseConfig
                   ) -> tuple[list[torch.Tensor], float]:
    """A memory's routing from its edits' `routing_inputs`: each edit's key (the mean over its prompt,
    what the key index searches and a store's signature keeps) and the memory's threshold."""
    return [a.mean(0) for a in reads], threshold_of(scores_of(reads, delta, config.router_reduce), config.act_ratio)

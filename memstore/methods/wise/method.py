"""WISE editing: train knowledge shards of a side memory, merge them, set the router threshold.

WISE (arXiv 2405.14768) §3. For each edit the side memory's current shard tau (restricted to
its random mask M_i, rho = mask_ratio) is trained with
    L = L_edit + [D(x_i) - alpha]+ + [beta - D(x_e)]+ + [D(x_i) - D(x_e) + gamma]+
where L_edit is the target cross-entropy over the prompt in 11 contexts and D is the
activation score. Our additions, each measured in docs/BENCHMARKS.md: a few earlier edits of
the open shard are replayed in every step (without it, sequential edits overwrite each other:
Rel 0.77 -> 1.00 at T=10), Adam instead of SGD, and a background subspace (layer.py).
Speed: only the stack above the edited layer runs per step (upper.py); the LM head runs on
target positions only; contexts, replayed edits and the irrelevant prompt form one batch;
training stops early once the losses are met. Run: `wisemem eval DATA -T 100`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ...edits import Edit
from ...merge import merge_with_spec
from ...model import EditSite, weight_matrix
from ...prompting import Batch, format_prompt, pad_batch, pad_id, prompt_ids, target_ids
from ..attach import attached
from ..upper import UpperStack, module_inputs
from .config import WiseConfig
from .layer import WiseLayer, reduce_scores


def shard_mask(shape: torch.Size, ratio: float, seed: int) -> torch.Tensor:
    """The random parameter subspace of one knowledge shard; reproducible from its seed."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < ratio


@torch.no_grad()
def generate_prefixes(model: nn.Module, tokenizer, seeds: Sequence[str], lengths: Sequence[int]) -> list[str]:
    """Short model-written continuations used as context prefixes ("" plus these: 11 contexts).

    Sampled (top-k 5, fixed seeds) rather than greedy: greedy continuations of one word
    degenerate into repetition on small models ("I-1000.00"); the seeds keep it deterministic."""
    device = next(model.parameters()).device
    out = []
    for i, seed_text in enumerate(seeds):
        ids = tokenizer(seed_text, return_tensors="pt").to(device)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            torch.manual_seed(1234 + i)
            gen = model.generate(**ids, max_new_tokens=max(lengths), do_sample=True, top_k=5,
                                 pad_token_id=pad_id(tokenizer))
        new = gen[0, ids.input_ids.shape[1]:]
        for n in lengths:
            text = tokenizer.decode(torch.cat([ids.input_ids[0], new[:n]]), skip_special_tokens=True)
            out.append(" ".join(text.split()))
    return out


@dataclass
class EditStats:
    steps: int
    loss: float
    edit_loss: float
    seconds: float


@dataclass
class TrainBatch:
    batch: Batch
    span_mask: torch.Tensor  # (B, T) tokens whose activation scores count for the margins
    n_ctx: int
    n_replay: int


@dataclass
class Shard:
    seed: int | None  # mask seed; None for a merged shard
    tau: torch.Tensor  # (d_out, d_in), zero outside its mask
    edits: list[Edit] = field(default_factory=list)
    closed: bool = False  # a merged shard takes no further edits
    object_id: str | None = None  # the stored object it was loaded from, until trained further


class WiseEditor:
    """Sequential WISE editing on one model. Holds the shards; builds the side memory."""

    def __init__(self, model: nn.Module, tokenizer, site: EditSite, config: WiseConfig,
                 irrelevant: Sequence[str], prefixes: Sequence[str] | None = None,
                 basis: torch.Tensor | None | str = "compute") -> None:
        if not irrelevant:
            raise ValueError("WISE needs at least one irrelevant prompt for the router margin")
        self.model, self.tokenizer, self.site, self.config = model, tokenizer, site, config
        self.irrelevant = list(irrelevant)
        self.prefixes = list(prefixes) if prefixes is not None else generate_prefixes(
            model, tokenizer, config.prefix_seeds, config.prefix_lengths)
        self.upper = UpperStack(model, site)
        self.device = next(model.parameters()).device
        base = site.module(model)
        self.shape = weight_matrix(base).shape
        self.shards: list[Shard] = []
        if isinstance(basis, str):
            basis = background_basis(model, tokenizer, site, self.irrelevant[:256], config.background_rank,
                                     config.chat_template)
        self.basis = basis
        self._rng = random.Random(config.seed)
        self.spent_seeds: set[int] = set()  # mask seeds of shards merged away (still in use inside merged shards)
        self._mask: torch.Tensor | None = None
        self._mask_seed: int | None = None

    # ---- training -------------------------------------------------------------------------
    def _edit_batch(self, edit: Edit, replay: Sequence[Edit]) -> "TrainBatch":
        """Rows: the edit in 11 contexts, `replay` earlier edits of the shard, one irrelevant prompt."""
        cfg, tok = self.config, self.tokenizer
        tgt = target_ids(tok, edit.target_new, cfg.chat_template)
        seqs, plens, spans = [], [], []
        for prefix in [""] + self.prefixes:
            text = f"{prefix} {edit.prompt}" if prefix else edit.prompt
            p = prompt_ids(tok, text, cfg.chat_template)
            # Score only the prompt's own tokens, not the prefix: routing sees bare prompts.
            start = len(prompt_ids(tok, prefix, cfg.chat_template)) - (1 if cfg.chat_template else 0) if prefix else 0
            start = min(max(start, 0), len(p) - 1)
            seqs.append(p + tgt)
            plens.append(len(p))
            spans.append((start, len(p)))
        for old in replay:
            p = prompt_ids(tok, old.prompt, cfg.chat_template)
            seqs.append(p + target_ids(tok, old.target_new, cfg.chat_template))
            plens.append(len(p))
            spans.append((0, len(p)))
        irrelevant = edit.loc_prompt or self._rng.choice(self.irrelevant)
        q = prompt_ids(tok, irrelevant, cfg.chat_template)
        seqs.append(q)
        plens.append(len(q))
        spans.append((0, len(q)))
        batch = pad_batch(seqs, plens, pad_id(tok), self.device)
        span_mask = torch.zeros(batch.input_ids.shape, dtype=torch.float32, device=self.device)
        for r, (a, b) in enumerate(spans):
            span_mask[r, a:b] = 1.0
        return TrainBatch(batch, span_mask, 1 + len(self.prefixes), len(replay))

    def _objective(self, tb: "TrainBatch", row_ce: torch.Tensor, row_score: torch.Tensor):
        """(edit loss, replay loss, margin loss) from per-row CE (rows with targets) and scores."""
        cfg, n = self.config, tb.n_ctx
        edit_loss = row_ce[:n].mean()
        replay_loss = row_ce[n:n + tb.n_replay].mean() if tb.n_replay else row_ce.new_zeros(())
        d_e, d_i = row_score[:n], row_score[-1]
        act = (F.relu(d_i - cfg.alpha) + F.relu(cfg.beta - d_e) + F.relu(d_i - d_e + cfg.gamma)).mean()
        return edit_loss, replay_loss, act

    def _fast_step(self, layer: WiseLayer, tb: "TrainBatch", captured, targets):
        rows, cols, labels = targets
        logits = self.upper.logits_at(captured, rows, cols)  # (P, V): target positions only
        token_ce = F.cross_entropy(logits, labels, reduction="none")
        n_rows = tb.n_ctx + tb.n_replay
        per_row = logits.new_zeros(n_rows).index_add(0, rows, token_ce)
        counts = logits.new_zeros(n_rows).index_add(0, rows, torch.ones_like(token_ce))
        row_score = reduce_scores(layer.last_scores, tb.span_mask, self.config.router_reduce)
        return self._objective(tb, per_row / counts.clamp_min(1), row_score)

    def _plain_step(self, layer: WiseLayer, tb: "TrainBatch"):
        """The whole model, one row at a time, full logits: what a straightforward loop does."""
        batch, ces, scores = tb.batch, [], []
        for r in range(batch.input_ids.shape[0]):
            n, p = batch.lengths[r], batch.prompt_lens[r]
            ids = batch.input_ids[r:r + 1, :n]
            layer.routing.positions = torch.ones_like(ids, dtype=torch.bool)
            logits = self.model(input_ids=ids, use_cache=False).logits
            scores.append(reduce_scores(layer.last_scores, tb.span_mask[r:r + 1, :n], self.config.router_reduce)[0])
            if p < n:
                ces.append(F.cross_entropy(logits[0, p - 1:n - 1], ids[0, p:n]))
        return self._objective(tb, torch.stack(ces), torch.stack(scores))

    def train_edit(self, layer: WiseLayer, param: nn.Parameter, edit: Edit, replay: Sequence[Edit] = (),
                   plain: bool = False) -> EditStats:
        """Optimise the shard parameter on one edit. `plain` runs the whole model, one row at a
        time, every step, without early stop: the baseline the speed benchmark compares with."""
        cfg = self.config
        start = time.perf_counter()
        tb = self._edit_batch(edit, replay)
        rows, cols, labels, _ = tb.batch.target_positions()
        targets = tuple(t.to(self.device) for t in (rows, cols, labels))
        if cfg.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam([param], lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.SGD([param], lr=cfg.lr, weight_decay=cfg.weight_decay)
        layer.routing.positions = tb.batch.attention_mask.bool()  # also the token grid for OPT's flat MLP input
        captured = None if plain else self.upper.capture(tb.batch.input_ids, tb.batch.attention_mask)
        loss_v, edit_v, step = math.inf, math.inf, 0
        for step in range(1, cfg.max_steps + 1):
            opt.zero_grad(set_to_none=True)
            if plain:
                edit_loss, replay_loss, act = self._plain_step(layer, tb)
            else:
                edit_loss, replay_loss, act = self._fast_step(layer, tb, captured, targets)
            loss = edit_loss + replay_loss + act
            loss_v, edit_v = float(loss.detach()), float(edit_loss.detach())
            done = max(edit_v, float(replay_loss.detach())) <= cfg.stop_loss and float(act.detach()) <= cfg.stop_margin
            if done and not plain:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                param.clamp_(-cfg.max_update, cfg.max_update)
        return EditStats(step, loss_v, edit_v, time.perf_counter() - start)

    def apply(self, edits: Sequence[Edit], progress: Callable[[int, EditStats], None] | None = None,
              plain: bool = False) -> list[EditStats]:
        """Apply edits sequentially: each goes into the open shard (a new one when full)."""
        stats: list[EditStats] = []
        with self._training_layer() as layer:
            for edit in edits:
                stats.append(self._train_into(layer, self._open_shard(), edit, plain))
                if progress:
                    progress(len(stats), stats[-1])
        return stats

    def train_shard(self, shard: Shard, edits: Sequence[Edit]) -> list[EditStats]:
        """Train `edits` into `shard` (whatever its fill): how a revert rebuilds a shard."""
        with self._training_layer() as layer:
            return [self._train_into(layer, shard, edit, False) for edit in edits]

    @contextmanager
    def _training_layer(self) -> Iterator[WiseLayer]:
        layer = WiseLayer(self.site.module(self.model), reduce=self.config.router_reduce, basis=self.basis)
        with attached(self.model, self.site, layer):
            yield layer

    def _open_shard(self) -> Shard:
        last = self.shards[-1] if self.shards else None
        if last is None or last.closed or len(last.edits) >= self.config.edits_per_shard:
            # Seeds never repeat within a memory, even after a revert dropped a shard.
            base = self.config.seed * 1_000_003
            used = [s.seed - base for s in self.shards if not s.closed] + [s - base for s in self.spent_seeds]
            self.shards.append(Shard(base + (max(used) + 1 if used else 0), torch.zeros(self.shape, device=self.device)))
        return self.shards[-1]

    def _train_into(self, layer: WiseLayer, shard: Shard, edit: Edit, plain: bool) -> EditStats:
        if self._mask_seed != shard.seed:  # the mask is a function of the seed: draw it once per shard
            self._mask = shard_mask(self.shape, self.config.mask_ratio, shard.seed).to(self.device)
            self._mask_seed = shard.seed
        shard.tau = shard.tau.to(self.device)
        param = layer.start_training(shard.tau, self._mask)
        replay = self._rng.sample(shard.edits, min(self.config.replay, len(shard.edits)))
        stats = self.train_edit(layer, param, edit, replay, plain=plain)
        shard.tau = layer.stop_training()
        shard.edits.append(edit)
        shard.object_id = None
        return stats

    # ---- the side memory ------------------------------------------------------------------
    def side_memory(self) -> torch.Tensor | None:
        return merge_shards([s.tau for s in self.shards], self.config)

    def all_edits(self) -> list[Edit]:
        return [e for s in self.shards for e in s.edits]

    def threshold(self, delta: torch.Tensor) -> float:
        prompts = [format_prompt(self.tokenizer, e.prompt, self.config.chat_template) for e in self.all_edits()]
        return router_threshold(self.model, self.tokenizer, self.site, delta, prompts, self.config.act_ratio,
                                self.config.router_reduce, self.basis)

    def layer(self) -> WiseLayer:
        """A serving layer with the merged side memory and its router threshold."""
        delta = self.side_memory()
        threshold = self.threshold(delta) if delta is not None else math.inf
        return WiseLayer(self.site.module(self.model), delta, threshold, self.config.router_reduce, self.basis)


def merge_spec(config: WiseConfig, n: int) -> dict:
    """How `n` shards merge into one side memory under `config` (recorded in merged shards' headers)."""
    return {"method": config.merge_method, "params": {"seed": config.seed},
            "shard_params": [{"density": config.merge_density} for _ in range(n)]}


def merge_shards(taus: Sequence[torch.Tensor], config: WiseConfig) -> torch.Tensor | None:
    return merge_with_spec(taus, merge_spec(config, len(taus))) if taus else None


@torch.no_grad()
def routing_inputs(model: nn.Module, tokenizer, site: EditSite, texts: Sequence[str],
                   basis: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """Per (formatted) prompt, the edited layer's input on its tokens (T, d_in) as the side memories
    read it: float, background directions removed. Routing keys, scores and thresholds all start here."""
    for acts in module_inputs(model, tokenizer, site, texts):
        acts = acts.float()
        yield acts - (acts @ basis) @ basis.t() if basis is not None else acts


def scores_of(reads: Iterable[torch.Tensor], delta: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Activation score ||delta a|| of each prompt's `routing_inputs`, reduced over its tokens."""
    out = []
    for acts in reads:
        scores = torch.matmul(acts.to(delta.dtype), delta.t()).norm(dim=-1)  # (T,)
        out.append(scores.max() if reduce == "max" else scores.mean())
    return torch.stack(out) if out else torch.zeros(0)


def activation_scores(model: nn.Module, tokenizer, site: EditSite, delta: torch.Tensor,
                      prompts: Sequence[str], reduce: str = "mean", basis: torch.Tensor | None = None) -> torch.Tensor:
    """Activation score of each (already formatted) prompt under side memory `delta`."""
    return scores_of(routing_inputs(model, tokenizer, site, prompts, basis), delta, reduce)


def threshold_of(scores: torch.Tensor, act_ratio: float) -> float:
    """Router threshold: act_ratio x the lowest score of a memory's own edits (inf with none)."""
    return float(scores.min()) * act_ratio if len(scores) else math.inf


def router_threshold(model, tokenizer, site, delta, prompts, act_ratio: float, reduce: str = "mean",
                     basis: torch.Tensor | None = None) -> float:
    return threshold_of(activation_scores(model, tokenizer, site, delta, prompts, reduce, basis), act_ratio)


@torch.no_grad()
def background_basis(model, tokenizer, site: EditSite, prompts: Sequence[str], rank: int,
                     chat_template: bool = False) -> torch.Tensor | None:
    """Top-`rank` eigenvectors (d_in, rank) of the uncentred second moment of the edited
    module's input over background prompts' tokens; None when rank is 0."""
    if rank <= 0 or not prompts:
        return None
    texts = [format_prompt(tokenizer, p, chat_template) for p in prompts]
    acts = torch.cat([a.float() for a in module_inputs(model, tokenizer, site, texts)])  # (N, d_in)
    second = acts.t() @ acts / acts.shape[0]
    _, vectors = torch.linalg.eigh(second.double())
    rank = min(rank, vectors.shape[1])
    return vectors[:, -rank:].flip(1).float().contiguous()

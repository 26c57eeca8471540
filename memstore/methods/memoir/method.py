"""MEMOIR editing: train each edit into the residual memory's columns picked by its TopHash mask.

MEMOIR (arXiv 2506.07899), ALGORITHMS.md §2. Per edit: the mask m_e comes from the bare prompt's
mean input to the edited projection (minus the background mean), top-k by magnitude, through a
fixed permutation; then only W_m[:, m_e] is trained on the target cross-entropy over the prompt
in 11 contexts (SGD, lr 1.0, grad-norm clip 1.0, up to 30 steps, early stop). No locality loss:
the router keeps the memory off unrelated prompts. The permutation, the background mean and every
edit's mask are state: without them the memory cannot be served. Speed as WISE: only the stack
above the edited layer runs per step (upper.py), the contexts form one batch, the LM head runs
on target positions only. `edit_batch_size` > 1 trains that many consecutive edits in one
optimisation, each row through its own edit's mask (one batch of B small rows costs about what
one row does on a CPU): our addition for T in the thousands, off by default. So is `precondition`:
each step is multiplied by lambda (C + lambda I)^-1, C the sum of earlier edits' key outer products
(what the memory reads of their prompts), so that new edits write where earlier ones do not read;
an editor continuing a stored memory rebuilds C from its edits' prompts (one forward pass each).
Run: `wisemem eval DATA -T 100 --method memoir`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...edits import Edit
from ...index import MaskIndex
from ...model import EditSite, weight_matrix
from ...prompting import format_prompt, pad_batch, pad_id, prompt_ids, target_ids
from ..sequential import SequentialEditor
from ..upper import UpperStack, module_inputs
from ..wise.method import EditStats, generate_prefixes
from .config import MemoirConfig
from .layer import MemoirLayer, memory_input, tophash


@dataclass
class MemoirState:
    """Everything that defines a MEMOIR memory (what a commit stores)."""

    memory: torch.Tensor  # (d_out, d_in) W_m
    masks: torch.Tensor  # (N, d_in) bool, one per edit, in edit order
    permutation: torch.Tensor  # (d_in,) long
    background: torch.Tensor  # (d_in,)


@torch.no_grad()
def mean_features(model, tokenizer, site: EditSite, prompts: Sequence[str], chat_template: bool = False) -> torch.Tensor:
    """(N, d_in): each prompt's mean input to the edited projection over its tokens."""
    texts = [format_prompt(tokenizer, p, chat_template) for p in prompts]
    return torch.stack([a.float().mean(0) for a in module_inputs(model, tokenizer, site, texts)])


class MemoirEditor(SequentialEditor):
    """Sequential MEMOIR editing on one model; `layer()` serves the memory."""

    def __init__(self, model: nn.Module, tokenizer, site: EditSite, config: MemoirConfig,
                 irrelevant: Sequence[str], prefixes: Sequence[str] | None = None,
                 state: MemoirState | None = None) -> None:
        self.model, self.tokenizer, self.site, self.config = model, tokenizer, site, config
        self.prefixes = list(prefixes) if prefixes is not None else generate_prefixes(
            model, tokenizer, config.prefix_seeds, config.prefix_lengths)
        self.upper = UpperStack(model, site)
        self.device = next(model.parameters()).device
        d_out, d_in = weight_matrix(site.module(model)).shape
        self.k = max(1, round(config.top_k_ratio * d_in))
        if state is None:
            if not irrelevant:
                raise ValueError("MEMOIR needs irrelevant prompts for its background mean")
            gen = torch.Generator().manual_seed(config.seed)
            background = mean_features(model, tokenizer, site, list(irrelevant)[:config.background_size],
                                       config.chat_template).mean(0)
            state = MemoirState(torch.zeros(d_out, d_in), torch.zeros(0, d_in, dtype=torch.bool),
                                torch.randperm(d_in, generator=gen), background)
        self.state = state
        self.edits: list[Edit] = []
        # precondition's C: the sum of k k^T over self.edits[:key_cov_edits] (kept as edits are trained)
        self.key_cov: torch.Tensor | None = None
        self.key_cov_edits = 0
        self.loaded_from: str | None = None  # the stored memory object `state` came from, if any

    def edit_masks(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._masks_and_keys(prompts)[0]

    def _masks_and_keys(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """TopHash masks (B, d_in) and keys (B, d_in): what the memory reads of each prompt's mean input."""
        feats = mean_features(self.model, self.tokenizer, self.site, prompts, self.config.chat_template)
        masks = tophash(feats - self.state.background, self.k, self.state.permutation)
        return masks, memory_input(feats, self.state.background, self.config.center) * masks

    def _preconditioner(self, cols: torch.Tensor) -> torch.Tensor | None:
        """lambda (C + lambda I)^-1 on `cols`: 1 where no earlier key reaches, small where many do."""
        if not self.config.precondition or not self.edits:
            return None
        if self.key_cov_edits != len(self.edits):  # e.g. an editor continuing a stored memory
            keys = self._masks_and_keys([e.prompt for e in self.edits])[1]
            self.key_cov, self.key_cov_edits = keys.t() @ keys, len(self.edits)
        cols = cols.cpu()
        c = self.key_cov[cols][:, cols].double()
        lam = self.config.precondition * float(self.key_cov.diagonal().mean())
        eye = torch.eye(len(cols), dtype=c.dtype)
        return (lam * torch.linalg.inv(c + lam * eye)).float().to(self.device)

    def _edit_batch(self, edits: Sequence[Edit], protected: Sequence[Edit] = ()):
        """Rows: each edit in the 11 contexts (edit after edit), then each protected earlier edit once."""
        cfg, tok = self.config, self.tokenizer
        seqs, plens = [], []
        for edit in edits:
            tgt = target_ids(tok, edit.target_new, cfg.chat_template)
            for prefix in [""] + self.prefixes:
                p = prompt_ids(tok, f"{prefix} {edit.prompt}" if prefix else edit.prompt, cfg.chat_template)
                seqs.append(p + tgt)
                plens.append(len(p))
        for old in protected:
            p = prompt_ids(tok, old.prompt, cfg.chat_template)
            seqs.append(p + target_ids(tok, old.target_new, cfg.chat_template))
            plens.append(len(p))
        return pad_batch(seqs, plens, pad_id(tok), self.device)

    def _most_overlapping(self, masks: torch.Tensor) -> list[int]:
        """Earlier edits whose masks share the most columns with any of `masks` (the ones these edits can undo)."""
        n = min(self.config.protect, len(self.edits))
        if n == 0:
            return []
        shared = masks.cpu().float() @ self.state.masks[:len(self.edits)].float().t()  # (B, N)
        picked: list[int] = []
        for row in shared:
            picked += [i for i in row.topk(n).indices.tolist() if row[i] > 0 and i not in picked]
        return picked

    @property
    def batch_size(self) -> int:
        return self.config.edit_batch_size

    def train_edits(self, layer: MemoirLayer, edits: Sequence[Edit]) -> list[EditStats]:
        """Train `edits` together (one edit: the published sequential step), each through its own mask."""
        cfg, start = self.config, time.perf_counter()
        masks, keys = self._masks_and_keys([e.prompt for e in edits])  # (B, d_in) each
        cols = masks.any(0).nonzero().squeeze(1).to(self.device)  # the union of the edits' columns
        precond = self._preconditioner(cols)
        memory = self.state.memory.to(self.device)
        protected = self._most_overlapping(masks)
        param = layer.start_training(cols, memory[:, cols])
        contexts = 1 + len(self.prefixes)
        # Rows of several edits, or protected earlier edits, each read through their own mask (the
        # columns outside `cols` fixed); a lone edit's rows all read `cols`, the cheaper path.
        if protected or len(edits) > 1:
            row_masks = torch.cat([masks.repeat_interleave(contexts, 0), self.state.masks[protected]])
            fixed = memory.clone()
            fixed[:, cols] = 0
            layer.read_per_row(row_masks.to(self.device), fixed)
        opt = torch.optim.SGD([param], lr=cfg.lr)
        batch = self._edit_batch(edits, [self.edits[i] for i in protected])
        rows, pos, labels, _ = (t.to(self.device) for t in batch.target_positions())
        owner = torch.where(rows < len(edits) * contexts, rows // contexts, -1)  # edit of each target token, -1: protected
        own = owner >= 0
        tokens_per_edit = torch.bincount(owner[own], minlength=len(edits)).to(torch.float32)
        layer.routing.positions = batch.attention_mask.bool()
        captured = self.upper.capture(batch.input_ids, batch.attention_mask)
        losses, step = [float("inf")] * len(edits), 0
        for step in range(1, cfg.max_steps + 1):
            opt.zero_grad(set_to_none=True)
            logits = self.upper.logits_at(captured, rows, pos)  # (P, V)
            token_ce = F.cross_entropy(logits, labels, reduction="none")
            per_edit = token_ce.new_zeros(len(edits)).index_add(0, owner[own], token_ce[own]) / tokens_per_edit
            held = token_ce[~own].mean() if protected else token_ce.new_zeros(())
            losses = per_edit.detach().tolist()
            if max(*losses, float(held.detach())) <= cfg.stop_loss:
                break
            # Summed, with the clip grown as for B independent gradients: each edit of a group
            # trains as fast as it would alone (a mean would give each 1/B of its step).
            (per_edit.sum() + held * len(edits)).backward()
            if precond is not None:
                param.grad = param.grad @ precond
            torch.nn.utils.clip_grad_norm_([param], cfg.grad_clip * len(edits) ** 0.5)
            opt.step()
        memory[:, cols] = layer.stop_training()
        self.state.memory = memory
        self.state.masks = torch.cat([self.state.masks, masks.cpu()])
        if self.config.precondition and self.key_cov_edits == len(self.edits):
            self.key_cov = keys.t() @ keys + (self.key_cov if self.key_cov is not None else 0)
            self.key_cov_edits += len(edits)
        self.edits.extend(edits)
        seconds = (time.perf_counter() - start) / len(edits)
        return [EditStats(step, loss, loss, seconds) for loss in losses]

    def training_layer(self) -> MemoirLayer:
        return self.layer(with_memory=False)

    def layer(self, with_memory: bool = True, index: MaskIndex | None = None) -> MemoirLayer:
        """The serving layer; `index` a ready index of exactly this state's masks (else built here)."""
        if index is None:
            index = MaskIndex(self.state.masks.shape[1], self.config.index)
            if with_memory and len(self.state.masks):
                index.add(self.state.masks)
        return MemoirLayer(self.site.module(self.model), self.state.memory.to(self.device) if with_memory else None,
                           index, self.state.permutation, self.state.background.to(self.device), self.k,
                           self.config.threshold, self.config.center)

"""What both baselines share: the editor set-up, the training batch (an edit's prompt in its
contexts + target) and the optimisation loop on the stack above the edited layer."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...edits import Edit
from ...model import EditSite
from ...prompting import Batch, pad_batch, pad_id, prompt_ids, target_ids
from ..sequential import SequentialEditor
from ..upper import UpperStack
from ..wise.method import generate_prefixes


def edit_batch(tokenizer, edit: Edit, prefixes: Sequence[str], chat_template: bool,
               device: str | torch.device) -> Batch:
    """One row per context ("" first, then each prefix): `prefix prompt` + target, right-padded."""
    tgt = target_ids(tokenizer, edit.target_new, chat_template)
    seqs, plens = [], []
    for prefix in ["", *prefixes]:
        p = prompt_ids(tokenizer, f"{prefix} {edit.prompt}" if prefix else edit.prompt, chat_template)
        seqs.append(p + tgt)
        plens.append(len(p))
    return pad_batch(seqs, plens, pad_id(tokenizer), device)


class BaselineEditor(SequentialEditor):
    """Set-up of a baseline editor: the contexts (when `config.use_prefixes`), the cached upper stack."""

    def __init__(self, model: nn.Module, tokenizer, site: EditSite, config,
                 irrelevant: Sequence[str] = (), prefixes: Sequence[str] | None = None) -> None:
        # `irrelevant` is part of the editor signature the eval runner calls; baselines calibrate no router on it.
        self.model, self.tokenizer, self.site, self.config = model, tokenizer, site, config
        if not config.use_prefixes:
            prefixes = []
        self.prefixes = list(prefixes) if prefixes is not None else generate_prefixes(
            model, tokenizer, config.prefix_seeds, config.prefix_lengths)
        self.upper = UpperStack(model, site)
        self.device = next(model.parameters()).device
        self.base = site.module(model)
        self.edits: list[Edit] = []

    def batch(self, edit: Edit) -> Batch:
        return edit_batch(self.tokenizer, edit, self.prefixes, self.config.chat_template, self.device)

    def minimize(self, batch: Batch, opt: torch.optim.Optimizer, after_step: Callable[[], None] | None = None
                 ) -> tuple[int, float]:
        """Train on the target cross-entropy of `batch` (an edit in its contexts) until `stop_loss` or
        `max_steps`; returns (steps, last loss). The layer being trained must be attached."""
        cfg = self.config
        rows, pos, labels, _ = (t.to(self.device) for t in batch.target_positions())
        captured = self.upper.capture(batch.input_ids, batch.attention_mask)
        loss_v, step = math.inf, 0
        for step in range(1, cfg.max_steps + 1):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.upper.logits_at(captured, rows, pos), labels)
            loss_v = float(loss.detach())
            if loss_v <= cfg.stop_loss:
                break
            loss.backward()
            opt.step()
            if after_step:
                after_step()
        return step, loss_v

"""MEMOIR residual memory layer: y = W a + W_m (m ⊙ a), the memory applied only on routed rows.

MEMOIR (arXiv 2506.07899), ALGORITHMS.md §2. W_m starts at zero and has W's shape. Each edit
trains only the input columns of its TopHash mask m_e. A query computes its own mask m_q from
its prompt; the stored mask with the highest overlap |m_q ∩ m_e| / k is found through a FAISS
Hamming index (memstore/index.py); if the overlap reaches tau the row uses W_m with the matched
edit's mask, otherwise the memory adds exactly nothing. The decision is made once per row on the
prompt (prefill) and held for every generated token.
"""

from __future__ import annotations

import torch
from torch import nn

from ...index import MaskIndex
from ..base import MemoryLayer


def prompt_features(x: torch.Tensor, positions: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Mean input (B, d_in) over each row's prompt tokens, minus the background mean."""
    w = positions.to(x.dtype)[..., None]  # (B, T, 1)
    mean = (x * w).sum(1) / w.sum(1).clamp_min(1)
    return mean - background.to(x.dtype)


def memory_input(x: torch.Tensor, background: torch.Tensor, center: bool) -> torch.Tensor:
    """What W_m reads of the projection's input before its mask: x, or x - background when centred."""
    return x - background.to(x.dtype) if center else x


def tophash(features: torch.Tensor, k: int, permutation: torch.Tensor) -> torch.Tensor:
    """TopHash masks (B, d_in) bool: the k largest |features|, moved through the fixed permutation."""
    idx = features.abs().topk(k, dim=-1).indices  # (B, k)
    mask = torch.zeros(features.shape, dtype=torch.bool, device=features.device)
    mask.scatter_(1, permutation.to(features.device)[idx], True)
    return mask


class MemoirLayer(MemoryLayer):
    def __init__(self, base_layer: nn.Module, memory: torch.Tensor | None, index: MaskIndex,
                 permutation: torch.Tensor, background: torch.Tensor, k: int, threshold: float,
                 center: bool = False) -> None:
        super().__init__(base_layer)
        self.register_buffer("memory", memory, persistent=False)  # (d_out, d_in) W_m, or None
        self.register_buffer("permutation", permutation, persistent=False)  # (d_in,) long
        self.register_buffer("background", background, persistent=False)  # (d_in,)
        self.index, self.k, self.threshold = index, int(k), float(threshold)
        # The memory reads a - background: the part every prompt shares would otherwise carry
        # each edit's update onto every other edit that shares a column.
        self.center = center
        # Training state: the edit's columns and their trainable slice of W_m.
        self.train_cols: torch.Tensor | None = None
        self.train_slice: nn.Parameter | None = None
        self.train_row_masks: torch.Tensor | None = None  # (B, d_in) per-row masks (several edits, or protected ones)
        self.train_fixed: torch.Tensor | None = None  # (d_out, d_in) W_m outside the trained columns
        self.last_overlap: torch.Tensor | None = None  # (B,) best overlap / k of the last routing
        self.last_match: torch.Tensor | None = None  # (B,) matched edit (−1: bare model)

    def start_training(self, cols: torch.Tensor, init: torch.Tensor) -> nn.Parameter:
        self.train_cols = cols
        self.train_slice = nn.Parameter(init.clone())  # (d_out, k)
        return self.train_slice

    def read_per_row(self, row_masks: torch.Tensor, fixed: torch.Tensor) -> None:
        """Train with a mask per row (each edit's rows its mask, protected earlier edits theirs);
        `fixed`: W_m with the trained columns zeroed, what rows read outside them."""
        self.train_row_masks, self.train_fixed = row_masks, fixed

    def stop_training(self) -> torch.Tensor:
        assert self.train_slice is not None
        out = self.train_slice.detach().clone()
        self.train_cols, self.train_slice, self.train_row_masks, self.train_fixed = None, None, None, None
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.unflatten(x)
        if flat is not None:
            return self.forward(flat).reshape(x.shape[0], -1)
        base = self.base_layer(x)  # (B, T, d_out)
        if self.train_slice is not None:
            cols = self.train_cols
            a = memory_input(x, self.background, self.center)
            if self.train_row_masks is None:
                side = torch.matmul(a[..., cols].to(self.train_slice.dtype), self.train_slice.t())
            else:
                a = a * self.train_row_masks[:, None, :].to(a.dtype)  # (B, T, d_in)
                side = torch.matmul(a[..., cols].to(self.train_slice.dtype), self.train_slice.t()) + \
                    torch.matmul(a.to(self.train_fixed.dtype), self.train_fixed.t())
            return base + side.to(base.dtype)
        if not self.enabled or self.memory is None or len(self.index) == 0:
            return base
        match = self._route(x)
        routed = match >= 0
        if not bool(routed.any()):
            return base
        rows = routed.nonzero().squeeze(1).to(x.device)  # only routed rows pay for the memory
        masks = self.index.masks(match[routed].cpu()).to(x.device)  # (R, d_in)
        a = memory_input(x[rows], self.background, self.center)
        side = torch.matmul((a * masks[:, None, :].to(x.dtype)).to(self.memory.dtype), self.memory.t())
        return base.index_add(0, rows, side.to(base.dtype))

    @torch.no_grad()
    def _route(self, x: torch.Tensor) -> torch.Tensor:
        held = self.routing.held
        if not self.routing.prefill and held is not None and held.shape[0] == x.shape[0]:
            return held
        positions = self.route_positions(x[..., 0])
        query = tophash(prompt_features(x.float(), positions, self.background), self.k, self.permutation)
        common, match = self.index.search(query.cpu())
        overlap = common.float() / self.k
        match = torch.where(overlap >= self.threshold - 1e-9, match, torch.full_like(match, -1))
        self.last_overlap, self.last_match = overlap, match
        if self.routing.prefill:
            self.routing.held = match
        return match

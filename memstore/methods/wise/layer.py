"""WISE side memory layer: y = W a, plus (W' - W) a on rows the activation router sends to it.

WISE (arXiv 2405.14768) §3.1–3.2. The side memory is held as its difference tau = W' - W
(merged from knowledge shards), so the main memory W inside `base_layer` is never touched.
Activation score per token: ||tau a||_2; a row routes to the side memory iff its score (max, or
the paper's mean, over its prompt tokens) exceeds the threshold epsilon. The decision is made once per row on the prompt
(prefill) and held for every generated token (the reference implementation routes per call).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..base import MemoryLayer


def reduce_scores(scores: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Row activation score (B,) from per-token scores (B, T) over the masked tokens.
    "max" (our default) lets one distinctive token (the subject) decide; "mean" is the paper's."""
    mask = mask.to(scores.dtype)
    if how == "max":
        return (scores * mask - (1 - mask) * 1e9).max(-1).values.clamp_min(0)
    return (scores * mask).sum(-1) / mask.sum(-1).clamp_min(1)


class WiseLayer(MemoryLayer):
    def __init__(self, base_layer: nn.Module, delta: torch.Tensor | None = None, threshold: float = math.inf,
                 reduce: str = "mean", basis: torch.Tensor | None = None) -> None:
        super().__init__(base_layer)
        self.reduce = reduce
        # (d_in, r) orthonormal basis of the background activations; the side memory reads only
        # the part of `a` outside it, so prompts that look like everyday input barely move it.
        self.register_buffer("basis", basis, persistent=False)
        self.register_buffer("delta", delta, persistent=False)  # (d_out, d_in) or None
        self.threshold = float(threshold)
        # Training state: a trainable shard tau restricted to its random mask.
        self.train_delta: nn.Parameter | None = None
        self.train_mask: torch.Tensor | None = None
        self.last_scores: torch.Tensor | None = None  # (B, T) per-token scores of the last forward
        self.last_route: torch.Tensor | None = None  # (B,) decisions of the last forward

    def set_memory(self, delta: torch.Tensor | None, threshold: float) -> None:
        self.delta = delta
        self.threshold = float(threshold)
        self.routing.reset()

    def start_training(self, init: torch.Tensor, mask: torch.Tensor) -> nn.Parameter:
        self.train_mask = mask
        self.train_delta = nn.Parameter(init.clone())
        return self.train_delta

    def stop_training(self) -> torch.Tensor:
        assert self.train_delta is not None and self.train_mask is not None
        out = (self.train_delta.detach() * self.train_mask).clone()
        self.train_delta = None
        self.train_mask = None
        return out

    def side_output(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        x = x.to(delta.dtype)
        if self.basis is not None:
            x = x - torch.matmul(torch.matmul(x, self.basis), self.basis.t())  # (B, T, d_in)
        return torch.matmul(x, delta.t())  # (B, T, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.unflatten(x)
        if flat is not None:
            return self.forward(flat).reshape(x.shape[0], -1)
        base = self.base_layer(x)  # (B, T, d_out)
        if self.train_delta is not None:
            side = self.side_output(x, self.train_delta * self.train_mask)
            self.last_scores = side.norm(dim=-1)
            return base + side.to(base.dtype)
        if not self.enabled or self.delta is None:
            return base
        side = self.side_output(x, self.delta)
        scores = side.norm(dim=-1)  # (B, T)
        self.last_scores = scores
        route = self._route(scores)
        self.last_route = route
        return torch.where(route[:, None, None], base + side.to(base.dtype), base)

    def _route(self, scores: torch.Tensor) -> torch.Tensor:
        held = self.routing.held
        if not self.routing.prefill and held is not None and held.shape[0] == scores.shape[0]:
            return held.to(scores.device)
        row = reduce_scores(scores, self.route_positions(scores), self.reduce)
        route = row > self.threshold
        if self.routing.prefill:
            self.routing.held = route
        return route

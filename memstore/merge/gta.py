"""Generalized task arithmetic: TIES, DARE-TIES, task arithmetic and linear as configurations.

TIES-merging (Yadav et al., arXiv 2306.01708): (1) trim each tau_i to its top-`density`
entries by magnitude, (2) elect a sign per entry from sign(sum_i w_i tau_i), (3) disjoint mean:
average per entry only the tau_i that are non-zero and agree with the elected sign.
DARE (arXiv 2311.03099) replaces the trim with random drop and rescale, seeded for determinism.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .base import MergeMethod, ParamDef


def _magnitude_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1.0:
        return tau
    nonzero = int((tau != 0).sum())
    k = int(round(density * nonzero))  # density of the shard's own (masked) entries
    if k <= 0:
        return torch.zeros_like(tau)
    flat = tau.abs().flatten()
    # kth largest magnitude; ties broken by index order through topk, which is deterministic on CPU
    idx = torch.topk(flat, k, sorted=False).indices
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[idx] = True
    return tau * keep.view_as(tau)


def _random_drop(tau: torch.Tensor, density: float, seed: int) -> torch.Tensor:
    if density >= 1.0:
        return tau
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(tau.shape, generator=gen) < density
    return tau * keep.to(tau.device) / density


@dataclass(frozen=True)
class GeneralizedTaskArithmetic(MergeMethod):
    method_name: str
    sparsify: str | None  # "magnitude", "random" or None
    sign_consensus: bool
    normalize: bool  # divide by the summed weights (linear) or by agreeing weights (TIES)
    url: str | None = None

    def name(self) -> str:
        return self.method_name

    def reference_url(self) -> str | None:
        return self.url

    def parameters(self) -> list[ParamDef]:
        return [ParamDef("seed", default=0, help="seed of random sparsification (DARE)")]

    def shard_parameters(self) -> list[ParamDef]:
        out = [ParamDef("weight", default=1.0, help="scale of this shard's task vector")]
        if self.sparsify:
            out.append(ParamDef("density", default=0.53, help="fraction of entries kept"))
        return out

    def merge(self, deltas: Sequence[torch.Tensor], params: dict[str, Any] | None = None,
              shard_params: Sequence[dict[str, Any]] | None = None) -> torch.Tensor:
        if not deltas:
            raise ValueError("nothing to merge")
        params = params or {}
        shard_params = list(shard_params or [{} for _ in deltas])
        taus, weights = [], []
        for i, (tau, sp) in enumerate(zip(deltas, shard_params)):
            density = float(sp.get("density", 0.53))
            if self.sparsify == "magnitude":
                tau = _magnitude_trim(tau, density)
            elif self.sparsify == "random":
                tau = _random_drop(tau, density, int(params.get("seed", 0)) * 7919 + i)
            taus.append(tau.float())
            weights.append(float(sp.get("weight", 1.0)))
        stacked = torch.stack(taus)  # (K, d_out, d_in)
        w = torch.tensor(weights).view(-1, *([1] * (stacked.dim() - 1)))
        weighted = stacked * w
        total = weighted.sum(0)
        if self.sign_consensus:
            elected = torch.sign(total)
            agree = (torch.sign(stacked) == elected) & (stacked != 0)
            divisor = (w * agree).sum(0)  # disjoint mean: only agreeing, non-zero entries count
            total = (weighted * agree).sum(0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        elif self.normalize:
            total = total / w.sum()
        return total

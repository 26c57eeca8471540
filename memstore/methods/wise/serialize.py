"""WISE shards as safetensors: the masked values plus the packed mask bits, so a shard opens with
`safe_open` alone and costs rho of a dense matrix, not the whole of it."""

from __future__ import annotations

import numpy as np
import torch

from .method import Shard


def shard_tensors(shard: Shard, mask: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    flat_mask = mask.flatten().cpu()
    values = shard.tau.flatten().cpu()[flat_mask].float().contiguous()  # (n_masked,)
    bits = torch.from_numpy(np.packbits(flat_mask.numpy().astype(np.uint8)))
    meta = {"kind": "wise-shard", "shape": list(shard.tau.shape), "seed": shard.seed,
            "n_masked": int(flat_mask.sum())}
    return {"values": values, "mask_bits": bits}, meta


def shard_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, mask) as dense (d_out, d_in) tensors."""
    shape = tuple(meta["shape"])
    numel = int(np.prod(shape))
    mask = torch.from_numpy(np.unpackbits(tensors["mask_bits"].numpy())[:numel].astype(bool))
    tau = torch.zeros(numel, dtype=torch.float32)
    tau[mask] = tensors["values"].float()
    return tau.view(shape), mask.view(shape)

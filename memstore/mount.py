"""Mount a memory layer onto a stock transformers model, and take it off again.

Mounting replaces the edited projection in its parent with a MemoryLayer wrapping it, and adds
a forward pre-hook on the model that tells the layer which tokens are the prompt (attention
mask) and whether this call is a prefill or a cached generation step, so that a row's route is
decided on its prompt and held for the tokens it generates (DESIGN.md principle 7).
Unmount puts the exact original module back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .methods.attach import set_submodule
from .methods.base import MemoryLayer
from .model import EditSite


CACHE_KWARGS = ("past_key_values", "cache")


def _past_length(past: Any) -> int:
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    try:
        return int(past[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


class MountHandle:
    def __init__(self, model: nn.Module, site: EditSite, layer: MemoryLayer) -> None:
        self.model, self.site, self.layer = model, site, layer
        self.base = layer.get_base_layer()
        if model.get_submodule(site.module_path) is not self.base:
            raise ValueError(f"{site.module_path} is already mounted; unmount it first")
        set_submodule(model, site.module_path, layer)
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self.mounted = True

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        routing = self.layer.routing
        # generate passes the KV cache as `cache` in transformers 5.25, as `past_key_values` before.
        past = next((kwargs[k] for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
        routing.prefill = _past_length(past) == 0
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if routing.prefill:
            routing.held = None
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and (ids is None or mask.shape == ids.shape):
                routing.positions = mask.bool()
            elif mask is None and isinstance(ids, torch.Tensor) and ids.dim() == 2:
                routing.positions = torch.ones_like(ids, dtype=torch.bool)  # no padding: every token is prompt
            else:
                routing.positions = None

    def unmount(self) -> nn.Module:
        """Put the original module back; returns the model."""
        if self.mounted:
            self._hook.remove()
            set_submodule(self.model, self.site.module_path, self.base)
            self.mounted = False
        return self.model

    @contextlib.contextmanager
    def route_on(self, mask: torch.Tensor) -> Iterator[None]:
        """Decide routes on these (B, T) positions only, e.g. the prompt of a teacher-forced row."""
        self.layer.routing.override = mask
        try:
            yield
        finally:
            self.layer.routing.override = None

    def disable(self):
        return self.layer.disable()

    def __enter__(self) -> "MountHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def mount_layer(model: nn.Module, site: EditSite, layer: MemoryLayer) -> MountHandle:
    return MountHandle(model, site, layer)

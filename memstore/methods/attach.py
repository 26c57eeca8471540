"""Swap a module in its parent and put the exact original back (wrap, never mutate)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from ..model import EditSite


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, module)


@contextlib.contextmanager
def attached(model: nn.Module, site: EditSite, layer: nn.Module) -> Iterator[nn.Module]:
    original = model.get_submodule(site.module_path)
    base = getattr(original, "base_layer", original)
    if getattr(layer, "base_layer", None) is not base:
        raise ValueError("layer must wrap the model's edited module")
    set_submodule(model, site.module_path, layer)
    try:
        yield layer
    finally:
        set_submodule(model, site.module_path, original)

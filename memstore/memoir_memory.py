"""MEMOIR memory states in the store: one object per state, plus the store's fixed TopHash frame.

A MEMOIR store's commit state is `{"shards": [memory object id], "threshold": tau}`. Objects:

    frame    {"kind": "memoir-frame"}: tensors `permutation` (d_in,) and `background` (d_in,),
             written once at `init`; every mask of the store is a function of it (ALGORITHMS.md §2:
             losing the permutation silently breaks every edit, so it is content-addressed too)
    memory   {"kind": "memoir-memory", "shape", "layer", "edits", "k", "frame", "base", "depth"}:
             tensors `columns` (input columns of W_m), `values` (d_out, n_columns) and `mask_bits`
             (n, d_in/8), TopHash masks in edit order. Without a "base" these are all of W_m's
             non-zero columns and every edit's mask. With "base" (the memory it was trained on top of,
             which holds a prefix of its edits) they are only the columns that changed and the masks
             of the new edits: a commit costs what it changed, not a dense matrix. A chain is cut
             (a full object written) every MAX_DEPTH objects, so loading stays bounded.

Rebuilding without some edits starts from the stored memory that held exactly the edits before
the first removed one (so reverting the newest commit restores its parent's memory bit for bit)
and retrains the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch

from .edits import Edit
from .index import MaskIndex, pack_masks, read_index, unpack_masks, write_index
from .methods.memoir import MemoirState
from .memory import shard_meta, shard_rows
from .store import Store, canonical_json

FRAME, MEMORY = "memoir-frame", "memoir-memory"
MAX_DEPTH = 16


def put_frame(store_objects, permutation: torch.Tensor, background: torch.Tensor) -> str:
    return store_objects.put_tensors({"permutation": permutation.cpu().long().contiguous(),
                                      "background": background.cpu().float().contiguous()}, {"kind": FRAME})


def load_frame(store: Store, oid: str) -> tuple[torch.Tensor, torch.Tensor]:
    tensors, _ = store.objects.get_tensors(oid)
    return tensors["permutation"], tensors["background"]


def put_memory(store: Store, state: MemoirState, keys: Sequence[str], k: int, frame: str, layer: int,
               threshold: float, base: str | None = None, index_kind: str = "flat") -> dict[str, Any]:
    """Write a MEMOIR memory (as a delta on `base` when it holds a prefix of `keys`); returns its
    `shards` catalog row."""
    memory = state.memory.detach().cpu().float()
    meta = {"kind": MEMORY, "shape": list(memory.shape), "layer": layer, "edits": list(keys), "k": int(k),
            "frame": frame}
    first_new = 0
    if base is not None:
        base_meta = shard_meta(store, base)
        n_base = len(base_meta["edits"])
        if base_meta.get("depth", 0) + 1 < MAX_DEPTH and list(keys[:n_base]) == base_meta["edits"]:
            meta.update(base=base, depth=base_meta.get("depth", 0) + 1)
            first_new = n_base
    # Training an edit writes only its mask's columns, so on top of `base` exactly the columns of
    # the new edits' masks changed; a full object holds every column W_m uses.
    changed = state.masks[first_new:].any(0) if "base" in meta else (memory != 0).any(0)
    columns = changed.nonzero().squeeze(1)  # (n_columns,)
    tensors = {"columns": columns.contiguous(), "values": memory[:, columns].contiguous(),
               "mask_bits": torch.from_numpy(pack_masks(state.masks[first_new:]))}
    oid = store.objects.put_tensors(tensors, meta)
    write_memory_index(store, oid, state.masks, index_kind)
    return {"object_id": oid, "kind": MEMORY, "seed": None, "layer": layer, "n_edits": len(keys),
            "meta_json": canonical_json(meta), "threshold": float(threshold), "signature": None}


def load_memory(store: Store, oid: str) -> tuple[MemoirState, dict[str, Any]]:
    """The full memory state of a memory object (following its base chain; every object re-hashed)."""
    memory, masks, meta = _load_chain(store, oid)
    permutation, background = load_frame(store, meta["frame"])
    return MemoirState(memory, torch.cat(masks), permutation, background), meta


def _load_chain(store: Store, oid: str) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]]:
    tensors, meta = store.objects.get_tensors(oid)
    d_out, d_in = meta["shape"]
    memory, masks = _load_chain(store, meta["base"])[:2] if meta.get("base") else (torch.zeros(d_out, d_in), [])
    memory[:, tensors["columns"]] = tensors["values"].float()
    masks.append(unpack_masks(tensors["mask_bits"].numpy().reshape(-1, d_in // 8), d_in))
    return memory, masks, meta


TrainFn = Callable[[MemoirState, Sequence[Edit], Sequence[Edit]], MemoirState]
"""(starting state, edits it already holds, edits to add) -> the state trained on them."""


def rebuild_without(store: Store, oid: str, removed: set[str], train: TrainFn,
                    edits_for: Callable[[Sequence[str]], list[Edit]], threshold: float) -> dict[str, Any] | None:
    """Catalog row of MEMOIR memory `oid` without the edit keys in `removed` (None: nothing left)."""
    state, meta = load_memory(store, oid)
    keys = meta["edits"]
    keep = [k for k in keys if k not in removed]
    if not keep:
        return None
    first = next(i for i, k in enumerate(keys) if k in removed)
    prefix = keys[:first]
    start = MemoirState(torch.zeros_like(state.memory), state.masks[:0], state.permutation, state.background)
    match = None
    if prefix:  # a stored memory of the same frame holding exactly the edits before the first removed one
        t = store.catalog.shards
        with store.catalog.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.object_id, t.c.meta_json).where(t.c.kind == MEMORY)).all()
        match = next((r.object_id for r in rows if (m := json.loads(r.meta_json))["edits"] == prefix
                      and m["frame"] == meta["frame"]), None)
        if match is not None:
            start = load_memory(store, match)[0]
        else:
            prefix = []
    rest = keep[len(prefix):]
    if not rest and match is not None:  # the removed edits were the newest: that stored memory, as it was
        return shard_rows(store, [match])[0]
    new = train(start, edits_for(prefix), edits_for(rest)) if rest else start
    return put_memory(store, new, keep, meta["k"], meta["frame"], meta["layer"], threshold, base=match)





# ---- the router index of a memory (derived: index/<object id>.faiss) ---------------------------------

def index_path(store: Store, oid: str) -> Path:
    return store.path / "index" / f"{oid}.faiss"


def write_memory_index(store: Store, oid: str, masks: torch.Tensor, kind: str = "flat") -> MaskIndex:
    index = MaskIndex(masks.shape[1], kind)
    index.add(masks)
    write_index(index, index_path(store, oid))
    return index


def memory_index(store: Store, oid: str, masks: torch.Tensor, kind: str = "flat") -> MaskIndex:
    """The stored index of a memory when it holds exactly its masks, else a fresh one (written back)."""
    return read_index(index_path(store, oid), masks, kind) or write_memory_index(store, oid, masks, kind)


def index_problem(store: Store, oid: str) -> str | None:
    """Why the index file of memory `oid` is unusable (None: it matches, or there is none yet)."""
    path = index_path(store, oid)
    if not path.exists():
        return None
    state, _ = load_memory(store, oid)
    if read_index(path, state.masks) is None:
        return f"router index {path.name} does not match the masks of memory {oid[:12]}; run `wisemem index rebuild`"
    return None


def rebuild_indexes(store: Store, oids: Sequence[str], kind: str = "flat") -> list[str]:
    """Rewrite the index file of each memory from its masks; returns the paths written."""
    out = []
    for oid in oids:
        write_memory_index(store, oid, load_memory(store, oid)[0].masks, kind)
        out.append(str(index_path(store, oid)))
    return out

"""WISE-Retrieve memory states in the store: K side memories, one per top-level shard object.

A wise-retrieve store (`wisemem init --method wise-retrieve`) keeps WISE-Merge's state, shard
objects and catalog rows (memory.py), read differently: each top-level shard object of a state (a
trained shard, or a merged shard = a group) is one memory served on its own, with the threshold of
its catalog row (`porcelain.with_routing`), by top-1 retrieval (methods/wise/retrieve.py); the
state's `threshold` is the loosest memory's. Groups form by themselves: once `shards_per_memory`
consecutive trained shards are full they are merged (the config's merge settings, spec marked
"auto") into one merged shard object, which names its sources so a revert can rebuild it. A revert
that takes edits out of an automatic group dissolves it into its rebuilt sources and groups
again, so reverting the newest commit gives back its parent's state; `wisemem merge A B` merges
two memories into one explicitly (history.py).

Routing keys (DESIGN.md principle 6): every shard's signature object holds its edits' keys (the
edited layer's input on the prompt, background removed, mean over the prompt) in edit order.
The key index of HEAD's memory, a FAISS index of those keys whose ids say memory and position
(index.py `KeyIndex`), is derived data at index/routing-keys.faiss: written by the Store itself
whenever HEAD moves (`HEAD_MOVED_HOOKS`: commit, merge, revert, checkout, reset), compared with
the keys by fsck, rewritten by `wisemem index rebuild`. Serving builds the same flat index from the keys themselves, so a
stale or damaged file can never change a route.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import IntegrityError
from .index import KeyIndex, key_ids, read_key_index, write_key_index
from .memory import TRAINED, MemoryState, commit_state, load_tau, put_merged, shard_routing
from .merge import merge_with_spec
from .methods.wise import WiseConfig, WiseRetrieveLayer
from .methods.wise.method import merge_spec
from .methods.wise.retrieve import memory_groups
from .store import HEAD_MOVED_HOOKS, Store

METHOD = "wise-retrieve"
INDEX_FILE = "routing-keys.faiss"

RoutingFn = Callable[[dict[str, Any], torch.Tensor, Sequence[str]], dict[str, Any]]
"""(a new shard's catalog row, its tau, its edit keys) -> the row with its routing columns."""


def is_retrieve(store: Store) -> bool:
    return json.loads(store.binding.get("config_json") or "{}").get("method") == METHOD


def is_auto_group(meta: dict[str, Any]) -> bool:
    return bool(meta.get("spec", {}).get("auto"))


# ---- groups ----------------------------------------------------------------------------------------

def group_rows(store: Store, rows: Sequence[dict[str, Any]], config: WiseConfig, layer: int,
               routing: RoutingFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The state's top-level rows with every complete group of `shards_per_memory` full trained
    shards merged into one memory; and the rows of the shards merged away (the merged shards' sources)."""
    k, cap = config.shards_per_memory, config.edits_per_shard
    full = [r["kind"] == TRAINED and r["n_edits"] >= cap for r in rows]
    out: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    for group in memory_groups([r["kind"] != TRAINED for r in rows], full, k):
        members = [rows[i] for i in group]
        if k == 1 or len(group) < k or not all(full[i] for i in group):
            out += members
            continue
        oids = [r["object_id"] for r in members]
        spec = dict(merge_spec(config, k), auto=True)
        tau = merge_with_spec([load_tau(store, o) for o in oids], spec)
        keys = [key for r in members for key in json.loads(r["meta_json"])["edits"]]
        out.append(routing(put_merged(store, tau, oids, spec, keys, layer), tau, keys))
        sources += members
    return out, sources


# ---- serving ---------------------------------------------------------------------------------------

Rows = Sequence[dict[str, Any]]


def _routing(store: Store, oid: str, rows: Rows) -> tuple[float | None, str | None]:
    """(threshold, signature) of a shard: from `rows` (a state not yet recorded), else the catalog."""
    row = next((r for r in rows if r["object_id"] == oid), None)
    return (row["threshold"], row["signature"]) if row is not None else shard_routing(store, oid)


def thresholds(store: Store, state: MemoryState, rows: Rows = ()) -> list[float]:
    """Each memory's own threshold, from its catalog row."""
    out = []
    for oid in state.shards:
        threshold = _routing(store, oid, rows)[0]
        if threshold is None:
            raise IntegrityError(f"shard {oid[:12]} has no router threshold in the catalog; run `wisemem fsck`")
        out.append(float(threshold))
    return out


def serving_layer(store: Store, base: nn.Module, state: MemoryState, config: WiseConfig,
                  basis: torch.Tensor | None, device: torch.device, rows: Rows = ()) -> WiseRetrieveLayer:
    """The memories of `state` (every object re-hashed as it loads), pre-filtered by the key index.
    `rows`: the shards' catalog rows when the state is not recorded yet (`train`, `commit --gate`)."""
    if not state.shards:
        return WiseRetrieveLayer(base, None, None, config.router_reduce, basis)
    deltas = torch.stack([load_tau(store, oid) for oid in state.shards]).to(device)  # (K, d_out, d_in)
    # Built from the keys (the truth): a flat index builds as fast as its file reads.
    index = state_index(store, state, rows) if config.prefilter_candidates else None
    return WiseRetrieveLayer(base, deltas, torch.tensor(thresholds(store, state, rows), device=device),
                             config.router_reduce, basis, index, config.prefilter_candidates)


# ---- the key index -----------------------------------------------------------------------------------

def index_path(store: Store) -> Path:
    return store.path / "index" / INDEX_FILE


def state_index(store: Store, state: MemoryState, rows: Rows = ()) -> KeyIndex:
    """The key index of a state, from its shards' signature objects (the truth)."""
    keys = []
    for oid in state.shards:
        signature = _routing(store, oid, rows)[1]
        tensors = store.objects.get_tensors(signature)[0] if signature else {}
        if "keys" not in tensors:
            raise IntegrityError(f"shard {oid[:12]} has no routing keys; run `wisemem fsck`")
        keys.append(tensors["keys"])
    return KeyIndex.build(torch.cat(keys), key_ids([len(k) for k in keys]))


def write_head_index(store: Store) -> Path | None:
    """Write the key index of HEAD's memory (a wise-retrieve store only; no memories: no file)."""
    if not is_retrieve(store):
        return None
    state, path = commit_state(store, store.head()), index_path(store)
    if not state.shards:
        path.unlink(missing_ok=True)
        return None
    write_key_index(state_index(store, state), path)
    return path


HEAD_MOVED_HOOKS.append(write_head_index)  # every commit, checkout and reset keeps the file HEAD's


def head_index_problem(store: Store) -> str | None:
    """Why the key index file does not serve HEAD's memory (None: it does, or there is no memory)."""
    state, path = commit_state(store, store.head()), index_path(store)
    if not state.shards:
        return None
    if not path.exists():
        return f"router index index/{INDEX_FILE} of HEAD's memory is missing; run `wisemem index rebuild`"
    stored = read_key_index(path)
    if stored is None or not stored.same_as(state_index(store, state)):
        return f"router index index/{INDEX_FILE} does not match the routing keys of HEAD's memory; run `wisemem index rebuild`"
    return None

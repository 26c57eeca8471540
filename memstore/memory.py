"""The memory state at a commit: which shard objects make up the side memory, and its threshold.

A state is `{"shards": [object id, ...], "threshold": float | null}` (commits.state_json). Each
shard object is a safetensors blob whose header says what it is (so it opens with `safe_open`
alone) and which edits it holds, in training order, as edit keys (`store.edit_key`):

    trained shard   {"kind": "wise-shard", "seed", "shape", "layer", "edits", "n_masked"}
                    values on its random mask + the packed mask bits (rho of a dense matrix)
    merged shard    {"kind": "wise-merged", "shape", "layer", "edits", "sources", "spec"}
                    values on its non-zero entries + packed bits; `sources` are the shard
                    objects it was merged from with `spec` (method and parameters), so a
                    revert can rebuild it (DESIGN.md principle 3)

The side memory served at a commit is the merge of its top-level shards (WISE §3.3), a pure
function of the state (principle 2). Rebuilding a shard without some edits reuses the newest
stored version of the same shard that held exactly the edits before the first removed one
(a commit in its history) and retrains only the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch

from .edits import Edit, edit_from_record
from .errors import IntegrityError
from .merge import merge_with_spec
from .store import Store, canonical_json, edit_key

TRAINED, MERGED = "wise-shard", "wise-merged"


@dataclass
class MemoryState:
    shards: list[str] = field(default_factory=list)
    threshold: float | None = None

    @classmethod
    def from_json(cls, text: str | None) -> MemoryState:
        data = json.loads(text) if text else {}
        return cls(list(data.get("shards", [])), data.get("threshold"))

    def to_json(self) -> str:
        return canonical_json({"shards": self.shards, "threshold": self.threshold})


def commit_state(store: Store, commit_id: str | None) -> MemoryState:
    return MemoryState() if commit_id is None else MemoryState.from_json(store.get_commit(commit_id, with_edits=False)["state_json"])


def key_of(edit: Edit) -> str:
    return edit_key(edit.edit_id, edit.to_dict())


# ---- shard objects ---------------------------------------------------------------------------

def _pack(tau: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    flat_mask = mask.flatten().cpu()
    values = tau.flatten().cpu()[flat_mask].float().contiguous()  # (n_masked,)
    bits = torch.from_numpy(np.packbits(flat_mask.numpy().astype(np.uint8)))
    return {"values": values, "mask_bits": bits}


def unpack(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, mask) as dense (d_out, d_in) tensors from a shard object's tensors and header."""
    shape = tuple(meta["shape"])
    numel = int(np.prod(shape))
    mask = torch.from_numpy(np.unpackbits(tensors["mask_bits"].numpy())[:numel].astype(bool))
    tau = torch.zeros(numel, dtype=torch.float32)
    tau[mask] = tensors["values"].float()
    return tau.view(shape), mask.view(shape)


def _catalog_row(oid: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {"object_id": oid, "kind": meta["kind"], "seed": meta.get("seed"), "layer": meta["layer"],
            "n_edits": len(meta["edits"]), "meta_json": canonical_json(meta), "threshold": None, "signature": None}


def put_trained(store: Store, tau: torch.Tensor, mask: torch.Tensor, seed: int, keys: Sequence[str],
                layer: int) -> dict[str, Any]:
    """Write a trained shard; returns its `shards` catalog row."""
    meta = {"kind": TRAINED, "seed": seed, "shape": list(tau.shape), "layer": layer, "edits": list(keys),
            "n_masked": int(mask.sum())}
    return _catalog_row(store.objects.put_tensors(_pack(tau, mask), meta), meta)


def put_merged(store: Store, tau: torch.Tensor, sources: Sequence[str], spec: dict[str, Any], keys: Sequence[str],
               layer: int) -> dict[str, Any]:
    mask = tau != 0
    meta = {"kind": MERGED, "shape": list(tau.shape), "layer": layer, "edits": list(keys), "sources": list(sources),
            "spec": spec, "n_masked": int(mask.sum())}
    return _catalog_row(store.objects.put_tensors(_pack(tau, mask), meta), meta)


def _stored_row(store: Store, oid: str) -> dict[str, Any] | None:
    t = store.catalog.shards
    with store.catalog.engine.connect() as conn:
        row = conn.execute(sa.select(t).where(t.c.object_id == oid)).mappings().first()
    return dict(row) if row is not None else None


def shard_routing(store: Store, oid: str) -> tuple[float | None, str | None]:
    """(own threshold, signature object id) of a shard from the catalog."""
    row = _stored_row(store, oid)
    return (row["threshold"], row["signature"]) if row is not None else (None, None)


def shard_meta(store: Store, oid: str) -> dict[str, Any]:
    """A shard's header as recorded in the catalog (the object itself is read only for tensors)."""
    row = _stored_row(store, oid)
    return json.loads(row["meta_json"]) if row is not None else store.objects.get_meta(oid)


def shard_rows(store: Store, oids: Sequence[str]) -> list[dict[str, Any]]:
    """Catalog rows of stored shards, routing columns included."""
    return [_stored_row(store, oid) or _catalog_row(oid, store.objects.get_meta(oid)) for oid in oids]


def load_tau(store: Store, oid: str) -> torch.Tensor:
    return unpack(*store.objects.get_tensors(oid))[0]


def state_edit_keys(store: Store, state: MemoryState) -> list[str]:
    """Every live edit key, oldest shard first, each once."""
    seen: dict[str, None] = {}
    for oid in state.shards:
        for key in shard_meta(store, oid)["edits"]:
            seen.setdefault(key, None)
    return list(seen)


def memory_count(method: str, state: MemoryState) -> int:
    """Side memories a state serves: one per top-level shard in a wise-retrieve store; otherwise the
    one memory (the merge of the shards, or the MEMOIR memory) when there is any."""
    return len(state.shards) if method == "wise-retrieve" else min(len(state.shards), 1)


def spent_seeds(store: Store, state: MemoryState) -> set[int]:
    """Mask seeds of the trained shards inside the state's merged shards (a new shard must not reuse them)."""
    out: set[int] = set()
    todo = [s for o in state.shards for s in shard_meta(store, o).get("sources", [])]
    while todo:
        meta = shard_meta(store, todo.pop())
        if meta.get("seed") is not None:
            out.add(int(meta["seed"]))
        todo += meta.get("sources", [])
    return out


def edits_for(store: Store, keys: Sequence[str]) -> list[Edit]:
    records = store.edit_records(keys)
    missing = [k for k in keys if k not in records]
    if missing:
        raise IntegrityError(f"edit records {missing[:3]} are missing from the catalog; run `wisemem fsck`")
    return [edit_from_record(records[k]) for k in keys]


def verify_state(store: Store, state: MemoryState) -> None:
    """Re-hash every object the state needs (merge sources included): IntegrityError if any is bad."""
    todo = list(state.shards)
    while todo:
        oid = todo.pop()
        store.objects.verify(oid)
        meta = shard_meta(store, oid)
        todo.extend(meta.get("sources", []) + ([meta["base"]] if meta.get("base") else []))  # merge sources, delta base
        signature = shard_routing(store, oid)[1]
        if signature:
            store.objects.verify(signature)


# ---- rebuilding shards without some edits ------------------------------------------------------

TrainFn = Callable[[torch.Tensor, int, Sequence[Edit], Sequence[Edit]], torch.Tensor]
"""(starting tau, mask seed, edits it already holds, edits to add) -> the tau trained on them."""


def _versions_of(store: Store, seed: int) -> list[tuple[str, dict[str, Any]]]:
    t = store.catalog.shards
    with store.catalog.engine.connect() as conn:
        rows = conn.execute(sa.select(t.c.object_id, t.c.meta_json).where(t.c.seed == seed)
                            .where(t.c.kind == TRAINED)).all()
    return [(r.object_id, json.loads(r.meta_json)) for r in rows]


def rebuild_without(store: Store, oid: str, removed: set[str], train: TrainFn) -> dict[str, Any] | None:
    """Catalog row of shard `oid` rebuilt without the edit keys in `removed` (None: it held only
    those). Shards that hold none of them come back unchanged."""
    meta = shard_meta(store, oid)
    keys = meta["edits"]
    if not removed & set(keys):
        return shard_rows(store, [oid])[0]
    keep = [k for k in keys if k not in removed]
    if not keep:
        return None
    if meta["kind"] == MERGED:
        params = meta["spec"].get("shard_params") or [{} for _ in meta["sources"]]
        kept = [(r, p) for r, p in ((rebuild_without(store, s, removed, train), p)
                                    for s, p in zip(meta["sources"], params)) if r is not None]
        taus = [load_tau(store, r["object_id"]) for r, _ in kept]
        spec = dict(meta["spec"], shard_params=[p for _, p in kept])
        return put_merged(store, merge_with_spec(taus, spec), [r["object_id"] for r, _ in kept], spec, keep, meta["layer"])
    first = next(i for i, k in enumerate(keys) if k in removed)
    prefix = keys[:first]
    start = torch.zeros(meta["shape"])
    if prefix:  # a stored version holding exactly the edits before the first removed one
        match = next((o for o, m in _versions_of(store, meta["seed"]) if m["edits"] == prefix), None)
        if match is not None:
            start = load_tau(store, match)
        else:
            prefix = []
    rest = keep[len(prefix):]
    tau = train(start, meta["seed"], edits_for(store, prefix), edits_for(store, rest)) if rest else start
    mask = unpack(*store.objects.get_tensors(oid))[1]
    return put_trained(store, tau, mask, meta["seed"], keep, meta["layer"])

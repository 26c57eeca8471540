"""Router indexes: FAISS pre-selection of the stored edits a query may match (DESIGN.md principle 6).

MEMOIR (ALGORITHMS.md §2) routes a query to the stored edit mask with the highest overlap
|m_q ∩ m_e| / k. Every mask has exactly k bits set, so Hamming distance h = 2k − 2|m_q ∩ m_e|
and the nearest mask in Hamming space is the one with the highest overlap: a FAISS binary
index answers it. `MaskIndex` keeps the masks it was given (the truth, from the catalog) next to
the FAISS structure (derived): `search` asks FAISS for candidates, then scores them exactly;
`exhaustive` scans every mask, the reference the benchmarks measure the pre-filter against.
Kinds: "flat" (exact scan, FAISS IndexBinaryFlat), "hnsw" (graph search, sub-linear).
A store keeps one index file per MEMOIR memory object (`index/<object id>.faiss`): derived data,
written at commit, checked against the object's masks when read and by `fsck`, and rebuilt by
`wisemem index rebuild`.

WISE-Retrieve routes a query to one of K side memories by its activation scores; `KeyIndex`
pre-selects which memories to score: it holds one routing key per stored edit (the edited layer's
input on the edit's prompt, mean over the prompt), tagged with the memory holding the edit, and
returns the memories of a query key's nearest stored keys (cosine: inner product of L2-normalised
keys, FAISS IndexFlatIP under an IndexIDMap whose ids encode memory and position).
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import torch

INDEX_KINDS = ("flat", "hnsw")


def pack_masks(masks: torch.Tensor) -> np.ndarray:
    """(N, d) bool → (N, d/8) uint8, little bit order within each byte (FAISS's binary layout)."""
    bits = masks.detach().to("cpu", torch.bool).numpy()
    return np.packbits(bits, axis=1, bitorder="little")


def unpack_masks(packed: np.ndarray, n_bits: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed, axis=1, count=n_bits, bitorder="little").astype(bool))


class MaskIndex:
    """Masks of stored edits (row i = edit i), searchable by overlap with a query mask."""

    # HNSW settings from benchmarks/probe_hnsw.py: recall 0.996 against the exhaustive scan at
    # 10,000 stored masks (M 16, efSearch 64, 4 candidates gave 0.917).
    def __init__(self, n_bits: int, kind: str = "flat", candidates: int | None = None, *, hnsw_m: int = 32,
                 ef_construction: int = 200, ef_search: int = 256) -> None:
        if n_bits % 8:
            raise ValueError(f"mask length must be a multiple of 8 bits, got {n_bits}")
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind '{kind}'; known: {', '.join(INDEX_KINDS)}")
        # candidates re-scored exactly: a flat index is exact already (they only break ties)
        self.n_bits, self.kind = n_bits, kind
        self.candidates = candidates if candidates is not None else (32 if kind == "hnsw" else 4)
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.packed = np.zeros((0, n_bits // 8), dtype=np.uint8)
        self._faiss = self._new_faiss()
        self._dense: torch.Tensor | None = None  # (N, d) float masks for the exhaustive scan, made on first use

    def _new_faiss(self):
        if self.kind == "hnsw":
            index = faiss.IndexBinaryHNSW(self.n_bits, self.hnsw_m)
            index.hnsw.efConstruction = self.ef_construction
            index.hnsw.efSearch = self.ef_search
            return index
        return faiss.IndexBinaryFlat(self.n_bits)

    def __len__(self) -> int:
        return self.packed.shape[0]

    def add(self, masks: torch.Tensor) -> None:
        packed = pack_masks(masks)
        self.packed = np.concatenate([self.packed, packed])
        self._faiss.add(packed)
        self._dense = None

    def masks(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, d) bool masks of the given stored ids (−1 gives an all-False row)."""
        ids_np = ids.detach().cpu().numpy()
        out = unpack_masks(self.packed[np.clip(ids_np, 0, None)], self.n_bits)
        out[torch.from_numpy(ids_np < 0)] = False
        return out

    def search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best stored mask per query: (overlap count (B,), id (B,)); id −1 when the index is empty.

        FAISS proposes `candidates` nearest masks; their exact overlap decides (ties: lowest id)."""
        B = queries.shape[0]
        if len(self) == 0:
            return torch.zeros(B, dtype=torch.long), torch.full((B,), -1, dtype=torch.long)
        q = pack_masks(queries)
        _, ids = self._faiss.search(q, min(self.candidates, len(self)))  # (B, n)
        return self._best_of(q, ids)

    def exhaustive(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same answer by scanning every stored mask (the reference for the pre-filter)."""
        B = queries.shape[0]
        if len(self) == 0:
            return torch.zeros(B, dtype=torch.long), torch.full((B,), -1, dtype=torch.long)
        if self._dense is None:
            self._dense = unpack_masks(self.packed, self.n_bits).float()
        overlap = queries.float() @ self._dense.t()  # (B, N)
        best = overlap.max(1)
        return best.values.long(), best.indices

    def _best_of(self, q: np.ndarray, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.where(ids < 0, 0, ids)
        cand = self.packed[ids]  # (B, n, bytes)
        common = np.unpackbits(np.bitwise_and(cand, q[:, None, :]), axis=2).sum(2)  # (B, n)
        # argmax over (overlap, −id): the highest overlap, then the lowest id
        order = common.astype(np.int64) * (len(self) + 1) - ids
        pick = order.argmax(1)
        rows = np.arange(ids.shape[0])
        return torch.from_numpy(common[rows, pick].astype(np.int64)), torch.from_numpy(ids[rows, pick].astype(np.int64))


# ---- persisted indexes: derived files beside the objects, rebuilt from the masks at will ----------

def write_index(index: MaskIndex, path: Path) -> None:
    """Write the FAISS index atomically (temp file + rename): a reader sees the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    faiss.write_index_binary(index._faiss, str(tmp))
    os.replace(tmp, path)


def read_index(path: Path, masks: torch.Tensor, kind: str = "flat") -> MaskIndex | None:
    """The index stored at `path` for these masks, or None when it is missing or does not hold
    exactly them (a flat index keeps its codes, which are compared byte for byte)."""
    if not path.exists():
        return None
    try:
        stored = faiss.read_index_binary(str(path))
    except RuntimeError:
        return None
    index = MaskIndex(masks.shape[1], kind)
    index.packed = pack_masks(masks)
    if stored.ntotal != len(index.packed) or stored.d != index.n_bits:
        return None
    if isinstance(stored, faiss.IndexBinaryFlat):
        codes = faiss.vector_to_array(stored.xb).reshape(-1, index.n_bits // 8)
        if not np.array_equal(codes, index.packed):
            return None
    index._faiss = stored
    return index


# ---- WISE-Retrieve routing keys: float keys tagged with their memory -----------------------------

def key_ids(counts: list[int]) -> np.ndarray:
    """FAISS ids of the keys of memories holding `counts` edits each: memory << 32 | position, so a
    search answers with the memory directly and the id names one edit of one shard object."""
    if not counts:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([(np.int64(m) << 32) + np.arange(n, dtype=np.int64) for m, n in enumerate(counts)])


def _normalised(keys: torch.Tensor) -> np.ndarray:
    out = np.ascontiguousarray(keys.detach().to("cpu", torch.float32).numpy()).copy()
    faiss.normalize_L2(out)
    return out


class KeyIndex:
    """Routing keys of stored edits, searchable by cosine similarity to a query key. `vectors` (N, d)
    are the L2-normalised keys (what the index holds, compared with the store by `same_as`)."""

    def __init__(self, vectors: np.ndarray, ids: np.ndarray, built=None) -> None:
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise ValueError(f"one id per key row expected: keys {vectors.shape}, {len(ids)} ids")
        self.vectors, self.ids = vectors, np.asarray(ids, dtype=np.int64)
        self.dim = int(vectors.shape[1])
        if built is None:
            built = faiss.IndexIDMap(faiss.IndexFlatIP(self.dim))
            if len(self.ids):
                built.add_with_ids(vectors, self.ids)
        self._faiss = built

    @classmethod
    def build(cls, keys: torch.Tensor, ids: np.ndarray) -> KeyIndex:
        return cls(_normalised(keys), ids)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: torch.Tensor, n: int) -> torch.Tensor:
        """(B, n) memories of each query's n nearest stored keys, nearest first (−1 past the end)."""
        B = queries.shape[0]
        if not len(self) or n <= 0:
            return torch.full((B, max(n, 0)), -1, dtype=torch.long)
        _, ids = self._faiss.search(_normalised(queries), n)  # (B, n)
        return torch.from_numpy(np.where(ids < 0, -1, ids >> 32))

    def same_as(self, other: KeyIndex) -> bool:
        return self.dim == other.dim and np.array_equal(self.ids, other.ids) and np.array_equal(self.vectors, other.vectors)


def write_key_index(index: KeyIndex, path: Path) -> None:
    """Write atomically (temp file + rename), as `write_index`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    faiss.write_index(index._faiss, str(tmp))
    os.replace(tmp, path)


def read_key_index(path: Path) -> KeyIndex | None:
    """The key index stored at `path` (None when missing or unreadable); compare it with the store's
    keys (`same_as`) before trusting it."""
    if not path.exists():
        return None
    try:
        stored = faiss.read_index(str(path))
        flat = faiss.downcast_index(stored.index)
        vectors, ids = flat.reconstruct_n(0, stored.ntotal), faiss.vector_to_array(stored.id_map)
    except (RuntimeError, AttributeError):
        return None
    return KeyIndex(vectors.reshape(-1, stored.d), ids, stored)

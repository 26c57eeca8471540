"""Content-addressed tensor objects: safetensors files named by the sha256 of their bytes.

    objects/ab/cdef…     one loose object per file (dulwich-style); written to a temp name
                         (`.tmp-*`), fsynced and renamed, so a reader never sees half a file.

A blob carries its metadata under one safetensors header key ("wisemem", canonical JSON), so a
shard opens with `safetensors.safe_open` alone. Reads re-hash: a flipped byte is a ChecksumMismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ChecksumMismatch, IntegrityError, UnknownRef
from .faults import fault_point

OID_RE = re.compile(r"^[0-9a-f]{64}$")
TEMP_PREFIX = ".tmp-"


def canonical_json(obj: Any) -> str:
    """The one JSON spelling hashed into ids: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


class ObjectStore:
    """Loose safetensors objects under `root/objects/ab/cdef…`; id = sha256 hex of the file bytes."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root) / "objects"

    def path(self, oid: str) -> Path:
        if not OID_RE.match(oid):
            raise UnknownRef(oid)
        return self.root / oid[:2] / oid[2:]

    def __contains__(self, oid: object) -> bool:
        return isinstance(oid, str) and bool(OID_RE.match(oid)) and self.path(oid).is_file()

    def iter_ids(self) -> Iterator[str]:
        """Every object id on disk (temp files from interrupted writes are skipped)."""
        for f in sorted(self.root.glob("??/*")):
            if OID_RE.match(oid := f.parent.name + f.name):
                yield oid

    def iter_temp(self) -> Iterator[Path]:
        """Leftovers of interrupted writes: never referenced, safe to delete."""
        yield from sorted(self.root.glob(f"??/{TEMP_PREFIX}*"))

    def size(self, oid: str) -> int:
        return self.path(oid).stat().st_size

    def delete(self, oid: str) -> None:
        self.path(oid).unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> str:
        """Write `data` atomically (temp file, fsync, os.replace); idempotent."""
        oid = hashlib.sha256(data).hexdigest()
        final = self.path(oid)
        if final.is_file():
            return oid
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=TEMP_PREFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            fault_point("during-object-write")
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return oid

    def get_bytes(self, oid: str) -> bytes:
        """The object's bytes, re-hashed: raises IntegrityError if missing, ChecksumMismatch if corrupt."""
        try:
            data = self.path(oid).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"object {oid} is missing; run `wisemem fsck`") from None
        if (got := hashlib.sha256(data).hexdigest()) != oid:
            raise ChecksumMismatch(oid, oid, got)
        return data

    def verify(self, oid: str) -> None:
        """Raise IntegrityError / ChecksumMismatch unless the object is present and intact."""
        self.get_bytes(oid)

    def put_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
        """Save tensors (as contiguous CPU copies) with `meta` under the "wisemem" metadata key."""
        # clone(): safetensors refuses tensors that share storage (tied weights, views).
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        return self.put_bytes(st_save(flat, metadata={"wisemem": canonical_json(meta)}))

    def get_tensors(self, oid: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        data = self.get_bytes(oid)
        return st_load(data), header_meta(data)

    def get_meta(self, oid: str) -> dict[str, Any]:
        """The metadata of an object, checked against its hash."""
        return header_meta(self.get_bytes(oid))


def header_meta(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])  # safetensors header: u64 length + JSON
    header = json.loads(data[8 : 8 + n])
    return json.loads(header.get("__metadata__", {}).get("wisemem", "{}"))

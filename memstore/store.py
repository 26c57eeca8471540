"""The on-disk store: content-addressed tensor objects, a SQL catalog of commits, and refs.

A store directory (usually `.wisemem/`) holds

    objects/ab/cdef…    safetensors files named by the sha256 of their bytes (dulwich-style loose objects)
    catalog.sqlite      SQLAlchemy Core tables: meta, binding, commits, edits, refs, settings
    catalog.url         optional: a SQLAlchemy URL used instead of catalog.sqlite
    lock                flock()ed by writers (`with store.lock(): ...`)

Commits are immutable rows whose id is the sha256 of their canonical JSON. Branches move only
by compare-and-swap inside the transaction that inserts the commit (dulwich `set_if_equals`),
so two writers can never lose each other's work: the loser gets `ConcurrentUpdate`.

    store = Store.init(".wisemem", {"model_id": "gpt2", "module_path": "transformer.h.8.mlp.c_proj", "layer": 8})
    oid = store.objects.put_tensors({"w": torch.zeros(4, 4)}, {"kind": "shard"})
    cid = store.create_commit(store.head(), "first", None, "wise", "{}", json.dumps({"shards": [oid]}), [], [])
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memstore.errors import (AmbiguousRef, ChecksumMismatch, ConcurrentUpdate, ConfigError, IntegrityError,
                             LockTimeout, SchemaVersionMismatch, StoreExists, StoreNotFound, UnknownRef)

SCHEMA_VERSION = "1"
DEFAULT_BRANCH = "refs/heads/main"
SYMREF_PREFIX = "ref: "
MIN_PREFIX = 4
_OID_RE = re.compile(r"^[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_SUFFIX_RE = re.compile(r"([~^])(\d*)")


def canonical_json(obj: Any) -> str:
    """The one JSON spelling hashed into ids: sorted keys, no whitespace."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def utc_now() -> str:
    """UTC ISO-8601 timestamp, second precision (e.g. 2025-01-01T12:00:00+00:00)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_author() -> str:
    """`WISEMEM_AUTHOR` if set, else the login name."""
    return os.environ.get("WISEMEM_AUTHOR") or getpass.getuser()


# -- Objects ---------------------------------------------------------------------------------


class ObjectStore:
    """Loose safetensors objects under `root/objects/ab/cdef…`; id = sha256 hex of the file bytes."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root) / "objects"

    def path(self, oid: str) -> Path:
        if not _OID_RE.match(oid):
            raise UnknownRef(oid)
        return self.root / oid[:2] / oid[2:]

    def __contains__(self, oid: object) -> bool:
        return isinstance(oid, str) and bool(_OID_RE.match(oid)) and self.path(oid).is_file()

    def iter_ids(self) -> Iterator[str]:
        """Every object id on disk (temp files from interrupted writes are skipped)."""
        for f in sorted(self.root.glob("??/*")):
            if _OID_RE.match(oid := f.parent.name + f.name):
                yield oid

    def put_bytes(self, data: bytes) -> str:
        """Write `data` atomically (temp file, fsync, os.replace); idempotent."""
        oid = hashlib.sha256(data).hexdigest()
        final = self.path(oid)
        if final.is_file():
            return oid
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
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

    def put_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
        """Save tensors (as contiguous CPU copies) with `meta` under the "wisemem" metadata key."""
        # clone(): safetensors refuses tensors that share storage (tied weights, views).
        flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
        return self.put_bytes(st_save(flat, metadata={"wisemem": canonical_json(meta)}))

    def get_tensors(self, oid: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        data = self.get_bytes(oid)
        (n,) = struct.unpack("<Q", data[:8])  # safetensors header: u64 length + JSON
        header = json.loads(data[8 : 8 + n])
        meta = json.loads(header.get("__metadata__", {}).get("wisemem", "{}"))
        return st_load(data), meta


# -- Catalog ---------------------------------------------------------------------------------


class Catalog:
    """SQLAlchemy Core tables of one store; portable SQL, SQLite PRAGMAs only on SQLite."""

    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        md = self.metadata = sa.MetaData()
        T, Int, NN = sa.Text, sa.Integer, {"nullable": False}
        self.meta = sa.Table("meta", md, sa.Column("key", T, primary_key=True), sa.Column("value", T, **NN))
        self.binding = sa.Table(  # exactly one row, id = 1
            "binding", md, sa.Column("id", Int, primary_key=True),
            sa.Column("model_id", T, **NN), sa.Column("revision", T), sa.Column("module_path", T, **NN),
            sa.Column("layer", Int, **NN), sa.Column("weight_hash", T), sa.Column("config_json", T),
            sa.Column("created_at", T, **NN),
        )  # fmt: skip
        self.commits = sa.Table(  # immutable: insert only
            "commits", md, sa.Column("id", T, primary_key=True),
            sa.Column("parent_id", T, sa.ForeignKey("commits.id"), nullable=True),
            sa.Column("message", T, **NN), sa.Column("author", T, **NN), sa.Column("created_at", T, **NN),
            sa.Column("method", T, **NN), sa.Column("config_json", T, **NN), sa.Column("state_json", T, **NN),
        )  # fmt: skip
        self.edits = sa.Table(
            "edits", md, sa.Column("commit_id", T, sa.ForeignKey("commits.id"), primary_key=True),
            sa.Column("position", Int, primary_key=True), sa.Column("edit_id", T, **NN),
            sa.Column("record_json", T, **NN),
        )  # fmt: skip
        self.refs = sa.Table("refs", md, sa.Column("name", T, primary_key=True), sa.Column("target", T, **NN))
        self.settings = sa.Table("settings", md, sa.Column("key", T, primary_key=True), sa.Column("value", T, **NN))

    def exists(self) -> bool:
        return sa.inspect(self.engine).has_table("meta")

    def create(self) -> None:
        self.metadata.create_all(self.engine)
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.meta).values(key="schema_version", value=SCHEMA_VERSION))

    def check_schema(self) -> None:
        """Refuse a catalog written with another schema version."""
        found: str | None = None
        if self.exists():
            with self.engine.connect() as conn:
                found = conn.execute(
                    sa.select(self.meta.c.value).where(self.meta.c.key == "schema_version")
                ).scalar_one_or_none()
        if found != SCHEMA_VERSION:
            raise SchemaVersionMismatch(
                f"store catalog {self.url} has schema version {found or 'none'}, but this wisemem reads "
                f"version {SCHEMA_VERSION}; use a matching wisemem version or re-create the store"
            )

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()


# -- Store -----------------------------------------------------------------------------------

_BINDING_KEYS = {"model_id", "revision", "module_path", "layer", "weight_hash", "config_json", "config"}


class Store:
    """Objects + catalog + refs of one store directory. Use `Store.init` / `Store.open`."""

    def __init__(self, path: Path, catalog: Catalog):
        self.path = path
        self.catalog = catalog
        self.objects = ObjectStore(path)
        self._lock_depth = 0

    # -- lifecycle ----------------------------------------------------------------------------

    @staticmethod
    def _catalog_url(path: Path, url: str | None = None) -> str:
        if url is not None:
            return url
        url_file = path / "catalog.url"
        if url_file.is_file():
            return url_file.read_text().strip()
        return f"sqlite:///{path / 'catalog.sqlite'}"

    @classmethod
    def init(cls, path: str | os.PathLike[str], binding: dict[str, Any], *, catalog_url: str | None = None) -> Store:
        """Create a store at `path`: objects/, catalog, binding row, HEAD -> refs/heads/main (unborn)."""
        p = Path(path)
        if (p / "catalog.sqlite").exists() or (p / "catalog.url").exists():
            raise StoreExists(f"a wisemem store already exists at {p}")
        row = _binding_row(binding)
        (p / "objects").mkdir(parents=True, exist_ok=True)
        catalog = Catalog(cls._catalog_url(p, catalog_url))
        if catalog.exists():
            catalog.dispose()
            raise StoreExists(f"a wisemem catalog already exists at {catalog.url}")
        if catalog_url is not None:
            (p / "catalog.url").write_text(catalog_url + "\n")
        catalog.create()
        with catalog.engine.begin() as conn:
            conn.execute(sa.insert(catalog.binding).values(id=1, created_at=utc_now(), **row))
            conn.execute(sa.insert(catalog.refs).values(name="HEAD", target=SYMREF_PREFIX + DEFAULT_BRANCH))
        return cls(p, catalog)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open an existing store; StoreNotFound if absent, SchemaVersionMismatch if incompatible."""
        p = Path(path)
        if not (p / "catalog.sqlite").is_file() and not (p / "catalog.url").is_file():
            raise StoreNotFound(f"no wisemem store at {p}; run `wisemem init` first")
        catalog = Catalog(cls._catalog_url(p))
        try:
            catalog.check_schema()
        except BaseException:
            catalog.dispose()
            raise
        return cls(p, catalog)

    def close(self) -> None:
        self.catalog.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- binding & settings ---------------------------------------------------------------------

    @property
    def binding(self) -> dict[str, Any]:
        """The base model this store is bound to (columns of the single binding row, minus id)."""
        with self.catalog.engine.connect() as conn:
            row = conn.execute(sa.select(self.catalog.binding)).mappings().one()
        return {k: v for k, v in row.items() if k != "id"}

    def get_setting(self, key: str) -> str | None:
        t = self.catalog.settings
        with self.catalog.engine.connect() as conn:
            return conn.execute(sa.select(t.c.value).where(t.c.key == key)).scalar_one_or_none()

    def set_setting(self, key: str, value: str | None) -> None:
        """Set `key` to `value`; None deletes it."""
        t = self.catalog.settings
        with self.catalog.engine.begin() as conn:
            conn.execute(sa.delete(t).where(t.c.key == key))
            if value is not None:
                conn.execute(sa.insert(t).values(key=key, value=value))

    # -- refs -------------------------------------------------------------------------------------

    def _read_ref(self, conn: sa.Connection, name: str) -> str | None:
        t = self.catalog.refs
        return conn.execute(sa.select(t.c.target).where(t.c.name == name)).scalar_one_or_none()

    def _follow(self, conn: sa.Connection, name: str) -> tuple[str, str | None]:
        """(last ref name in the symbolic chain, commit id it holds or None if unborn)."""
        for _ in range(5):
            target = self._read_ref(conn, name)
            if target is None or not target.startswith(SYMREF_PREFIX):
                return name, target
            name = target[len(SYMREF_PREFIX) :]
        raise IntegrityError(f"symbolic ref loop at {name}; run `wisemem fsck`")

    def get_ref(self, name: str) -> str | None:
        """The commit id `name` resolves to (following symbolic refs), None if absent/unborn."""
        with self.catalog.engine.connect() as conn:
            return self._follow(conn, name)[1]

    def list_refs(self, prefix: str = "refs/") -> dict[str, str]:
        t = self.catalog.refs
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.name, t.c.target).where(t.c.name.startswith(prefix)))
            return {name: target for name, target in rows}

    def head(self) -> str | None:
        return self.get_ref("HEAD")

    def head_branch(self) -> str | None:
        """Full name of the branch HEAD points at (e.g. "refs/heads/main"); None if detached."""
        with self.catalog.engine.connect() as conn:
            target = self._read_ref(conn, "HEAD")
        return target[len(SYMREF_PREFIX) :] if target and target.startswith(SYMREF_PREFIX) else None

    def set_head(self, target: str) -> None:
        """Point HEAD at a branch ("refs/heads/x", symbolic) or a commit id (detached)."""
        value = target if _OID_RE.match(target) else SYMREF_PREFIX + target
        with self.catalog.engine.begin() as conn:
            conn.execute(sa.update(self.catalog.refs).where(self.catalog.refs.c.name == "HEAD").values(target=value))

    def _cas(self, conn: sa.Connection, name: str, old: str | None, new: str | None) -> None:
        t = self.catalog.refs
        if old is None and new is not None:
            try:  # the PK makes this the CAS; on failure the caller's transaction rolls back
                conn.execute(sa.insert(t).values(name=name, target=new))
                return
            except sa.exc.IntegrityError:
                raise ConcurrentUpdate(f"{name} already exists; expected it to be unborn") from None
        where = (t.c.name == name) & (t.c.target == old)
        stmt = sa.delete(t).where(where) if new is None else sa.update(t).where(where).values(target=new)
        if conn.execute(stmt).rowcount != 1:
            raise ConcurrentUpdate(f"{name} moved: expected {old}; re-read it and retry")

    def set_ref(self, name: str, new: str | None, old: str | None) -> None:
        """Compare-and-swap `name` from `old` (None = must not exist) to `new` (None = delete)."""
        with self.catalog.engine.begin() as conn:
            self._cas(conn, name, old, new)

    # -- commits ----------------------------------------------------------------------------------

    def create_commit(
        self, parent_id: str | None, message: str, author: str | None, method: str, config_json: str,
        state_json: str, edit_records: list[dict[str, Any]], edit_ids: list[str],
    ) -> str:  # fmt: skip
        """Insert a commit + its edits and advance the current branch (or detached HEAD) by CAS
        from `parent_id`, all in one transaction; ConcurrentUpdate (nothing written) if it moved."""
        if len(edit_records) != len(edit_ids):
            raise ConfigError(f"{len(edit_records)} edit records but {len(edit_ids)} edit ids")
        row = dict(parent_id=parent_id, message=message, author=author or default_author(), created_at=utc_now(),
                   method=method, config_json=config_json, state_json=state_json)  # fmt: skip
        cid = hashlib.sha256(canonical_json({**row, "edits": edit_records}).encode()).hexdigest()
        c = self.catalog
        with c.engine.begin() as conn:
            head = self._read_ref(conn, "HEAD")
            ref = head[len(SYMREF_PREFIX) :] if head and head.startswith(SYMREF_PREFIX) else "HEAD"
            self._cas(conn, ref, parent_id, cid)
            try:
                conn.execute(sa.insert(c.commits).values(id=cid, **row))
            except sa.exc.IntegrityError as err:
                msg = f"commit {cid[:12]} not inserted (duplicate or missing parent): {err.orig}"
                raise ConcurrentUpdate(msg) from None
            rows = [dict(commit_id=cid, position=i, edit_id=e, record_json=canonical_json(r))
                    for i, (r, e) in enumerate(zip(edit_records, edit_ids))]  # fmt: skip
            if rows:
                conn.execute(sa.insert(c.edits), rows)
        return cid

    def get_commit(self, commit_id: str, *, with_edits: bool = True) -> dict[str, Any]:
        """Commit row as a dict; with `edits` (record dicts) and `edit_ids` in position order."""
        c = self.catalog
        with c.engine.connect() as conn:
            row = conn.execute(sa.select(c.commits).where(c.commits.c.id == commit_id)).mappings().one_or_none()
            if row is None:
                raise UnknownRef(commit_id)
            out = dict(row)
            if with_edits:
                rows = conn.execute(
                    sa.select(c.edits.c.edit_id, c.edits.c.record_json)
                    .where(c.edits.c.commit_id == commit_id)
                    .order_by(c.edits.c.position)
                ).all()
                out["edit_ids"] = [r.edit_id for r in rows]
                out["edits"] = [json.loads(r.record_json) for r in rows]
        return out

    def log(
        self, start_id: str | None, *, max_count: int | None = None, with_edits: bool = False
    ) -> list[dict[str, Any]]:
        """First-parent history from `start_id`, newest first ([] for None / unborn)."""
        out: list[dict[str, Any]] = []
        cur = start_id
        while cur is not None and (max_count is None or len(out) < max_count):
            commit = self.get_commit(cur, with_edits=with_edits)
            out.append(commit)
            cur = commit["parent_id"]
        return out

    # -- revision parsing -------------------------------------------------------------------------

    def resolve(self, spec: str) -> str:
        """Commit id for: full id, unique hex prefix (>= 4), HEAD, branch/tag (short or full name),
        each optionally followed by ~N / ^ / ^1 steps along first parents."""
        m = re.fullmatch(r"([^~^]+)((?:[~^]\d*)*)", spec)
        if m is None:
            raise UnknownRef(spec)
        base, steps = m.group(1), 0
        for op, num in _SUFFIX_RE.findall(m.group(2)):
            n = int(num) if num else 1
            if op == "^" and n > 1:  # commits have a single parent
                raise UnknownRef(spec)
            steps += n
        cid = self._resolve_base(base, spec)
        for _ in range(steps):
            parent = self.get_commit(cid, with_edits=False)["parent_id"]
            if parent is None:
                raise UnknownRef(spec)
            cid = parent
        return cid

    def _resolve_base(self, base: str, spec: str) -> str:
        c = self.catalog
        with c.engine.connect() as conn:
            for name in (base, f"refs/{base}", f"refs/tags/{base}", f"refs/heads/{base}"):
                if name == "HEAD" or name.startswith("refs/"):
                    if self._read_ref(conn, name) is not None:
                        target = self._follow(conn, name)[1]
                        if target is None:  # unborn branch
                            raise UnknownRef(spec)
                        return target
            h = base.lower()
            if len(h) < MIN_PREFIX or not _HEX_RE.match(h):
                raise UnknownRef(spec)
            q = sa.select(c.commits.c.id).where(c.commits.c.id.startswith(h)).limit(10)
            ids = list(conn.execute(q).scalars())
        if not ids:
            raise UnknownRef(spec)
        if len(ids) > 1:
            raise AmbiguousRef(base, sorted(ids))
        return ids[0]

    # -- locking ----------------------------------------------------------------------------------

    @contextmanager
    def lock(self, timeout: float = 30.0) -> Iterator[None]:
        """Exclusive writer lock (flock on `<store>/lock`), re-entrant within this Store."""
        import fcntl  # POSIX only

        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        f = open(self.path / "lock", "a+b")  # noqa: SIM115 - held for the with-block
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(
                            f"another wisemem process is writing to this store (waited {timeout:g}s); "
                            "retry or raise --lock-timeout"
                        ) from None
                    time.sleep(0.05)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            f.close()


def _binding_row(binding: dict[str, Any]) -> dict[str, Any]:
    unknown = set(binding) - _BINDING_KEYS
    if unknown:
        raise ConfigError(f"unknown binding keys {sorted(unknown)}; expected some of {sorted(_BINDING_KEYS)}")
    missing = {"model_id", "module_path", "layer"} - set(binding)
    if missing:
        raise ConfigError(f"binding is missing {sorted(missing)}")
    row = {k: binding.get(k) for k in ("model_id", "revision", "module_path", "layer", "weight_hash", "config_json")}
    if row["config_json"] is None and binding.get("config") is not None:
        row["config_json"] = canonical_json(binding["config"])
    row["layer"] = int(row["layer"])
    return row

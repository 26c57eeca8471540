"""The on-disk store: content-addressed tensor objects, a SQL catalog of commits, and refs.

A store directory (usually `.wisemem/`) holds

    objects/ab/cdef…    safetensors files named by the sha256 of their bytes (objects.py)
    catalog.sqlite      SQLAlchemy Core tables (catalog.py)
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
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from memstore.catalog import SCHEMA_VERSION, Catalog
from memstore.errors import (AmbiguousRef, ConcurrentUpdate, ConfigError, IntegrityError, LockTimeout, StoreExists,
                             StoreNotFound, UnknownRef)
from memstore.faults import fault_point
from memstore.objects import OID_RE, ObjectStore, canonical_json

__all__ = ["SCHEMA_VERSION", "Catalog", "ObjectStore", "Store", "canonical_json"]

DEFAULT_BRANCH = "refs/heads/main"
SYMREF_PREFIX = "ref: "
MIN_PREFIX = 4
_OID_RE = OID_RE
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_SUFFIX_RE = re.compile(r"([~^])(\d*)")


def utc_now() -> str:
    """UTC ISO-8601 timestamp, second precision (e.g. 2025-01-01T12:00:00+00:00)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_author() -> str:
    """`WISEMEM_AUTHOR` if set, else the login name."""
    return os.environ.get("WISEMEM_AUTHOR") or getpass.getuser()


# -- Store -----------------------------------------------------------------------------------

_BINDING_KEYS = {"model_id", "revision", "module_path", "layer", "weight_hash", "config_json", "config"}

# Called with the store each time HEAD moves (commit, checkout, reset), after the catalog
# transaction: files derived from HEAD's memory (the wise-retrieve key index) register here, so
# that no verb which moves HEAD can leave them stale. Each hook decides whether the store is its.
HEAD_MOVED_HOOKS: list[Callable[[Store], Any]] = []


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
        """`url`, else the store's catalog.url file, else $WISEMEM_CATALOG, else catalog.sqlite."""
        if url is not None:
            return url
        url_file = path / "catalog.url"
        if url_file.is_file():
            return url_file.read_text().strip()
        return os.environ.get("WISEMEM_CATALOG") or f"sqlite:///{path / 'catalog.sqlite'}"

    @classmethod
    def exists_at(cls, path: str | os.PathLike[str]) -> bool:
        """True if `path` holds an initialised store (a catalog with its tables: an init that
        was interrupted before its one transaction committed does not count)."""
        p = Path(path)
        if not ((p / "catalog.sqlite").is_file() or (p / "catalog.url").is_file()):
            return False
        catalog = Catalog(cls._catalog_url(p))
        try:
            return catalog.exists()
        except sa.exc.DatabaseError:
            return True  # something is there but unreadable: `open` reports it
        finally:
            catalog.dispose()

    @classmethod
    def init(cls, path: str | os.PathLike[str], binding: dict[str, Any], *, catalog_url: str | None = None) -> Store:
        """Create a store at `path`: objects/, catalog, binding row, HEAD -> refs/heads/main (unborn)."""
        p = Path(path)
        if cls.exists_at(p):
            raise StoreExists(f"a wisemem store already exists at {p}")
        catalog_url = catalog_url or os.environ.get("WISEMEM_CATALOG")
        row = _binding_row(binding)
        (p / "objects").mkdir(parents=True, exist_ok=True)
        catalog = Catalog(cls._catalog_url(p, catalog_url))
        if catalog.exists():
            catalog.dispose()
            raise StoreExists(f"a wisemem catalog already exists at {catalog.url}")
        if catalog_url is not None:
            (p / "catalog.url").write_text(catalog_url + "\n")
        catalog.create({catalog.binding: [dict(id=1, created_at=utc_now(), **row)],
                        catalog.refs: [dict(name="HEAD", target=SYMREF_PREFIX + DEFAULT_BRANCH)]})
        return cls(p, catalog)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open an existing store; StoreNotFound if absent, SchemaVersionMismatch if incompatible,
        IntegrityError if its SQLite catalog is not a readable database."""
        p = Path(path)
        if not cls.exists_at(p):
            raise StoreNotFound(f"no wisemem store at {p}; run `wisemem init` first")
        catalog = Catalog(cls._catalog_url(p))
        try:
            catalog.check_schema()
        except sa.exc.DatabaseError as exc:
            catalog.dispose()
            # A damaged or foreign catalog.sqlite ("file is not a database", "malformed") is damage
            # to the store; a locked or unreachable database (OperationalError) is not.
            if isinstance(exc, sa.exc.OperationalError) or catalog.engine.dialect.name != "sqlite":
                raise
            msg = f"catalog {catalog.url} cannot be read ({exc.orig}); restore it from a backup"
            raise IntegrityError(msg) from None
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
        """Refs whose name starts with `prefix` literally: LIKE wildcards in it are escaped, and the
        exact-case check in Python keeps SQLite (case-insensitive LIKE) in line with PostgreSQL."""
        t = self.catalog.refs
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.name, t.c.target).where(t.c.name.startswith(prefix, autoescape=True)))
            return {name: target for name, target in rows if name.startswith(prefix)}

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
        self._head_moved()

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
            moves_head = name in ("HEAD", self._follow(conn, "HEAD")[0])  # read in the CAS's transaction
        if moves_head:
            self._head_moved()

    def _head_moved(self) -> None:
        for hook in HEAD_MOVED_HOOKS:
            hook(self)

    # -- commits ----------------------------------------------------------------------------------

    def create_commit(
        self, parent_id: str | None, message: str, author: str | None, method: str, config_json: str,
        state_json: str, edit_records: list[dict[str, Any]], edit_ids: list[str], *,
        merge_parent: str | None = None, removed: Sequence[tuple[str, dict[str, Any]]] = (),
        shards: Sequence[dict[str, Any]] = (), sources: Sequence[dict[str, Any]] = (), clear_staging: bool = False,
        evaluation: dict[str, Any] | None = None,
    ) -> str:  # fmt: skip
        """Insert a commit, its parents, edits (added, and `removed` by a revert) and shard rows
        (`shards`: its state's, in order; `sources`: shards its new merged shards were merged from),
        and advance the current branch (or detached HEAD) by CAS from `parent_id`, all in one
        transaction: either everything lands or nothing does (ConcurrentUpdate if HEAD moved)."""
        if len(edit_records) != len(edit_ids):
            raise ConfigError(f"{len(edit_records)} edit records but {len(edit_ids)} edit ids")
        if "\x00" in message or "\x00" in (author or ""):  # as git; PostgreSQL text cannot hold NUL
            raise ConfigError("a commit message or author cannot contain NUL characters")
        row = dict(parent_id=parent_id, message=message, author=author or default_author(), created_at=utc_now(),
                   method=method, config_json=config_json, state_json=state_json)  # fmt: skip
        parents = [p for p in (parent_id, merge_parent) if p is not None]
        cid = commit_hash({**row, "edits": edit_records, "parents": parents, "removed": [e for e, _ in removed]})
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
            fault_point("during-catalog-write")
            if parents:
                conn.execute(sa.insert(c.commit_parents),
                             [dict(commit_id=cid, position=i, parent_id=p) for i, p in enumerate(parents)])
            rows = [dict(commit_id=cid, position=i, edit_id=e, op="add", record_json=canonical_json(r))
                    for i, (r, e) in enumerate(zip(edit_records, edit_ids))]  # fmt: skip
            rows += [dict(commit_id=cid, position=len(rows) + i, edit_id=e, op="remove", record_json=canonical_json(r))
                     for i, (e, r) in enumerate(removed)]  # fmt: skip
            if rows:
                conn.execute(sa.insert(c.edits), rows)
            self._insert_shards(conn, None, sources)
            self._insert_shards(conn, cid, shards)
            if clear_staging:
                conn.execute(sa.delete(c.staging))
            if evaluation is not None:
                conn.execute(sa.insert(c.evaluations).values(commit_id=cid, created_at=utc_now(),
                                                             source=evaluation["source"],
                                                             metrics_json=canonical_json(evaluation["metrics"])))
        self._head_moved()
        return cid

    def _insert_shards(self, conn: sa.Connection, cid: str | None, shards: Sequence[dict[str, Any]]) -> None:
        c = self.catalog
        for i, shard in enumerate(shards):
            known = conn.execute(sa.select(c.shards.c.object_id).where(c.shards.c.object_id == shard["object_id"]))
            if known.first() is None:
                conn.execute(sa.insert(c.shards).values(**shard))
            if cid is not None:
                conn.execute(sa.insert(c.commit_shards).values(commit_id=cid, position=i, object_id=shard["object_id"]))

    def delete_shard_rows(self, object_ids: Sequence[str]) -> None:
        """Forget shard rows no commit uses (gc, after their objects are gone)."""
        c = self.catalog
        with c.engine.begin() as conn:
            used = set(conn.execute(sa.select(c.commit_shards.c.object_id)).scalars())
            gone = [o for o in object_ids if o not in used]
            for start in range(0, len(gone), 500):
                conn.execute(sa.delete(c.shards).where(c.shards.c.object_id.in_(gone[start:start + 500])))

    def get_commit(self, commit_id: str, *, with_edits: bool = True) -> dict[str, Any]:
        """Commit row as a dict, with `parents`; with `edits` (record dicts added), `edit_ids`, and
        `removed` (edit ids a revert took out) in position order."""
        c = self.catalog
        with c.engine.connect() as conn:
            row = conn.execute(sa.select(c.commits).where(c.commits.c.id == commit_id)).mappings().one_or_none()
            if row is None:
                raise UnknownRef(commit_id)
            out = dict(row)
            out["parents"] = list(conn.execute(
                sa.select(c.commit_parents.c.parent_id).where(c.commit_parents.c.commit_id == commit_id)
                .order_by(c.commit_parents.c.position)).scalars())  # fmt: skip
            if with_edits:
                rows = conn.execute(
                    sa.select(c.edits.c.edit_id, c.edits.c.op, c.edits.c.record_json)
                    .where(c.edits.c.commit_id == commit_id)
                    .order_by(c.edits.c.position)
                ).all()
                out["edit_ids"] = [r.edit_id for r in rows if r.op == "add"]
                out["edits"] = [json.loads(r.record_json) for r in rows if r.op == "add"]
                out["removed"] = [r.edit_id for r in rows if r.op == "remove"]
        return out

    def commit_shard_ids(self, commit_id: str) -> list[str]:
        t = self.catalog.commit_shards
        with self.catalog.engine.connect() as conn:
            q = sa.select(t.c.object_id).where(t.c.commit_id == commit_id).order_by(t.c.position)
            return list(conn.execute(q).scalars())

    def edit_records(self, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Records by edit key ("<edit_id>:<sha256 of its canonical record>[:16]") as stored on commit."""
        c, out = self.catalog, {}
        ids = sorted({k.split(":", 1)[0] for k in keys})
        with c.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(sa.select(c.edits.c.edit_id, c.edits.c.record_json)
                                    .where(c.edits.c.edit_id.in_(ids[start:start + 500])) .where(c.edits.c.op == "add"))
                for r in rows:
                    out[edit_key(r.edit_id, json.loads(r.record_json))] = json.loads(r.record_json)
        return {k: out[k] for k in keys if k in out}

    def all_commits(self) -> list[dict[str, Any]]:
        """Every commit row (reachable or not), without edits."""
        c = self.catalog
        with c.engine.connect() as conn:
            return [dict(r) for r in conn.execute(sa.select(c.commits).order_by(c.commits.c.created_at)).mappings()]

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

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """True if `ancestor` is reachable from `descendant` along any parents."""
        seen, todo = set(), [descendant]
        while todo:
            cur = todo.pop()
            if cur == ancestor:
                return True
            if cur in seen:
                continue
            seen.add(cur)
            todo.extend(self.get_commit(cur, with_edits=False)["parents"])
        return False

    # -- staging & evaluations ---------------------------------------------------------------------

    def get_staged(self) -> dict[str, Any] | None:
        with self.catalog.engine.connect() as conn:
            row = conn.execute(sa.select(self.catalog.staging)).mappings().one_or_none()
        return dict(row) if row else None

    def set_staged(self, row: dict[str, Any] | None, shards: Sequence[dict[str, Any]] = ()) -> None:
        """Replace what is staged (None: clear it); `shards`: catalog rows of its shard objects."""
        with self.catalog.engine.begin() as conn:
            conn.execute(sa.delete(self.catalog.staging))
            if row is not None:
                self._insert_shards(conn, None, shards)
                conn.execute(sa.insert(self.catalog.staging).values(id=1, created_at=utc_now(), **row))

    def add_evaluation(self, commit_id: str, source: str, metrics: dict[str, Any]) -> None:
        with self.catalog.engine.begin() as conn:
            conn.execute(sa.insert(self.catalog.evaluations).values(
                commit_id=commit_id, created_at=utc_now(), source=source, metrics_json=canonical_json(metrics)))

    def evaluations(self, commit_id: str) -> list[dict[str, Any]]:
        t = self.catalog.evaluations
        with self.catalog.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.commit_id == commit_id).order_by(t.c.id)).mappings().all()
        return [{"created_at": r["created_at"], "source": r["source"], "metrics": json.loads(r["metrics_json"])}
                for r in rows]

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


_COMMIT_FIELDS = ("parent_id", "message", "author", "created_at", "method", "config_json", "state_json", "edits",
                  "parents", "removed")


def commit_hash(commit: dict[str, Any]) -> str:
    """A commit's id from its content (as `get_commit` returns it): fsck re-derives it."""
    return hashlib.sha256(canonical_json({k: commit[k] for k in _COMMIT_FIELDS}).encode()).hexdigest()


def edit_key(edit_id: str, record: dict[str, Any]) -> str:
    """Names one record of one edit: its stable id plus a digest of the record's content."""
    return f"{edit_id}:{hashlib.sha256(canonical_json(record).encode()).hexdigest()[:16]}"


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

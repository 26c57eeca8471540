"""memstore.store: objects, catalog, commits, refs, revparse, lock. Run: pytest tests/test_store.py -q

Tests taking the `store` or `catalog_url` fixture run once per catalog backend: SQLite always,
PostgreSQL when WISEMEM_TEST_PG_URL names a database (e.g.
postgresql+psycopg://wisemem:wisemem@localhost:54329/wisemem; see benchmarks/pg_check.sh). Each
PostgreSQL test gets a fresh schema (via the libpq `options=-csearch_path=...` URL parameter),
dropped afterwards.
"""

from __future__ import annotations

import json
import sqlite3
import os
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from memstore.errors import (
    AmbiguousRef,
    ChecksumMismatch,
    ConcurrentUpdate,
    ConfigError,
    IntegrityError,
    LockTimeout,
    SchemaVersionMismatch,
    StoreExists,
    StoreNotFound,
    UnknownRef,
    WisememError,
)
from memstore.store import ObjectStore, Store, canonical_json, commit_hash, edit_key

BINDING = {"model_id": "tiny", "revision": "abc", "module_path": "h.1.mlp.c_proj", "layer": 1, "weight_hash": "00"}


PG_ENV = "WISEMEM_TEST_PG_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """None (the store's own catalog.sqlite) or the URL of an empty PostgreSQL schema."""
    monkeypatch.delenv("WISEMEM_CATALOG", raising=False)
    if request.param == "sqlite":
        yield None
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL catalog tests need {PG_ENV} (e.g. postgresql+psycopg://user:pw@localhost/db)")
    schema = f"wisemem_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def store(tmp_path: Path, catalog_url: str | None):
    with Store.init(tmp_path / ".wisemem", BINDING, catalog_url=catalog_url) as s:
        yield s


def commit(store: Store, msg: str, n_edits: int = 1) -> str:
    recs = [{"prompt": f"{msg}-{i}", "target_new": "x"} for i in range(n_edits)]
    ids = [f"e{i}" for i in range(n_edits)]
    return store.create_commit(store.head(), msg, "tester", "wise", "{}", '{"shards":[]}', recs, ids)


def counts(store: Store) -> tuple[int, int]:
    c = store.catalog
    with c.engine.connect() as conn:
        n_commits = conn.execute(sa.select(sa.func.count()).select_from(c.commits)).scalar_one()
        n_edits = conn.execute(sa.select(sa.func.count()).select_from(c.edits)).scalar_one()
    return n_commits, n_edits


# -- objects -------------------------------------------------------------------------------------


def test_object_roundtrip_idempotent(tmp_path: Path) -> None:
    objs = ObjectStore(tmp_path)
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {"w": base.t(), "b": base[0]}  # non-contiguous view + storage shared with "w"
    oid = objs.put_tensors(tensors, {"kind": "shard", "n": 2})
    assert objs.put_tensors(tensors, {"n": 2, "kind": "shard"}) == oid  # same bytes, same id
    assert oid in objs and list(objs.iter_ids()) == [oid]
    assert objs.path(oid) == tmp_path / "objects" / oid[:2] / oid[2:]
    got, meta = objs.get_tensors(oid)
    assert meta == {"kind": "shard", "n": 2}
    assert torch.equal(got["w"], base.t()) and torch.equal(got["b"], base[0])
    assert not list(objs.path(oid).parent.glob(".tmp-*"))


def test_object_checksum_mismatch(tmp_path: Path) -> None:
    objs = ObjectStore(tmp_path)
    oid = objs.put_tensors({"w": torch.ones(4)}, {})
    p = objs.path(oid)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch) as ei:
        objs.get_tensors(oid)
    assert ei.value.oid == oid and ei.value.got != oid


def test_object_missing(tmp_path: Path) -> None:
    objs = ObjectStore(tmp_path)
    oid = "ab" * 32
    assert oid not in objs
    with pytest.raises(IntegrityError, match="missing; run `wisemem fsck`"):
        objs.get_tensors(oid)


# -- lifecycle -----------------------------------------------------------------------------------


def test_init_open(tmp_path: Path, catalog_url: str | None) -> None:
    path = tmp_path / ".wisemem"
    with Store.init(path, BINDING, catalog_url=catalog_url) as s:
        assert s.head() is None and s.head_branch() == "refs/heads/main"
        assert (path / "objects").is_dir()
    if catalog_url is None:
        assert (path / "catalog.sqlite").is_file() and not (path / "catalog.url").exists()
    else:
        assert (path / "catalog.url").read_text() == catalog_url + "\n" and not (path / "catalog.sqlite").exists()
        with pytest.raises(StoreExists, match="catalog already exists"):  # another directory, same database
            Store.init(tmp_path / "other", BINDING, catalog_url=catalog_url)
    with pytest.raises(StoreExists):
        Store.init(path, BINDING)
    with Store.open(path) as s:
        assert s.catalog.url == (catalog_url or f"sqlite:///{path / 'catalog.sqlite'}")
        b = s.binding
        assert {k: b[k] for k in BINDING} == BINDING and b["created_at"].endswith("+00:00")


def test_open_missing(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFound, match="wisemem init"):
        Store.open(tmp_path / "nope")


def test_interrupted_init_leaves_no_store(tmp_path: Path) -> None:
    """An init killed before its one catalog transaction commits leaves an empty catalog file:
    that is not a store (open says to init), and init may run again."""
    path = tmp_path / ".wisemem"
    (path / "objects").mkdir(parents=True)
    sqlite3.connect(path / "catalog.sqlite").close()  # the file an interrupted init leaves
    assert not Store.exists_at(path)
    with pytest.raises(StoreNotFound):
        Store.open(path)
    with Store.init(path, BINDING) as s:
        assert s.binding["model_id"] == BINDING["model_id"] and s.head() is None
    assert Store.exists_at(path)


def test_schema_version_mismatch(tmp_path: Path, catalog_url: str | None) -> None:
    path = tmp_path / ".wisemem"
    with Store.init(path, BINDING, catalog_url=catalog_url) as s:
        with s.catalog.engine.begin() as conn:
            conn.execute(sa.update(s.catalog.meta).where(s.catalog.meta.c.key == "schema_version").values(value="99"))
    with pytest.raises(SchemaVersionMismatch, match="schema version 99") as ei:
        Store.open(path)
    assert isinstance(ei.value, WisememError)


def test_settings(store: Store) -> None:
    assert store.get_setting("mounted") is None
    store.set_setting("mounted", "refs/heads/main")
    store.set_setting("mounted", "HEAD")
    assert store.get_setting("mounted") == "HEAD"
    store.set_setting("mounted", None)
    assert store.get_setting("mounted") is None


# -- commits -------------------------------------------------------------------------------------


def test_commit_chain_and_log(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    c1 = commit(store, "one", 2)
    c2 = commit(store, "two")
    monkeypatch.setenv("WISEMEM_AUTHOR", "env-author")
    c3 = store.create_commit(c2, "three", None, "wise", "{}", "{}", [], [])
    assert store.head() == c3 == store.get_ref("refs/heads/main")
    assert [c["id"] for c in store.log(store.head())] == [c3, c2, c1]
    assert [c["message"] for c in store.log(c2)] == ["two", "one"]
    assert store.log(None) == [] and len(store.log(c3, max_count=2)) == 2
    got = store.get_commit(c1)
    assert got["parent_id"] is None and got["edit_ids"] == ["e0", "e1"]
    assert got["edits"] == [{"prompt": "one-0", "target_new": "x"}, {"prompt": "one-1", "target_new": "x"}]
    assert store.get_commit(c3)["author"] == "env-author"
    # the id is the hash of the canonical content
    assert commit_hash(got) == c1
    with pytest.raises(UnknownRef):
        store.get_commit("f" * 64)


def test_cas_failure_writes_nothing(store: Store) -> None:
    c1 = commit(store, "one")
    before = counts(store)
    with pytest.raises(ConcurrentUpdate):  # stale parent: branch already at c1
        store.create_commit(None, "stale", "t", "wise", "{}", "{}", [{"p": 1}], ["e"])
    with pytest.raises(ConcurrentUpdate):
        store.create_commit("0" * 64, "stale", "t", "wise", "{}", "{}", [{"p": 1}], ["e"])
    assert counts(store) == before and store.head() == c1
    with pytest.raises(ConfigError, match="NUL"):  # refused alike on every backend
        store.create_commit(c1, "nul\x00", "t", "wise", "{}", "{}", [{"p": 1}], ["e"])
    assert counts(store) == before and store.head() == c1


def test_detached_head_commit(store: Store) -> None:
    c1 = commit(store, "one")
    commit(store, "two")
    store.set_head(c1)
    assert store.head_branch() is None and store.head() == c1
    c3 = commit(store, "side")
    assert store.head() == c3 and store.get_ref("refs/heads/main") != c3


# -- revparse ------------------------------------------------------------------------------------


def test_resolve(store: Store) -> None:
    c1, c2, c3 = commit(store, "a"), commit(store, "b"), commit(store, "c")
    store.set_ref("refs/tags/v1", c1, None)
    store.set_ref("refs/heads/dev", c2, None)
    assert store.resolve(c2) == c2
    assert store.resolve(c2[:8]) == c2 and store.resolve(c2[:8].upper()) == c2
    assert store.resolve("HEAD") == c3
    assert store.resolve("HEAD^") == c2 and store.resolve("HEAD~") == c2 and store.resolve("HEAD^1") == c2
    assert store.resolve("HEAD~2") == c1 and store.resolve("HEAD^^") == c1 and store.resolve("HEAD~0") == c3
    assert store.resolve("main~1~") == c1
    assert store.resolve("main") == c3 and store.resolve("refs/heads/main~1") == c2
    assert store.resolve("dev~1") == c1 and store.resolve("v1") == c1 and store.resolve("refs/tags/v1") == c1
    for bad in ("HEAD~3", "nope", "abc", "HEAD^2", "HEAD~x", "HEAD~1x", "~1", "f" * 64):
        with pytest.raises(UnknownRef):
            store.resolve(bad)


def test_resolve_ambiguous(store: Store) -> None:
    c = store.catalog
    row = dict(parent_id=None, message="m", author="a", created_at="t", method="w", config_json="{}", state_json="{}")
    with c.engine.begin() as conn:
        conn.execute(sa.insert(c.commits), [{"id": "abcd" + "0" * 60, **row}, {"id": "abcd" + "1" * 60, **row}])
    with pytest.raises(AmbiguousRef) as ei:
        store.resolve("abcd")
    assert ei.value.candidates == ["abcd" + "0" * 60, "abcd" + "1" * 60]
    assert store.resolve("abcd1") == "abcd" + "1" * 60


def test_resolve_unborn_head(store: Store) -> None:
    with pytest.raises(UnknownRef):
        store.resolve("HEAD")


# -- lock ----------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import fcntl, sys, time
    f = open(sys.argv[1], "a+b")
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


def test_lock_timeout(store: Store) -> None:
    with store.lock(timeout=1), store.lock(timeout=1):  # re-entrant in-process
        pass
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store.path / "lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match=r"waited 0.3s\); retry or raise --lock-timeout"):
            with store.lock(timeout=0.3):
                pass
        assert 0.25 < time.monotonic() - t0 < 3
    finally:
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=10)
    with store.lock(timeout=1):  # released when the holder exits
        pass


def test_commit_json_is_opaque(store: Store) -> None:
    state = json.dumps({"shards": ["a" * 64], "threshold": 0.5})
    cid = store.create_commit(None, "m", "t", "memoir", '{"k":1}', state, [], [])
    got = store.get_commit(cid)
    assert got["state_json"] == state and got["config_json"] == '{"k":1}' and got["edits"] == []


def test_catalog_url_and_bad_binding(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with Store.init(tmp_path / "s", BINDING, catalog_url=url) as s:
        cid = commit(s, "one")
    assert not (tmp_path / "s" / "catalog.sqlite").exists()
    with Store.open(tmp_path / "s") as s:
        assert s.catalog.url == url and s.head() == cid
    with pytest.raises(ConfigError, match="missing"):
        Store.init(tmp_path / "t", {"model_id": "m"})


# -- catalog contract beyond the basics (both backends) ------------------------------------------


def test_set_ref_cas(store: Store) -> None:
    c1, c2 = commit(store, "one"), commit(store, "two")
    store.set_ref("refs/tags/t", c1, None)
    with pytest.raises(ConcurrentUpdate, match="already exists"):
        store.set_ref("refs/tags/t", c2, None)
    with pytest.raises(ConcurrentUpdate, match="moved"):
        store.set_ref("refs/tags/t", c2, c2)
    store.set_ref("refs/tags/t", c2, c1)
    assert store.get_ref("refs/tags/t") == c2
    with pytest.raises(ConcurrentUpdate):
        store.set_ref("refs/tags/t", None, c1)  # delete with a stale expectation
    store.set_ref("refs/tags/t", None, c2)
    assert store.get_ref("refs/tags/t") is None
    with pytest.raises(ConcurrentUpdate):
        store.set_ref("refs/tags/gone", None, c2)


def test_list_refs_prefix_is_literal(store: Store) -> None:
    """LIKE wildcards in a prefix match only themselves, and case counts, on every backend."""
    c1 = commit(store, "one")
    for name in ("refs/heads/a_b", "refs/heads/axb", "refs/heads/a%c", "refs/heads/aXc", "refs/heads/A_b",
                 "refs/tags/v\\1", "refs/tags/vx1"):
        store.set_ref(name, c1, None)
    assert set(store.list_refs("refs/heads/a_")) == {"refs/heads/a_b"}
    assert set(store.list_refs("refs/heads/a%")) == {"refs/heads/a%c"}
    assert set(store.list_refs("refs/heads/A")) == {"refs/heads/A_b"}
    assert set(store.list_refs("refs/tags/v\\")) == {"refs/tags/v\\1"}
    assert len(store.list_refs("refs/heads/")) == 6 and "HEAD" in store.list_refs("")


def test_commit_with_everything(store: Store) -> None:
    """Merge parent, removed edits, shards (seeds beyond 32 bits), staging cleared, evaluation: one row set."""
    big_seeds = [2**31 + 7, 2**62 + 3, -(2**40), None]
    c1 = commit(store, "one", 2)
    store.set_ref("refs/heads/side", c1, None)
    c2 = commit(store, "two")
    store.set_staged(dict(parent_id=c2, state_json="{}", config_json="{}", edits_json="[]", metrics_json="{}"))
    assert store.get_staged()["parent_id"] == c2
    shards = [dict(object_id=f"{i:064x}", kind="trained", seed=seed, layer=1, n_edits=i,
                   meta_json=canonical_json({"seed": seed})) for i, seed in enumerate(big_seeds)]
    c3 = store.create_commit(c2, "merge", "t", "wise", "{}", "{}", [{"p": "new"}], ["e9"], merge_parent=c1,
                             removed=[("e0", {"prompt": "one-0", "target_new": "x"})], shards=shards,
                             clear_staging=True, evaluation={"source": "train", "metrics": {"es": 1.0}})
    got = store.get_commit(c3)
    assert got["parents"] == [c2, c1] and got["edit_ids"] == ["e9"] and got["removed"] == ["e0"]
    assert commit_hash(got) == c3
    assert store.is_ancestor(c1, c3) and not store.is_ancestor(c3, c1)
    assert store.commit_shard_ids(c3) == [s["object_id"] for s in shards]
    assert store.get_staged() is None
    assert [(e["source"], e["metrics"]) for e in store.evaluations(c3)] == [("train", {"es": 1.0})]
    t = store.catalog.shards
    with store.catalog.engine.connect() as conn:
        assert [r.seed for r in conn.execute(sa.select(t.c.seed).order_by(t.c.n_edits))] == big_seeds
        assert conn.execute(sa.select(t.c.object_id).where(t.c.seed == 2**62 + 3)).scalar_one() == f"{1:064x}"
    # a second commit sharing a shard object reuses its row
    c4 = store.create_commit(c3, "again", "t", "wise", "{}", "{}", [], [], shards=shards[:1])
    assert store.commit_shard_ids(c4) == [shards[0]["object_id"]]
    k9 = edit_key("e9", {"p": "new"})
    assert store.edit_records([k9, f"e9:{'0' * 16}"]) == {k9: {"p": "new"}}  # the digest must match too


def test_staging_and_evaluations(store: Store) -> None:
    c1 = commit(store, "one")
    assert store.get_staged() is None
    row = dict(parent_id=c1, state_json='{"s":1}', config_json="{}", edits_json="[]", metrics_json='{"m":2}')
    store.set_staged(row)
    store.set_staged(dict(row, state_json='{"s":2}'))  # replaces, never two rows
    got = store.get_staged()
    assert got["state_json"] == '{"s":2}' and got["id"] == 1 and got["created_at"].endswith("+00:00")
    store.set_staged(None)
    assert store.get_staged() is None
    for i in range(3):
        store.add_evaluation(c1, f"eval{i}", {"i": i, "big": 2**40})
    assert [(e["source"], e["metrics"]) for e in store.evaluations(c1)] == [
        (f"eval{i}", {"big": 2**40, "i": i}) for i in range(3)]
    assert store.evaluations("0" * 64) == []


def test_failed_commit_writes_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after the ref moved inside the transaction rolls the ref back too."""
    c1 = commit(store, "one")
    before = counts(store)

    def boom(name: str) -> None:
        raise RuntimeError(name)

    monkeypatch.setattr("memstore.store.fault_point", boom)
    with pytest.raises(RuntimeError, match="during-catalog-write"):
        store.create_commit(c1, "two", "t", "wise", "{}", "{}", [{"p": 1}], ["e"])
    assert counts(store) == before and store.head() == c1
    # a parent that does not exist violates a foreign key: the same full rollback
    monkeypatch.undo()
    with pytest.raises(sa.exc.IntegrityError):
        store.create_commit(c1, "two", "t", "wise", "{}", "{}", [{"p": 1}], ["e"], merge_parent="0" * 64)
    assert counts(store) == before and store.head() == c1


@pytest.mark.parametrize("born", [True, False], ids=["branch", "unborn"])
def test_concurrent_commits_one_wins(store: Store, monkeypatch: pytest.MonkeyPatch, born: bool) -> None:
    """Two writers commit on the same parent at once (no file lock): exactly one lands, the
    other waits for it, then gets ConcurrentUpdate and writes nothing (UPDATE ... WHERE target =
    old re-checked after the row lock; INSERT of an unborn branch hits the primary key)."""
    c1 = commit(store, "one") if born else None
    before = counts(store)
    paused, release = threading.Event(), threading.Event()

    def hold(name: str) -> None:  # only writer A pauses inside its transaction (branch already moved)
        if threading.current_thread().name == "A":
            paused.set()
            assert release.wait(30)

    monkeypatch.setattr("memstore.store.fault_point", hold)
    results: dict[str, object] = {}

    def write(who: str) -> None:
        try:
            results[who] = store.create_commit(c1, who, "t", "wise", "{}", "{}", [{"p": who}], [who])
        except Exception as err:  # noqa: BLE001 - recorded for the asserts
            results[who] = err

    a = threading.Thread(target=write, args=("A",), name="A")
    a.start()
    assert paused.wait(30)
    b = threading.Thread(target=write, args=("B",), name="B")
    b.start()
    try:
        b.join(0.5)
        assert b.is_alive()  # B cannot finish while A's transaction holds the branch
    finally:
        release.set()
        a.join(30)
        b.join(30)
    assert isinstance(results["A"], str) and isinstance(results["B"], ConcurrentUpdate), results
    assert store.head() == results["A"]
    assert counts(store) == (before[0] + 1, before[1] + 1)

"""fsck and gc: prove the store is whole, and drop what nothing refers to.

fsck re-derives everything that can be re-derived (DESIGN.md principles 1 and 8): every object
re-hashes to its name, every commit id to its content, every ref names a commit, every shard a
state needs (merge sources included) is present with its catalog row and its edit records, and
the router index files (derived) match what they index: each MEMOIR memory's masks, a
wise-retrieve store's HEAD routing keys. Objects no commit, staged state or binding refers to are *dangling* (left by an interrupted
commit or `unstage`): reported, not errors; `gc` deletes them and temp files of interrupted writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from . import memoir_memory, retrieve_memory
from .errors import IntegrityError
from .memory import MemoryState, key_of, shard_meta, shard_routing
from .porcelain import binding_config, store_path
from .edits import edit_from_record
from .objects import OID_RE
from .store import SYMREF_PREFIX, Store, commit_hash


@dataclass
class FsckReport:
    objects: int
    commits: int
    problems: list[str] = field(default_factory=list)
    dangling: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _walk_state(store: Store, state: MemoryState, where: str, reachable: set[str], problems: list[str],
                on_disk: set[str], staged_keys: frozenset[str] = frozenset()) -> None:
    todo = list(state.shards)
    while todo:
        oid = todo.pop()
        if oid in reachable:
            continue
        reachable.add(oid)
        if oid not in on_disk:
            problems.append(f"{where}: shard object {oid} is missing")
            continue
        try:
            meta = shard_meta(store, oid)
        except IntegrityError as exc:
            problems.append(f"{where}: {exc}")
            continue
        signature = shard_routing(store, oid)[1]
        if signature:
            reachable.add(signature)
            if signature not in on_disk:
                problems.append(f"{where}: router signature object {signature} of shard {oid[:12]} is missing")
        missing = set(meta["edits"]) - set(store.edit_records(meta["edits"])) - staged_keys
        if missing:
            problems.append(f"{where}: shard {oid[:12]} names {len(missing)} edit record(s) absent from the catalog")
        todo.extend(meta.get("sources", []) + ([meta["base"]] if meta.get("base") else []))


def reachable_objects(store: Store, on_disk: set[str], problems: list[str]) -> set[str]:
    """Every object the catalog refers to; problems found on the way are appended."""
    reachable: set[str] = set()
    cfg = binding_config(store)
    for key, what in (("basis", "background basis"), ("frame", "MEMOIR TopHash frame")):
        if cfg.get(key):
            reachable.add(cfg[key])
            if cfg[key] not in on_disk:
                problems.append(f"binding: {what} object {cfg[key]} is missing")
    for row in store.all_commits():
        cid = row["id"]
        c = store.get_commit(cid)
        if commit_hash(c) != cid:
            problems.append(f"commit {cid}: content does not hash to its id")
        state = MemoryState.from_json(c["state_json"])
        if store.commit_shard_ids(cid) != state.shards:
            problems.append(f"commit {cid[:12]}: shard table disagrees with its state")
        _walk_state(store, state, f"commit {cid[:12]}", reachable, problems, on_disk)
    staged = store.get_staged()
    if staged is not None:  # its new edits' records wait in the staging row, not in the edits table
        keys = frozenset(key_of(edit_from_record(r)) for r in json.loads(staged["edits_json"]))
        _walk_state(store, MemoryState.from_json(staged["state_json"]), "staged", reachable, problems, on_disk, keys)
    return reachable


def fsck(path: str | os.PathLike | None = None) -> FsckReport:
    with Store.open(store_path(path)) as store:
        on_disk = set(store.objects.iter_ids())
        problems: list[str] = []
        for oid in sorted(on_disk):
            try:
                store.objects.verify(oid)
            except IntegrityError:
                problems.append(f"object {oid} is corrupt: its bytes do not hash to its name")
        reachable = reachable_objects(store, on_disk, problems)
        commits = {r["id"] for r in store.all_commits()}
        refs = store.list_refs("")
        for name, target in sorted(refs.items()):
            if target.startswith(SYMREF_PREFIX):
                if name != "HEAD" or not target[len(SYMREF_PREFIX):].startswith("refs/heads/"):
                    problems.append(f"ref {name}: unexpected symbolic target {target}")
            elif target not in commits:
                problems.append(f"ref {name} points at {target}, which is not a commit")
        if "HEAD" not in refs:
            problems.append("HEAD is missing")
        for oid in sorted(reachable & on_disk):
            if shard_meta(store, oid).get("kind") != memoir_memory.MEMORY:
                continue
            try:
                if problem := memoir_memory.index_problem(store, oid):
                    problems.append(problem)
            except IntegrityError:
                pass  # the memory cannot be read: its missing or corrupt objects are reported above
        if retrieve_memory.is_retrieve(store):
            try:
                if problem := retrieve_memory.head_index_problem(store):
                    problems.append(problem)
            except IntegrityError:
                pass  # as above
        temp = [str(p) for p in store.objects.iter_temp()]
        return FsckReport(len(on_disk), len(commits), problems, sorted(on_disk - reachable), temp)


@dataclass
class GcResult:
    removed: list[str]
    temp_files: list[str]
    bytes_freed: int
    dry_run: bool


def rebuild_index(path: str | os.PathLike | None = None, *, lock_timeout: float = 30.0) -> list[str]:
    """Rewrite the router index files from the truth: for every MEMOIR memory the history refers to,
    from its masks; in a wise-retrieve store, HEAD's key index from its shards' routing keys."""
    with Store.open(store_path(path)) as store, store.lock(lock_timeout):
        problems: list[str] = []
        reachable = reachable_objects(store, set(store.objects.iter_ids()), problems)
        if problems:
            raise IntegrityError(f"index rebuild refused: {problems[0]}; run `wisemem fsck`")
        if retrieve_memory.is_retrieve(store):
            written = retrieve_memory.write_head_index(store)
            return [str(written)] if written else []
        kind = (binding_config(store).get("hyperparameters") or {}).get("index", "flat")
        memories = [o for o in sorted(reachable) if shard_meta(store, o).get("kind") == memoir_memory.MEMORY]
        return memoir_memory.rebuild_indexes(store, memories, kind)


def gc(path: str | os.PathLike | None = None, *, dry_run: bool = False, lock_timeout: float = 30.0) -> GcResult:
    """Delete dangling objects and temp files (commits are never deleted: history is kept).
    Refuses to run on a store with integrity problems, so nothing is lost to a bad read."""
    with Store.open(store_path(path)) as store, store.lock(lock_timeout):
        on_disk = set(store.objects.iter_ids())
        problems: list[str] = []
        reachable = reachable_objects(store, on_disk, problems)
        if problems:
            raise IntegrityError(f"gc refused: {problems[0]}; run `wisemem fsck`")
        dangling = sorted(on_disk - reachable)
        temp = list(store.objects.iter_temp())
        freed = sum(store.objects.size(o) for o in dangling) + sum(p.stat().st_size for p in temp)
        if not dry_run:
            for oid in dangling:
                store.objects.delete(oid)
            store.delete_shard_rows(dangling)
            for p in temp:
                p.unlink(missing_ok=True)
            for p in (store.path / "index").glob("*.faiss"):  # derived files of deleted objects
                if OID_RE.match(p.stem) and p.stem not in reachable:
                    p.unlink(missing_ok=True)
        return GcResult(dangling, [str(p) for p in temp], freed, dry_run)


__all__ = ["FsckReport", "GcResult", "fsck", "gc", "rebuild_index"]

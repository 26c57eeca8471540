"""History verbs: show, status, diff, merge, revert, checkout, reset, branch, tag.

Porcelain over the store (DESIGN.md principles 2-3, git analogues): each verb takes a store path
and returns a dataclass. `merge` and `revert` need the base model (they train or re-threshold);
the others read and move refs only. Refs move by compare-and-swap under the writer lock.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import memoir_memory, retrieve_memory
from .errors import AmbiguousRef, ConfigError, NothingToCommit, UnknownEdit
from .memory import (
    MemoryState,
    commit_state,
    edits_for,
    load_tau,
    memory_count,
    put_merged,
    rebuild_without,
    shard_meta,
    shard_routing,
    shard_rows,
    state_edit_keys,
    unpack,
    verify_state,
)
from .merge import get_merge_method, merge_with_spec
from .methods.memoir import MemoirEditor, MemoirState
from .methods.wise import WiseEditor, WiseRetrieveEditor
from .methods.wise.method import Shard
from .porcelain import (
    CommitInfo,
    Session,
    background_prompts,
    binding_config,
    commit_info,
    mounted_commit,
    routing_of,
    session_scope,
    state_metrics,
    store_path,
    threshold_for,
    with_routing,
)
from .store import Store, canonical_json, edit_key

BRANCH_PREFIX, TAG_PREFIX = "refs/heads/", "refs/tags/"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$")


# ---- show / status -----------------------------------------------------------------------------

@dataclass
class ShardInfo:
    object_id: str
    kind: str
    seed: int | None
    n_edits: int
    bytes: int
    threshold: float | None  # its own router threshold (a wise-retrieve store serves each shard as a memory)


@dataclass
class ShowResult:
    commit: CommitInfo
    added: list[dict[str, Any]]
    removed: list[str]
    shards: list[ShardInfo]
    threshold: float | None
    live_edits: int


def _shard_infos(store: Store, state: MemoryState) -> list[ShardInfo]:
    out = []
    for oid in state.shards:
        meta = shard_meta(store, oid)
        size = store.objects.size(oid) if oid in store.objects else 0
        out.append(ShardInfo(oid, meta["kind"], meta.get("seed"), len(meta["edits"]), size, shard_routing(store, oid)[0]))
    return out


def show(path: str | os.PathLike | None = None, ref: str = "HEAD") -> ShowResult:
    with Store.open(store_path(path)) as store:
        c = store.get_commit(store.resolve(ref))
        state = MemoryState.from_json(c["state_json"])
        return ShowResult(commit_info(store, c), c["edits"], c["removed"], _shard_infos(store, state), state.threshold,
                          len(state_edit_keys(store, state)))


@dataclass
class StatusResult:
    branch: str | None  # None: detached HEAD
    head: str | None
    mounted: str
    mounted_commit: str | None
    live_edits: int
    shards: int
    staged: dict[str, Any] | None
    method: str = "wise"  # the store kind: wise (WISE-Merge), wise-retrieve or memoir
    memories: int = 0  # side memories HEAD serves (wise-retrieve: one per top-level shard)


def status(path: str | os.PathLike | None = None) -> StatusResult:
    with Store.open(store_path(path)) as store:
        head = store.head()
        state = commit_state(store, head)
        what, mcid = mounted_commit(store)
        staged = store.get_staged()
        staged_info = None
        if staged is not None:
            st = MemoryState.from_json(staged["state_json"])
            staged_info = {"n_edits": len(json.loads(staged["edits_json"])), "parent_id": staged["parent_id"],
                           "stale": staged["parent_id"] != head, "metrics": json.loads(staged["metrics_json"]),
                           "live_edits": len(state_edit_keys(store, st)), "created_at": staged["created_at"]}
        branch = store.head_branch()
        method = binding_config(store).get("method", "wise")
        return StatusResult(branch[len(BRANCH_PREFIX):] if branch else None, head, what, mcid,
                            len(state_edit_keys(store, state)), len(state.shards), staged_info, method,
                            memory_count(method, state))


# ---- diff ----------------------------------------------------------------------------------------

@dataclass
class RefEvaluation:
    commit_id: str
    metrics: dict[str, Any]
    recorded: bool


def evaluate_ref(path: str | os.PathLike | None = None, ref: str = "HEAD", *, generation: bool = True,
                 record: bool = True, lock_timeout: float = 30.0, session: Session | None = None) -> RefEvaluation:
    """Measure the memory at `ref` on its own live edits (and their recorded locality prompts) and,
    with `record`, store the result on that commit (`wisemem log` shows it)."""
    with session_scope(path, session) as session:
        store = session.store
        cid = store.resolve(ref)
        state = commit_state(store, cid)
        edits = edits_for(store, state_edit_keys(store, state))
        if not edits:
            raise ConfigError(f"the memory at {ref} holds no edits to evaluate")
        metrics = state_metrics(session, state, edits, generation=generation)
        if record:
            with store.lock(lock_timeout):
                store.add_evaluation(cid, "eval --ref", metrics)
        return RefEvaluation(cid, metrics, record)


@dataclass
class ShardDiff:
    status: str  # added | removed | modified
    kind: str
    seed: int | None
    a: str | None
    b: str | None
    changed_entries: int
    delta_norm: float  # ||tau_b - tau_a|| (a missing side counts as zero)
    mask_overlap: float  # |M_a & M_b| / |M_a | M_b|; for an added/removed shard, against the other side's shards


@dataclass
class DiffResult:
    a: str
    b: str
    added: list[dict[str, Any]]
    removed: list[dict[str, Any]]
    changed: list[dict[str, Any]]  # {"edit_id", "a": record, "b": record}
    shards: list[ShardDiff]
    threshold_a: float | None
    threshold_b: float | None

    @property
    def has_changes(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.shards or self.threshold_a != self.threshold_b)


def _dense(store: Store, oid: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, mask of the entries it may use) of a WISE shard or a MEMOIR memory, dense."""
    if shard_meta(store, oid)["kind"] == memoir_memory.MEMORY:
        memory = memoir_memory.load_memory(store, oid)[0].memory
        return memory, memory != 0
    return unpack(*store.objects.get_tensors(oid))


def _union_mask(store: Store, oids: Sequence[str], shape: Sequence[int]) -> torch.Tensor:
    out = torch.zeros(tuple(shape), dtype=torch.bool)
    for oid in oids:
        out |= _dense(store, oid)[1]
    return out


def _overlap(m_a: torch.Tensor, m_b: torch.Tensor) -> float:
    union = int((m_a | m_b).sum())
    return int((m_a & m_b).sum()) / union if union else 1.0


def diff(path: str | os.PathLike | None = None, a: str = "HEAD~1", b: str = "HEAD") -> DiffResult:
    """What changed from A to B: edits added/removed/changed, per-shard parameter deltas and mask
    overlap, and the router threshold."""
    with Store.open(store_path(path)) as store:
        ca, cb = store.resolve(a), store.resolve(b)
        sa, sb = commit_state(store, ca), commit_state(store, cb)
        ka, kb = state_edit_keys(store, sa), state_edit_keys(store, sb)
        recs = store.edit_records(sorted(set(ka) | set(kb)))
        by_id_a = {k.split(":", 1)[0]: k for k in ka}
        by_id_b = {k.split(":", 1)[0]: k for k in kb}
        added = [recs[by_id_b[i]] for i in by_id_b if i not in by_id_a]
        removed = [recs[by_id_a[i]] for i in by_id_a if i not in by_id_b]
        changed = [{"edit_id": i, "a": recs[by_id_a[i]], "b": recs[by_id_b[i]]}
                   for i in by_id_b if i in by_id_a and by_id_a[i] != by_id_b[i]]
        return DiffResult(ca, cb, added, removed, changed, _shard_diffs(store, sa, sb), sa.threshold, sb.threshold)


def _shard_diffs(store: Store, sa: MemoryState, sb: MemoryState) -> list[ShardDiff]:
    meta = {o: shard_meta(store, o) for o in sa.shards + sb.shards}
    only_a = [o for o in sa.shards if o not in sb.shards]
    only_b = [o for o in sb.shards if o not in sa.shards]
    pairs: list[tuple[str | None, str | None]] = []
    for o in only_b:  # a trained shard keeps its seed as it fills (a MEMOIR store has one memory): pair versions
        seed, kind = meta[o].get("seed"), meta[o]["kind"]
        match = next((x for x in only_a if (seed is not None and meta[x].get("seed") == seed)
                      or kind == meta[x]["kind"] == memoir_memory.MEMORY), None)
        pairs.append((match, o))
    pairs += [(o, None) for o in only_a if all(o != p for p, _ in pairs)]
    out = []
    for oa, ob in pairs:
        any_meta = meta[ob or oa]
        shape = any_meta["shape"]
        ta, ma = _dense(store, oa) if oa else (torch.zeros(shape), None)
        tb, mb = _dense(store, ob) if ob else (torch.zeros(shape), None)
        if ma is None:
            ma = _union_mask(store, sa.shards, shape)
        if mb is None:
            mb = _union_mask(store, sb.shards, shape)
        status_ = "modified" if oa and ob else ("added" if ob else "removed")
        out.append(ShardDiff(status_, any_meta["kind"], any_meta.get("seed"), oa, ob, int((ta != tb).sum()),
                             float((tb - ta).norm()), _overlap(ma, mb)))
    return out


# ---- merge / revert (need the base model) ------------------------------------------------------

@dataclass
class HistoryCommit:
    commit_id: str
    parent_id: str | None
    merged_from: str | None
    removed: list[str]
    live_edits: int
    shards: int
    threshold: float | None
    object_id: str | None = None  # the merged shard's object (merge)
    spec: dict[str, Any] = field(default_factory=dict)


def _with_session(path, session: Session | None, fn: Callable[[Session], Any]) -> Any:
    with session_scope(path, session) as s:
        return fn(s)


def merge(path: str | os.PathLike | None = None, a: str = "HEAD", b: str = "", *, method: str = "ties",
          density: float | None = None, weights: Sequence[float] = (), message: str | None = None,
          lock_timeout: float = 30.0, session: Session | None = None) -> HistoryCommit:
    """Merge B's memory into A (the current HEAD): the shards the two do not share are merged
    into one shard with `method` (mergekit names: density, weight per side), deterministically;
    the spec is saved in the merged shard's header. Records a commit with parents (A, B).
    In a wise-retrieve store A and B may instead name two memories of HEAD (shard object ids or
    unique prefixes of 4+ characters, as `wisemem show` lists them): those two become one memory,
    in a commit on top of HEAD."""
    merger = get_merge_method(method)  # unknown method: a usage error before anything else

    def run(session: Session) -> HistoryCommit:
        store = session.store
        if session.method == "memoir":
            raise ConfigError(f"merge combines WISE knowledge shards; this store holds {session.method} memories "
                              "(commit the other branch's edits instead)")
        if len(weights) not in (0, 2):
            raise ConfigError("--weight takes two values: the weight of A's shards, then of B's")
        w_a, w_b = weights if weights else (1.0, 1.0)
        with store.lock(lock_timeout):
            head = store.head()
            if session.method == retrieve_memory.METHOD:
                state = commit_state(store, head)
                named = [_memory_named(state, spec) for spec in (a, b)]
                if any(named):
                    if not all(named) or named[0] == named[1]:
                        raise ConfigError(f"'{a}' and '{b}' must name two different memories of HEAD (shard ids "
                                          "from `wisemem show`), or two commits")
                    spec = _merge_spec(method, merger, session.config.seed, density, [w_a, w_b])
                    return _merge_memories(session, head, state, named, spec, message)
            ca, cb = store.resolve(a), store.resolve(b)
            if head != ca:
                raise ConfigError(f"merge records onto the current branch, whose tip is not {a}; "
                                  f"`wisemem checkout {a}` first")
            sa, sb = commit_state(store, ca), commit_state(store, cb)
            only_a = [o for o in sa.shards if o not in sb.shards]
            only_b = [o for o in sb.shards if o not in sa.shards]
            if not only_b or store.is_ancestor(cb, ca):
                raise NothingToCommit(f"{b} is already merged into {a}")
            spec = _merge_spec(method, merger, session.config.seed, density, [w_a] * len(only_a) + [w_b] * len(only_b))
            keys = _merged_keys(store, only_a + only_b)
            sources = only_a + only_b
            merged = merge_with_spec([load_tau(store, o) for o in sources], spec)
            row = put_merged(store, merged, sources, spec, keys, session.site.layer)
            row = with_routing(session, row, merged, edits_for(store, keys))
            common = [o for o in sa.shards if o in sb.shards]
            state = MemoryState(common + [row["object_id"]])
            rows = shard_rows(store, common) + [row]
            state.threshold = threshold_for(session, state, rows)
            # The merge spec is the commit's configuration (and travels in the merged shard's header).
            config = canonical_json({"merge": spec, "method": json.loads(session.config.to_json())})
            cid = store.create_commit(ca, message or f"merge {b} into {a}", None, session.method, config,
                                      state.to_json(), [], [], merge_parent=cb, shards=rows)
            return HistoryCommit(cid, ca, cb, [], len(state_edit_keys(store, state)), len(state.shards),
                                 state.threshold, row["object_id"], spec)

    return _with_session(path, session, run)


def _memory_named(state: MemoryState, spec: str) -> str | None:
    """The top-level shard of `state` that `spec` names by id or unique hex prefix (4+), if any."""
    if len(spec) < 4 or not all(ch in "0123456789abcdef" for ch in spec.lower()):
        return None
    found = [o for o in state.shards if o.startswith(spec.lower())]
    if len(found) > 1:
        raise AmbiguousRef(spec, found)
    return found[0] if found else None


def _merge_memories(session: Session, head: str, state: MemoryState, pair: Sequence[str], spec: dict[str, Any],
                    message: str | None) -> HistoryCommit:
    """Merge two memories of a wise-retrieve store into one (in the first one's place)."""
    store = session.store
    keys = _merged_keys(store, pair)
    merged = merge_with_spec([load_tau(store, o) for o in pair], spec)
    row = with_routing(session, put_merged(store, merged, pair, spec, keys, session.site.layer), merged,
                       edits_for(store, keys))
    shards = [row["object_id"] if o == pair[0] else o for o in state.shards if o != pair[1]]
    rows = [row if o == row["object_id"] else shard_rows(store, [o])[0] for o in shards]
    new = MemoryState(shards)
    new.threshold = threshold_for(session, new, rows)
    config = canonical_json({"merge": spec, "method": json.loads(session.config.to_json())})
    cid = store.create_commit(head, message or f"merge memories {pair[0][:12]} and {pair[1][:12]}", None,
                              session.method, config, new.to_json(), [], [], shards=rows)
    return HistoryCommit(cid, head, None, [], len(state_edit_keys(store, new)), len(shards), new.threshold,
                         row["object_id"], spec)


def _merge_spec(method: str, merger, seed: int, density: float | None, weights: Sequence[float]) -> dict[str, Any]:
    """The recorded merge of shards with these weights (one per shard, in merge order)."""
    return {"method": method, "params": {"seed": seed}, "shard_params": [_shard_params(merger, w, density) for w in weights]}


def _shard_params(merger, weight: float, density: float | None) -> dict[str, Any]:
    names = {p.name for p in merger.shard_parameters()}
    out: dict[str, Any] = {"weight": weight}
    if density is not None:
        if "density" not in names:
            raise ConfigError(f"merge method {merger.name()} takes no density")
        out["density"] = density
    return out


def _merged_keys(store: Store, oids: Sequence[str]) -> list[str]:
    keys: dict[str, None] = {}
    for oid in oids:
        for k in shard_meta(store, oid)["edits"]:
            keys.setdefault(k, None)
    by_id: dict[str, str] = {}
    for k in keys:
        eid = k.split(":", 1)[0]
        if eid in by_id:
            raise ConfigError(f"edit '{eid}' has different records on the two sides; revert it on one side first")
        by_id[eid] = k
    return list(keys)


def revert(path: str | os.PathLike | None = None, ref: str | None = None, *, edit_id: str | None = None,
           message: str | None = None, lock_timeout: float = 30.0, session: Session | None = None) -> HistoryCommit:
    """A new commit whose memory no longer holds the edits of commit `ref` (or the one edit
    `edit_id`): shards that held them are rebuilt without them (from their stored version just
    before the first removed edit when there is one); other shards are untouched. In a
    wise-retrieve store an automatic group that held them comes apart into its rebuilt shards,
    which group again as new edits would (retrieve_memory.py)."""
    if (ref is None) == (edit_id is None):
        raise ConfigError("revert takes a commit (REF) or --edit EDIT_ID, not both")

    def run(session: Session) -> HistoryCommit:
        store = session.store
        with store.lock(lock_timeout):
            head = store.head()
            state = commit_state(store, head)
            live = state_edit_keys(store, state)
            if edit_id is not None:
                remove = [k for k in live if k.split(":", 1)[0] == edit_id]
                if not remove:
                    raise UnknownEdit(edit_id)
                what = f"edit {edit_id}"
            else:
                c = store.get_commit(store.resolve(ref))
                added = {edit_key(i, r) for i, r in zip(c["edit_ids"], c["edits"])}
                remove = [k for k in live if k in added]
                if not remove:
                    raise NothingToCommit(f"commit {c['id'][:12]} has no edits live at HEAD to revert")
                what = f'"{c["message"]}"'
            sources: list[dict[str, Any]] = []
            if session.method == "memoir":
                rows = [r for r in (memoir_memory.rebuild_without(store, oid, set(remove), _memoir_trainer(session),
                                                                  lambda keys: edits_for(store, keys),
                                                                  session.config.threshold)
                                    for oid in state.shards) if r is not None]
            else:
                rows = _rebuild_wise(session, state, set(remove))
                if session.method == retrieve_memory.METHOD:
                    rows, sources = retrieve_memory.group_rows(store, rows, session.config, session.site.layer,
                                                               routing_of(session))
            new = MemoryState([r["object_id"] for r in rows])
            new.threshold = threshold_for(session, new, rows)
            records = store.edit_records(remove)
            cid = store.create_commit(head, message or f"Revert {what}", None, session.method, session.config.to_json(),
                                      new.to_json(), [], [], removed=[(k.split(":", 1)[0], records[k]) for k in remove],
                                      shards=rows, sources=sources)
            return HistoryCommit(cid, head, None, [k.split(":", 1)[0] for k in remove],
                                 len(state_edit_keys(store, new)), len(new.shards), new.threshold)

    return _with_session(path, session, run)


def _memoir_trainer(session: Session):
    def train(start: MemoirState, earlier, new) -> MemoirState:
        editor = MemoirEditor(session.model, session.tokenizer, session.site, session.config, (), session.prefixes,
                              state=start)
        editor.edits = list(earlier)
        editor.apply(new)
        return editor.state

    return train


def _rebuild_wise(session: Session, state: MemoryState, removed: set[str]) -> list[dict[str, Any]]:
    """Rows of the state's WISE shards without the `removed` edit keys, with their routing columns.
    In a wise-retrieve store a shard is retrained with the other memories' edits as its replay
    negatives, and an automatic group holding removed edits is replaced by its rebuilt sources."""
    store = session.store
    retrieve = session.method == retrieve_memory.METHOD
    live = [k for k in state_edit_keys(store, state) if k not in removed]
    prompts = {k: e.prompt for k, e in zip(live, edits_for(store, live))} if retrieve else {}
    rows = []
    for oid in state.shards:
        meta = shard_meta(store, oid)
        outside = None
        if retrieve and removed & set(meta["edits"]):
            outside = [prompts[k] for o in state.shards if o != oid for k in shard_meta(store, o)["edits"] if k in prompts]
        train = _shard_trainer(session, outside)
        parts = meta["sources"] if outside is not None and retrieve_memory.is_auto_group(meta) else [oid]
        rows += [r for r in (rebuild_without(store, part, removed, train) for part in parts) if r is not None]
    return [r if r["signature"] else with_routing(session, r, load_tau(store, r["object_id"]),
                                                  edits_for(store, json.loads(r["meta_json"])["edits"]))
            for r in rows]


def _shard_trainer(session: Session, outside: Sequence[str] | None = None):
    """Retrains a shard; `outside`: a wise-retrieve store's other memories' edit prompts (replay negatives)."""
    def train(start: torch.Tensor, seed: int, earlier, new) -> torch.Tensor:
        kind = WiseEditor if outside is None else WiseRetrieveEditor
        editor = kind(session.model, session.tokenizer, session.site, session.config, background_prompts(),
                      session.prefixes, basis=session.basis)
        if outside is not None:
            editor.outside_prompts = outside
        shard = Shard(seed, start.clone(), list(earlier))
        editor.train_shard(shard, new)
        return shard.tau.cpu()

    return train


# ---- checkout / reset / branch / tag ---------------------------------------------------------------

@dataclass
class RefMove:
    ref: str  # what moved: "HEAD" (detached) or a branch name
    old: str | None
    new: str | None
    discarded: list[str] = field(default_factory=list)  # commits no longer on the branch (reset)


def checkout(path: str | os.PathLike | None = None, ref: str = "main", *, lock_timeout: float = 30.0) -> RefMove:
    """Point HEAD at a branch (attached) or any other revision (detached). The target memory's
    objects are verified first: a corrupt store is refused (IntegrityError)."""
    with Store.open(store_path(path)) as store, store.lock(lock_timeout):
        old = store.head()
        branch = BRANCH_PREFIX + ref if store.list_refs(BRANCH_PREFIX + ref).get(BRANCH_PREFIX + ref) else None
        cid = store.resolve(ref)
        verify_state(store, commit_state(store, cid))
        store.set_head(branch or cid)
        return RefMove(ref if branch else "HEAD", old, cid)


def reset(path: str | os.PathLike | None = None, ref: str = "HEAD", *, dry_run: bool = False,
          lock_timeout: float = 30.0) -> RefMove:
    """Move the current branch (or detached HEAD) to `ref`. `discarded` lists the commits that
    leave the branch (they stay in the catalog, reachable by id). `dry_run` moves nothing."""
    with Store.open(store_path(path)) as store, store.lock(lock_timeout):
        old, new = store.head(), store.resolve(ref)
        verify_state(store, commit_state(store, new))
        discarded = []
        for c in store.log(old):
            if store.is_ancestor(c["id"], new):
                break
            discarded.append(c["id"])
        name = store.head_branch() or "HEAD"
        if not dry_run:
            store.set_ref(name, new, old)
        return RefMove(name[len(BRANCH_PREFIX):] if name.startswith(BRANCH_PREFIX) else name, old, new, discarded)


@dataclass
class RefInfo:
    name: str
    commit_id: str | None
    current: bool = False


def _check_name(name: str, kind: str) -> None:
    if not _NAME_RE.match(name) or name == "HEAD" or ".." in name or name.endswith("/"):
        raise ConfigError(f"invalid {kind} name '{name}': use letters, digits, '.', '_', '-', '/'")


def _refs(store: Store, prefix: str) -> list[RefInfo]:
    current = store.head_branch()
    return [RefInfo(n[len(prefix):], store.get_ref(n), n == current) for n in sorted(store.list_refs(prefix))]


def branch(path: str | os.PathLike | None = None, name: str | None = None, start: str = "HEAD", *,
           delete: bool = False, lock_timeout: float = 30.0) -> list[RefInfo]:
    """List branches (no name), create `name` at `start`, or delete it."""
    return _ref_verb(path, BRANCH_PREFIX, "branch", name, start, delete, lock_timeout)


def tag(path: str | os.PathLike | None = None, name: str | None = None, start: str = "HEAD", *,
        delete: bool = False, lock_timeout: float = 30.0) -> list[RefInfo]:
    """List tags (no name), create `name` at `start`, or delete it."""
    return _ref_verb(path, TAG_PREFIX, "tag", name, start, delete, lock_timeout)


def _ref_verb(path, prefix: str, kind: str, name: str | None, start: str, delete: bool, lock_timeout: float):
    with Store.open(store_path(path)) as store:
        if name is None:
            return _refs(store, prefix)
        _check_name(name, kind)
        full = prefix + name
        with store.lock(lock_timeout):
            current = store.list_refs(full).get(full)
            if delete:
                if current is None:
                    raise ConfigError(f"no {kind} named '{name}'")
                if store.head_branch() == full:
                    raise ConfigError(f"cannot delete the current branch '{name}'; check out another first")
                store.set_ref(full, None, current)
                return [RefInfo(name, None)]
            if current is not None:
                raise ConfigError(f"a {kind} named '{name}' already exists")
            cid = store.resolve(start)
            store.set_ref(full, cid, None)
            return [RefInfo(name, cid, store.head_branch() == full)]

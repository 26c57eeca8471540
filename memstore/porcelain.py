"""Porcelain: the verbs of the CLI and the Python API. Each takes a store path (or Store) and
returns a dataclass; none prints. `wisemem <verb> --help` documents each."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import retrieve_memory
from .edits import Edit, edit_from_record, load_edits
from .errors import ConcurrentUpdate, ConfigError, ModelMismatch, NothingToCommit, StoreExists
from .faults import fault_point
from .gate import GateCondition, check_gate, needs_generation, parse_gate
from .memory import (
    MERGED,
    MemoryState,
    commit_state,
    edits_for,
    key_of,
    load_tau,
    memory_count,
    put_trained,
    shard_meta,
    shard_rows,
    spent_seeds,
    state_edit_keys,
    verify_state,
)
from .methods.base import MemoryLayer
from .methods.memoir import MemoirEditor, MemoirState
from .methods.wise import WiseEditor, WiseLayer, WiseRetrieveEditor, merge_shards, shard_mask
from .methods.wise.method import Shard, router_threshold, routing_inputs
from .methods.wise.retrieve import memory_routing
from .model import EMBEDDED_MODEL, EditSite, find_edit_site, load_model, weight_hash, weight_matrix
from .mount import mount_layer
from .prompting import format_prompt
from .store import ObjectStore, Store

DEFAULT_STORE = ".wisemem"
STORE_METHODS = ("wise", "wise-retrieve", "memoir")  # what `init --method` accepts; a store keeps its method
_BACKGROUND = Path(__file__).parent / "data" / "background.txt"


def store_path(path: str | os.PathLike | None = None) -> Path:
    """`--store`, else $WISEMEM_DIR, else ./.wisemem."""
    return Path(path or os.environ.get("WISEMEM_DIR") or DEFAULT_STORE)


def background_prompts() -> list[str]:
    return [line.strip() for line in _BACKGROUND.read_text().splitlines() if line.strip()]


def load_config_file(path: str | os.PathLike | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is a config error for the user
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of hyperparameters")
    return data


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings; values parsed as JSON when they can be (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def make_config(model_type: str | None, base: dict[str, Any] | None = None, *, method: str = "wise",
                **overrides: Any) -> Any:
    """The method's config: its per-family defaults, then `base`, then `overrides` (None ignored)."""
    from .methods.registry import get_method

    config_cls = get_method(method).config_cls
    data = dict(base or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    bad = sorted(set(data) - set(config_cls.help()))
    if bad:
        raise ConfigError(f"unknown {method} hyperparameter(s) {bad}; known: {', '.join(sorted(config_cls.help()))}")
    try:
        return config_cls.for_model(model_type, **data)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


# ---- opening a store with its model ------------------------------------------------------------

@dataclass
class Session:
    """An open store with its base model loaded and checked against the binding."""

    store: Store
    model: Any
    tokenizer: Any
    site: EditSite
    config: Any  # the method's config (WiseConfig, MemoirConfig)
    prefixes: list[str]
    basis: torch.Tensor | None
    method: str = "wise"  # one of STORE_METHODS
    frame: str | None = None  # MEMOIR: the object holding the TopHash permutation and background

    def close(self) -> None:
        self.store.close()


def open_session(path: str | os.PathLike | None = None, *, device: str = "cpu", dtype: str = "fp32",
                 model: Any = None, tokenizer: Any = None, overrides: dict[str, Any] | None = None) -> Session:
    store = Store.open(store_path(path))
    try:
        binding = store.binding
        if model is None:
            model, tokenizer = load_model(binding["model_id"], device=device, dtype=dtype)
        site = find_edit_site(model, binding["layer"], binding_config(store).get("module_template"))
        if weight_hash(site.module(model)) != binding["weight_hash"]:
            raise ModelMismatch(
                f"this store is bound to {binding['model_id']} (layer {binding['layer']}); the model offered has "
                "different weights at that layer — open the store with its own model"
            )
        cfg_data = binding_config(store)
        method = cfg_data.get("method", "wise")
        config = make_config(getattr(model.config, "model_type", None), cfg_data.get("hyperparameters"), method=method,
                             **(overrides or {}))
        basis = None
        if cfg_data.get("basis"):
            tensors, _ = store.objects.get_tensors(cfg_data["basis"])
            basis = tensors["basis"].to(next(model.parameters()).device)
        return Session(store, model, tokenizer, site, config, list(cfg_data.get("prefixes", [])), basis, method,
                       cfg_data.get("frame"))
    except BaseException:
        store.close()
        raise


@contextmanager
def session_scope(path: str | os.PathLike | None, session: Session | None = None,
                  overrides: dict[str, Any] | None = None) -> Iterator[Session]:
    """`session` when it is open on the store at `path` (or `path` is None); else a session on
    that store, reusing the given session's model so it is not loaded twice."""
    if session is not None and (path is None or store_path(path).resolve() == session.store.path.resolve()):
        yield session
        return
    own = open_session(path, overrides=overrides, model=session.model if session else None,
                       tokenizer=session.tokenizer if session else None)
    try:
        yield own
    finally:
        own.close()


def binding_config(store: Store) -> dict[str, Any]:
    return json.loads(store.binding.get("config_json") or "{}")


# ---- init ----------------------------------------------------------------------------------------

@dataclass
class InitResult:
    path: str
    model_id: str
    layer: int
    module_path: str
    weight_hash: str


def init(path: str | os.PathLike | None = None, *, model_id: str | None = None, layer: int | None = None,
         module: str | None = None, device: str = "cpu", dtype: str = "fp32", config_file: str | None = None,
         overrides: dict[str, Any] | None = None, catalog: str | None = None, method: str = "wise") -> InitResult:
    """Create a store bound to a base model (the embedded default when `model_id` is None).
    `catalog`: a SQLAlchemy URL for the catalog (default $WISEMEM_CATALOG, else a SQLite file).
    `method`: wise (WISE-Merge: one side memory), wise-retrieve (one side memory per shard group,
    top-1 retrieval; retrieve_memory.py) or memoir; a store keeps one method for its whole history."""
    from .memoir_memory import put_frame
    from .methods.memoir import MemoirEditor
    from .methods.wise.method import background_basis, generate_prefixes

    if method not in STORE_METHODS:
        raise ConfigError(f"unknown --method '{method}'; a store holds {', '.join(STORE_METHODS)} memories")

    target = store_path(path)
    if Store.exists_at(target):  # fail before loading a model
        raise StoreExists(f"a wisemem store already exists in {target}")
    model, tokenizer = load_model(model_id, device=device, dtype=dtype)
    hyper = load_config_file(config_file)
    hyper.update(overrides or {})
    config = make_config(getattr(model.config, "model_type", None), hyper, method=method)
    site = find_edit_site(model, layer, module, layer_fraction=config.layer_fraction)
    prefixes = generate_prefixes(model, tokenizer, config.prefix_seeds, config.prefix_lengths)
    basis = None
    if method != "memoir":
        basis = background_basis(model, tokenizer, site, background_prompts(), config.background_rank,
                                 config.chat_template)
    binding = {
        "model_id": model_id or EMBEDDED_MODEL,
        "revision": getattr(model.config, "_commit_hash", None) or "",
        "module_path": site.module_path,
        "layer": site.layer,
        "weight_hash": weight_hash(site.module(model)),
    }
    cfg: dict[str, Any] = {"hyperparameters": hyper, "prefixes": prefixes, "module_template": module, "method": method}
    if method == "memoir":  # the TopHash frame is fixed for the store's life: every mask depends on it
        fresh = MemoirEditor(model, tokenizer, site, config, background_prompts(), prefixes).state
        cfg["frame"] = put_frame(ObjectStore(target), fresh.permutation, fresh.background)
    if basis is not None:  # written before the catalog: an object nothing refers to is harmless
        cfg["basis"] = ObjectStore(target).put_tensors({"basis": basis.cpu().contiguous()}, {"kind": "wise-background"})
    Store.init(target, {**binding, "config_json": json.dumps(cfg, sort_keys=True)}, catalog_url=catalog).close()
    return InitResult(str(target), binding["model_id"], site.layer, site.module_path, binding["weight_hash"])


# ---- the memory at a commit ------------------------------------------------------------------------

def memory_layer(session: Session, commit_id: str | None) -> MemoryLayer:
    """The serving layer for the memory at a commit (zero edits: a layer that adds nothing)."""
    return state_layer(session, commit_state(session.store, commit_id))


def state_layer(session: Session, state: MemoryState, rows: Sequence[dict[str, Any]] = ()) -> MemoryLayer:
    """The serving layer of a memory state. Loading re-hashes every shard object it serves: a
    corrupt store raises IntegrityError rather than serving a wrong memory. `rows`: the state's
    shard rows when they are not in the catalog yet (a wise-retrieve memory's routing is in them)."""
    if session.method == "memoir":
        from .memoir_memory import memory_index

        editor = memoir_editor(session, state)
        if not state.shards:
            return editor.layer()
        return editor.layer(index=memory_index(session.store, state.shards[0], editor.state.masks, session.config.index))
    base = session.site.module(session.model)
    base = getattr(base, "base_layer", base)
    device = next(session.model.parameters()).device
    if session.method == retrieve_memory.METHOD:
        return retrieve_memory.serving_layer(session.store, base, state, session.config, session.basis, device, rows)
    if not state.shards:
        return WiseLayer(base, None, float("inf"), session.config.router_reduce, session.basis)
    delta = merge_shards([load_tau(session.store, oid) for oid in state.shards], session.config).to(device)
    return WiseLayer(base, delta, float(state.threshold), session.config.router_reduce, session.basis)


def memoir_editor(session: Session, state: MemoryState, with_edits: bool = False) -> MemoirEditor:
    """A MemoirEditor on the memory of `state` (an empty memory on the store's frame if none)."""
    from .memoir_memory import load_frame, load_memory

    if state.shards:
        memoir_state, meta = load_memory(session.store, state.shards[0])
    else:
        permutation, background = load_frame(session.store, session.frame)
        d_out, d_in = weight_matrix(session.site.module(session.model)).shape
        memoir_state, meta = MemoirState(torch.zeros(d_out, d_in), torch.zeros(0, d_in, dtype=torch.bool),
                                         permutation, background), {"edits": []}
    editor = MemoirEditor(session.model, session.tokenizer, session.site, session.config, (), session.prefixes,
                          state=memoir_state)
    editor.loaded_from = state.shards[0] if state.shards else None
    if with_edits:
        editor.edits = edits_for(session.store, meta["edits"])
    return editor


def editor_for(session: Session, state: MemoryState) -> WiseEditor | MemoirEditor:
    """An editor holding the memory of `state` with its edits: it continues where `state` ends."""
    if session.method == "memoir":
        return memoir_editor(session, state, with_edits=True)
    kind = WiseRetrieveEditor if session.method == retrieve_memory.METHOD else WiseEditor
    editor = kind(session.model, session.tokenizer, session.site, session.config, background_prompts(),
                  session.prefixes, basis=session.basis)
    editor.spent_seeds = spent_seeds(session.store, state)
    for oid in state.shards:
        meta = shard_meta(session.store, oid)
        editor.shards.append(Shard(meta.get("seed"), load_tau(session.store, oid), edits_for(session.store, meta["edits"]),
                                   closed=meta["kind"] == MERGED, object_id=oid))
    return editor


Rows = list[dict[str, Any]]


def save_editor(session: Session, editor: WiseEditor | MemoirEditor) -> tuple[MemoryState, Rows, Rows]:
    """Write the editor's shards (unchanged ones keep their object) and compute the threshold.
    Returns the state, its shards' catalog rows, and the rows of shards merged away into new groups."""
    store, cfg, rows = session.store, session.config, []
    if isinstance(editor, MemoirEditor):
        from .memoir_memory import put_memory

        if not editor.edits:
            return MemoryState(), [], []
        row = put_memory(store, editor.state, [key_of(e) for e in editor.edits], editor.k, session.frame,
                         session.site.layer, cfg.threshold, base=editor.loaded_from, index_kind=cfg.index)
        return MemoryState([row["object_id"]], cfg.threshold), [row], []
    for shard in editor.shards:
        if shard.object_id is not None:  # loaded and not trained since
            rows.append(shard_rows(store, [shard.object_id])[0])
            continue
        mask = shard_mask(shard.tau.shape, cfg.mask_ratio, shard.seed)
        row = put_trained(store, shard.tau, mask, shard.seed, [key_of(e) for e in shard.edits], session.site.layer)
        rows.append(with_routing(session, row, shard.tau, shard.edits))
    if isinstance(editor, WiseRetrieveEditor):  # full shards group into memories; each memory has its own threshold
        rows, sources = retrieve_memory.group_rows(store, rows, cfg, session.site.layer,
                                                   routing_of(session, editor.all_edits()))
        state = MemoryState([r["object_id"] for r in rows])
        state.threshold = threshold_for(session, state, rows)
        return state, rows, sources
    delta = editor.side_memory()
    threshold = editor.threshold(delta) if delta is not None else None
    return MemoryState([r["object_id"] for r in rows], threshold), rows, []


@torch.no_grad()
def with_routing(session: Session, row: dict[str, Any], tau: torch.Tensor, edits: Sequence[Edit]) -> dict[str, Any]:
    """A new shard's catalog row with its routing columns: its own threshold (act_ratio x the
    lowest score of its edits under it alone) and its signature, an object holding its edits'
    routing keys in edit order (the edited layer's input, background removed, mean over the prompt;
    a wise-retrieve store's key index is made of them) and their centroid."""
    store, cfg = session.store, session.config
    tau = tau.to(next(session.model.parameters()).device)
    prompts = [format_prompt(session.tokenizer, e.prompt, cfg.chat_template) for e in edits]
    reads = list(routing_inputs(session.model, session.tokenizer, session.site, prompts, session.basis))
    keys, threshold = memory_routing(reads, tau, cfg)
    signature = store.objects.put_tensors({"centroid": torch.stack(keys).mean(0).cpu(), "keys": torch.stack(keys).cpu()},
                                          {"kind": "wise-router-signature", "shard": row["object_id"]})
    return {**row, "threshold": threshold, "signature": signature}


def routing_of(session: Session, known: Sequence[Edit] = ()) -> retrieve_memory.RoutingFn:
    """`with_routing` for a new shard named by its edit keys (`known`: edits not in the catalog yet)."""
    by_key = {key_of(e): e for e in known}

    def routing(row: dict[str, Any], tau: torch.Tensor, keys: Sequence[str]) -> dict[str, Any]:
        rest = [k for k in keys if k not in by_key]
        stored = dict(zip(rest, edits_for(session.store, rest)))
        return with_routing(session, row, tau, [by_key.get(k) or stored[k] for k in keys])

    return routing


def threshold_for(session: Session, state: MemoryState, rows: Sequence[dict[str, Any]]) -> float | None:
    """Router threshold of a state whose shards' catalog rows are `rows`: act_ratio x the lowest
    activation score of its live edits (WISE-Retrieve: the loosest memory's own threshold; MEMOIR:
    the configured mask-overlap threshold tau)."""
    if not state.shards:
        return None
    if session.method == "memoir":
        return float(session.config.threshold)
    if session.method == retrieve_memory.METHOD:
        return min(float(r["threshold"]) for r in rows)
    delta = merge_shards([load_tau(session.store, oid) for oid in state.shards], session.config)
    edits = edits_for(session.store, state_edit_keys(session.store, state))
    prompts = [format_prompt(session.tokenizer, e.prompt, session.config.chat_template) for e in edits]
    return router_threshold(session.model, session.tokenizer, session.site, delta.to(next(session.model.parameters()).device),
                            prompts, session.config.act_ratio, session.config.router_reduce, session.basis)


def check_new_edits(store: Store, state: MemoryState, edits: Sequence[Edit]) -> None:
    """An edit id may be live once: a second record for it must replace the first by revert."""
    live = {k.split(":", 1)[0] for k in state_edit_keys(store, state)}
    seen: set[str] = set()
    for e in edits:
        if e.edit_id in live:
            raise ConfigError(f"edit '{e.edit_id}' is already in the memory; revert it first "
                              f"(`wisemem revert --edit {e.edit_id}`)")
        if e.edit_id in seen:
            raise ConfigError(f"edit '{e.edit_id}' appears twice in the edits file")
        seen.add(e.edit_id)


# ---- train / commit ------------------------------------------------------------------------------

@dataclass
class TrainResult:
    parent_id: str | None
    n_edits: int
    total_edits: int
    threshold: float | None
    shards: int
    metrics: dict[str, Any]
    seconds_per_edit: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


@dataclass
class CommitResult:
    commit_id: str
    parent_id: str | None
    n_edits: int
    total_edits: int
    threshold: float | None
    shards: int
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds_per_edit: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


def state_metrics(session: Session, state: MemoryState, edits: Sequence[Edit], generation: bool = False,
                  rows: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The memory of `state` (shard rows `rows` if not recorded yet) measured on these edits
    (evaluate/own_edits.py): what `train` prints, `commit --gate` checks and `eval --ref` records."""
    from .evaluate.own_edits import own_metrics

    return own_metrics(session.model, session.tokenizer, session.site, state_layer(session, state, rows), edits,
                       chat_template=session.config.chat_template, generation=generation,
                       fallback_prompts=background_prompts())


def _train(session: Session, parent: str | None, edits: Sequence[Edit],
           progress: Callable[[int, int], None] | None) -> tuple[MemoryState, Rows, Rows, list]:
    state = commit_state(session.store, parent)
    check_new_edits(session.store, state, edits)
    editor = editor_for(session, state)

    def after_edit(i: int, _stats: Any) -> None:
        fault_point("during-training")
        if progress:
            progress(i, len(edits))

    stats = editor.apply(edits, after_edit)
    return (*save_editor(session, editor), stats)


@dataclass
class _Trained:
    session: Session
    parent: str | None
    edits: list[Edit]
    state: MemoryState
    rows: Rows  # the state's shards
    sources: Rows  # shards merged away into the state's new groups
    stats: list

    def seconds_and_steps(self) -> tuple[list[float], list[int]]:
        return [s.seconds for s in self.stats], [s.steps for s in self.stats]


@contextmanager
def _trained_on_head(path, edits_file, session: Session | None, overrides: dict[str, Any] | None,
                     lock_timeout: float, progress: Callable[[int, int], None] | None) -> Iterator[_Trained]:
    """Read the edits (all or nothing: a bad line stops us before anything is written), take the
    writer lock, and train them on top of HEAD; the caller stages or commits the result."""
    edits = load_edits(edits_file)
    if not edits:
        raise NothingToCommit(f"no edits in {edits_file}")
    with session_scope(path, session, overrides=overrides) as session, session.store.lock(lock_timeout):
        if session.store.get_staged() is not None:
            raise ConfigError("something is staged; `wisemem commit` it (no FILE) or `wisemem unstage` first")
        parent = session.store.head()
        yield _Trained(session, parent, edits, *_train(session, parent, edits, progress))


def train(path: str | os.PathLike | None = None, edits_file: str | os.PathLike = "", *,
          overrides: dict[str, Any] | None = None, lock_timeout: float = 30.0,
          progress: Callable[[int, int], None] | None = None, session: Session | None = None) -> TrainResult:
    """Train the edits into a new memory state on top of HEAD and stage it (HEAD does not move)."""
    with _trained_on_head(path, edits_file, session, overrides, lock_timeout, progress) as t:
        store, state = t.session.store, t.state
        metrics = state_metrics(t.session, state, t.edits, rows=t.rows)
        store.set_staged({"parent_id": t.parent, "state_json": state.to_json(), "config_json": t.session.config.to_json(),
                          "edits_json": json.dumps([e.to_dict() for e in t.edits]), "metrics_json": json.dumps(metrics)},
                         t.rows + t.sources)
        total = len(state_edit_keys(store, state))
        return TrainResult(t.parent, len(t.edits), total, state.threshold, len(state.shards), metrics,
                           *t.seconds_and_steps())


def unstage(path: str | os.PathLike | None = None, *, lock_timeout: float = 30.0) -> int:
    """Drop what `train` staged (its objects stay until `gc`); returns the number of edits dropped."""
    with Store.open(store_path(path)) as store, store.lock(lock_timeout):
        staged = store.get_staged()
        if staged is None:
            raise NothingToCommit("nothing is staged")
        store.set_staged(None)
        return len(json.loads(staged["edits_json"]))


def commit(path: str | os.PathLike | None = None, edits_file: str | os.PathLike | None = None, *,
           message: str | None = None, author: str | None = None, overrides: dict[str, Any] | None = None,
           gate: str | Sequence[GateCondition] | None = None, lock_timeout: float = 30.0,
           progress: Callable[[int, int], None] | None = None, session: Session | None = None) -> CommitResult:
    """Record a commit on the current branch: the staged state, or (with `edits_file`) the edits
    of that file trained and committed in one step. With `gate` ("reliability>=0.9,locality>=0.98"),
    the new memory is measured on the commit's edits first and GateFailed is raised, with nothing
    recorded, unless every condition holds; the measurement is recorded on the commit."""
    conditions = parse_gate(gate) if isinstance(gate, str) else list(gate or [])
    if edits_file is None:
        return _commit_staged(path, message, author, lock_timeout, conditions)
    with _trained_on_head(path, edits_file, session, overrides, lock_timeout, progress) as t:
        store, state, edits = t.session.store, t.state, t.edits
        metrics, evaluation = {}, None
        if conditions:
            metrics = state_metrics(t.session, state, edits, generation=needs_generation(conditions), rows=t.rows)
            check_gate(conditions, metrics)
            evaluation = {"source": "commit --gate " + ",".join(map(str, conditions)), "metrics": metrics}
        fault_point("before-catalog-write")
        cid = store.create_commit(t.parent, message or f"edit {len(edits)} fact(s)", author, t.session.method,
                                  t.session.config.to_json(), state.to_json(), [e.to_dict() for e in edits],
                                  [e.edit_id for e in edits], shards=t.rows, sources=t.sources, evaluation=evaluation)
        total = len(state_edit_keys(store, state))
        return CommitResult(cid, t.parent, len(edits), total, state.threshold, len(state.shards), metrics,
                            *t.seconds_and_steps())


def _commit_staged(path, message: str | None, author: str | None, lock_timeout: float,
                   conditions: Sequence[GateCondition] = ()) -> CommitResult:
    with Store.open(store_path(path)) as store, store.lock(lock_timeout):
        staged = store.get_staged()
        if staged is None:
            raise NothingToCommit("nothing staged: `wisemem train FILE` first, or `wisemem commit FILE`")
        parent = store.head()
        if parent != staged["parent_id"]:
            raise ConcurrentUpdate("HEAD moved since `wisemem train`; `wisemem unstage` and train again")
        state = MemoryState.from_json(staged["state_json"])
        records = json.loads(staged["edits_json"])
        metrics = json.loads(staged["metrics_json"])
        check_gate(conditions, metrics)  # on what `train` measured; the staged state stays staged if it fails
        ids = [edit_from_record(r).edit_id for r in records]
        method = binding_config(store).get("method", "wise")
        cid = store.create_commit(parent, message or f"edit {len(records)} fact(s)", author, method, staged["config_json"],
                                  state.to_json(), records, ids, shards=shard_rows(store, state.shards),
                                  clear_staging=True, evaluation={"source": "train", "metrics": metrics})
        total = len(state_edit_keys(store, state))
        return CommitResult(cid, parent, len(records), total, state.threshold, len(state.shards), metrics)


# ---- log -----------------------------------------------------------------------------------------

@dataclass
class CommitInfo:
    id: str
    parents: list[str]
    message: str
    author: str
    created_at: str
    method: str  # the store's kind: wise, wise-retrieve or memoir
    n_edits: int
    n_removed: int
    memories: int  # side memories its state serves
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def parent_id(self) -> str | None:
        return self.parents[0] if self.parents else None


def commit_info(store: Store, c: dict[str, Any]) -> CommitInfo:
    return CommitInfo(c["id"], c["parents"], c["message"], c["author"], c["created_at"], c["method"],
                      len(c["edits"]), len(c["removed"]), memory_count(c["method"], MemoryState.from_json(c["state_json"])),
                      store.evaluations(c["id"]))


def log(path: str | os.PathLike | None = None, ref: str = "HEAD", max_count: int | None = None) -> list[CommitInfo]:
    with Store.open(store_path(path)) as store:
        head = store.head() if ref == "HEAD" else store.resolve(ref)
        if head is None:
            return []
        return [commit_info(store, c) for c in store.log(head, with_edits=True, max_count=max_count)]


# ---- mount / generate ----------------------------------------------------------------------------

MOUNT_KEY = "mounted"  # value: a ref spec ("HEAD" follows new commits), a commit id, or "none"


@dataclass
class MountResult:
    ref: str
    commit_id: str | None


def mount(path: str | os.PathLike | None = None, ref: str = "HEAD") -> MountResult:
    """Select the memory state `generate` and the Python API use. HEAD follows new commits;
    any other ref is pinned to the commit it names now."""
    with Store.open(store_path(path)) as store:
        cid = store.head() if ref == "HEAD" else store.resolve(ref)
        verify_state(store, commit_state(store, cid))  # refuse to mount a corrupt memory
        store.set_setting(MOUNT_KEY, "HEAD" if ref == "HEAD" else cid)
        return MountResult(ref, cid)


def unmount(path: str | os.PathLike | None = None) -> MountResult:
    with Store.open(store_path(path)) as store:
        store.set_setting(MOUNT_KEY, "none")
    return MountResult("none", None)


def mounted_commit(store: Store) -> tuple[str, str | None]:
    """(what is mounted, the commit it names now); a new store mounts HEAD."""
    value = store.get_setting(MOUNT_KEY) or "HEAD"
    if value == "none":
        return "none", None
    if value == "HEAD":
        return "HEAD", store.head()
    return value, value


def check_prompt_lengths(session: Session, prompts: Sequence[str], max_new_tokens: int) -> None:
    """Refuse a prompt that cannot fit the model's context (it would fail or exhaust memory late)."""
    limit = getattr(session.model.config, "max_position_embeddings", None) or getattr(session.model.config, "n_positions", None)
    if not limit:
        return
    for i, p in enumerate(prompts):
        n = len(session.tokenizer(format_prompt(session.tokenizer, p, session.config.chat_template)).input_ids)
        if n + max_new_tokens > limit:
            raise ConfigError(f"prompt {i + 1} is {n} tokens; with {max_new_tokens} new tokens it exceeds the "
                              f"model's context of {limit} tokens")


@dataclass
class Generation:
    prompt: str
    text: str
    memory: bool
    routed: bool


def generate(path: str | os.PathLike | None = None, prompts: Sequence[str] = (), *, max_new_tokens: int = 20,
             memory: bool = True, session: Session | None = None) -> list[Generation]:
    """Greedy answers with the mounted memory (or the bare model with `memory=False`)."""
    from .evaluate.metrics import generate_answers

    with session_scope(path, session) as session:
        check_prompt_lengths(session, prompts, max_new_tokens)
        what, cid = mounted_commit(session.store)
        use_memory = memory and what != "none"
        layer = memory_layer(session, cid if use_memory else None)
        with mount_layer(session.model, session.site, layer) as handle:
            chat = session.config.chat_template
            texts, routed = [], []
            for p in prompts:  # one at a time so each route is reported; batches route per row too
                texts += generate_answers(session.model, session.tokenizer, [p], max_new_tokens, chat_template=chat)
                held = handle.layer.routing.held  # a bool route, or the memory / stored edit chosen (-1: none)
                routed.append(held is not None and bool(held[0] if held.dtype == torch.bool else held[0] >= 0))
        return [Generation(p, t, use_memory, r) for p, t, r in zip(prompts, texts, routed)]

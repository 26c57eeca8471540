"""Porcelain: the verbs of the CLI and the Python API. Each takes a store path (or Store) and
returns a dataclass; none prints. `wisemem <verb> --help` documents each."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .edits import Edit, edit_from_record, load_edits
from .errors import ConfigError, ModelMismatch, NothingToCommit, StoreExists, StoreNotFound
from .methods.wise import WiseConfig, WiseEditor, WiseLayer, default_config, merge_shards, shard_mask
from .methods.wise.method import Shard
from .methods.wise.serialize import shard_from_tensors, shard_tensors
from .model import EMBEDDED_MODEL, EditSite, find_edit_site, load_model, weight_hash
from .mount import MountHandle, mount_layer
from .store import ObjectStore, Store

DEFAULT_STORE = ".wisemem"
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


def make_config(model_type: str | None, base: dict[str, Any] | None = None, **overrides: Any) -> WiseConfig:
    data = dict(base or {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = set(WiseConfig.help())
    bad = sorted(set(data) - known)
    if bad:
        raise ConfigError(f"unknown hyperparameter(s) {bad}; see `wisemem config --help` for the list")
    try:
        return default_config(model_type, **data)
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
    config: WiseConfig
    prefixes: list[str]
    basis: torch.Tensor | None

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
        config = make_config(getattr(model.config, "model_type", None), cfg_data.get("hyperparameters"), **(overrides or {}))
        basis = None
        if cfg_data.get("basis"):
            tensors, _ = store.objects.get_tensors(cfg_data["basis"])
            basis = tensors["basis"].to(next(model.parameters()).device)
        return Session(store, model, tokenizer, site, config, list(cfg_data.get("prefixes", [])), basis)
    except BaseException:
        store.close()
        raise


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
         overrides: dict[str, Any] | None = None) -> InitResult:
    """Create a store bound to a base model (the embedded default when `model_id` is None)."""
    from .methods.wise.method import background_basis, generate_prefixes

    target = store_path(path)
    if (target / "catalog.sqlite").exists() or (target / "catalog.url").exists():  # fail before loading a model
        raise StoreExists(f"a wisemem store already exists in {target}")
    model, tokenizer = load_model(model_id, device=device, dtype=dtype)
    site = find_edit_site(model, layer, module)
    hyper = load_config_file(config_file)
    hyper.update(overrides or {})
    config = make_config(getattr(model.config, "model_type", None), hyper)
    prefixes = generate_prefixes(model, tokenizer, config.prefix_seeds, config.prefix_lengths)
    basis = background_basis(model, tokenizer, site, background_prompts(), config.background_rank, config.chat_template)
    binding = {
        "model_id": model_id or EMBEDDED_MODEL,
        "revision": getattr(model.config, "_commit_hash", None) or "",
        "module_path": site.module_path,
        "layer": site.layer,
        "weight_hash": weight_hash(site.module(model)),
    }
    cfg: dict[str, Any] = {"hyperparameters": hyper, "prefixes": prefixes, "module_template": module}
    if basis is not None:  # written before the catalog: an object nothing refers to is harmless
        cfg["basis"] = ObjectStore(target).put_tensors({"basis": basis.cpu().contiguous()}, {"kind": "wise-background"})
    Store.init(target, {**binding, "config_json": json.dumps(cfg, sort_keys=True)}).close()
    return InitResult(str(target), binding["model_id"], site.layer, site.module_path, binding["weight_hash"])


# ---- memory state at a commit --------------------------------------------------------------------

def commit_state(store: Store, commit_id: str | None) -> dict[str, Any]:
    if commit_id is None:
        return {"shards": [], "threshold": None}
    return json.loads(store.get_commit(commit_id)["state_json"])


def state_edits(store: Store, commit_id: str | None) -> list[Edit]:
    """Every edit live at a commit, oldest first."""
    edits: list[Edit] = []
    for c in reversed(store.log(commit_id, with_edits=True)) if commit_id else []:
        edits.extend(edit_from_record(r) for r in c["edits"])
    return edits


def load_taus(store: Store, state: dict[str, Any]) -> list[torch.Tensor]:
    return [shard_from_tensors(*store.objects.get_tensors(entry["object"]))[0] for entry in state["shards"]]


def load_shards(store: Store, state: dict[str, Any], edits: Sequence[Edit]) -> list[Shard]:
    """The shards of a state, each with its own edits back (`edits`: all live edits, oldest
    first; shards fill in order)."""
    shards, used = [], 0
    for entry, tau in zip(state["shards"], load_taus(store, state)):
        n = entry["n_edits"]
        shards.append(Shard(entry["seed"], tau, list(edits[used:used + n])))
        used += n
    return shards


def memory_layer(session: Session, commit_id: str | None) -> WiseLayer:
    """The serving layer for the memory at a commit (zero edits: a layer that adds nothing)."""
    base = session.site.module(session.model)
    base = getattr(base, "base_layer", base)
    state = commit_state(session.store, commit_id)
    if not state["shards"]:
        return WiseLayer(base, None, float("inf"), session.config.router_reduce, session.basis)
    device = next(session.model.parameters()).device
    delta = merge_shards(load_taus(session.store, state), session.config).to(device)
    return WiseLayer(base, delta, float(state["threshold"]), session.config.router_reduce, session.basis)


# ---- commit --------------------------------------------------------------------------------------

@dataclass
class CommitResult:
    commit_id: str
    parent_id: str | None
    n_edits: int
    total_edits: int
    threshold: float
    shards: int
    seconds_per_edit: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


def commit(path: str | os.PathLike | None = None, edits_file: str | os.PathLike = "", *, message: str | None = None,
           author: str | None = None, overrides: dict[str, Any] | None = None, lock_timeout: float = 30.0,
           progress: Callable[[int, int], None] | None = None, session: Session | None = None) -> CommitResult:
    """Train the edits of `edits_file` into the memory and record a commit on the current branch."""
    edits = load_edits(edits_file)  # all-or-nothing: a bad line stops us before anything is written
    if not edits:
        raise NothingToCommit("no edits to commit")
    own = session is None
    session = session or open_session(path, overrides=overrides)
    try:
        store = session.store
        with store.lock(lock_timeout):
            parent = store.head()
            state = commit_state(store, parent)
            config = session.config
            previous = state_edits(store, parent)
            editor = WiseEditor(session.model, session.tokenizer, session.site, config,
                                background_prompts(), session.prefixes, basis=session.basis)
            editor.shards = load_shards(store, state, previous)  # the editor continues the open shard
            stats = editor.apply(edits, (lambda i, _s: progress(i, len(edits))) if progress else None)
            entries = []
            for shard in editor.shards:
                tensors, meta = shard_tensors(shard, shard_mask(shard.tau.shape, config.mask_ratio, shard.seed))
                entries.append({"object": store.objects.put_tensors(tensors, meta), "seed": shard.seed,
                                "n_edits": len(shard.edits)})
            threshold = editor.threshold(editor.side_memory())
            live = previous + edits
            new_state = {"shards": entries, "threshold": threshold}
            cid = store.create_commit(
                parent, message or f"edit {len(edits)} fact(s)", author, "wise", config.to_json(),
                json.dumps(new_state, sort_keys=True), [e.to_dict() for e in edits], [e.edit_id for e in edits],
            )
            return CommitResult(cid, parent, len(edits), len(live), threshold, len(editor.shards),
                                [s.seconds for s in stats], [s.steps for s in stats])
    finally:
        if own:
            session.close()


# ---- log / status --------------------------------------------------------------------------------

@dataclass
class CommitInfo:
    id: str
    parent_id: str | None
    message: str
    author: str
    created_at: str
    method: str
    n_edits: int


def log(path: str | os.PathLike | None = None, ref: str = "HEAD") -> list[CommitInfo]:
    with Store.open(store_path(path)) as store:
        head = store.head() if ref == "HEAD" else store.resolve(ref)
        if head is None:
            return []
        return [CommitInfo(c["id"], c["parent_id"], c["message"], c["author"], c["created_at"], c["method"],
                           len(c["edits"])) for c in store.log(head, with_edits=True)]


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
        if ref == "HEAD":
            store.set_setting(MOUNT_KEY, "HEAD")
            return MountResult("HEAD", store.head())
        cid = store.resolve(ref)
        store.set_setting(MOUNT_KEY, cid)
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

    own = session is None
    session = session or open_session(path)
    try:
        what, cid = mounted_commit(session.store)
        use_memory = memory and what != "none"
        layer = memory_layer(session, cid if use_memory else None)
        with mount_layer(session.model, session.site, layer) as handle:
            chat = session.config.chat_template
            texts, routed = [], []
            for p in prompts:  # one at a time so each route is reported; batches route per row too
                texts += generate_answers(session.model, session.tokenizer, [p], max_new_tokens, chat_template=chat)
                held = handle.layer.routing.held
                routed.append(bool(held[0]) if held is not None else False)
        return [Generation(p, t, use_memory, r) for p, t, r in zip(prompts, texts, routed)]
    finally:
        if own:
            session.close()


# ---- Python API --------------------------------------------------------------------------------

class Repo:
    """Python API over a store: `Repo.open(".wisemem").mount(model)` on a stock transformers model."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = store_path(path)
        if not ((self.path / "catalog.sqlite").exists() or (self.path / "catalog.url").exists()):
            raise StoreNotFound(f"no wisemem store at {self.path}; create one with `wisemem init`")

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> "Repo":
        return cls(path)

    @classmethod
    def init(cls, path: str | os.PathLike | None = None, **kwargs: Any) -> "Repo":
        init(path, **kwargs)
        return cls(path)

    def commit(self, edits_file: str | os.PathLike, message: str | None = None, **kwargs: Any) -> CommitResult:
        return commit(self.path, edits_file, message=message, **kwargs)

    def log(self, ref: str = "HEAD") -> list[CommitInfo]:
        return log(self.path, ref)

    def mount(self, model: Any, ref: str | None = None, tokenizer: Any = None) -> MountHandle:
        """Attach the memory at `ref` (default: what `wisemem mount` selected) to `model`.
        The model must be the store's base model; returns a handle whose `unmount()` restores it."""
        session = open_session(self.path, model=model, tokenizer=tokenizer)
        try:
            if ref is None:
                _, cid = mounted_commit(session.store)
            else:
                cid = session.store.resolve(ref)
            return mount_layer(model, session.site, memory_layer(session, cid))
        finally:
            session.close()

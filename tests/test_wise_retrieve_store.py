"""A wise-retrieve store on a tiny random LLaMA: one memory per top-level shard, each with its own
threshold; a routed row gets exactly bare + tau_j a and an unrelated row exactly the bare output;
full shards group into memories by themselves (shards_per_memory) and by `merge`; revert and
checkout behave as for WISE-Merge; the FAISS key index of HEAD's memory is checked by fsck and
rebuilt by `wisemem index rebuild`; the pre-filter with every memory a candidate is the exhaustive scan.

    world:  e0 | e1 | e2    one edit per commit and shard, shards_per_memory 1: three memories
    groups: e0 | e1 | e2    the same with shards_per_memory 2: [e0 e1] merged, then e2 alone

Run: OMP_WAIT_POLICY=PASSIVE pytest tests/test_wise_retrieve_store.py -q   (about 1 min on 2 CPU cores)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from test_cli import assert_one_line_error
from test_robustness import run, save_tiny_llama, write_edits

from memstore import history, maintenance, porcelain
from memstore.errors import ConfigError
from memstore.memory import MemoryState, commit_state, load_tau, shard_meta, shard_routing, shard_rows
from memstore.methods.wise import WiseRetrieveLayer
from memstore.methods.wise.retrieve import prefilter_recall
from memstore.model import load_model
from memstore.mount import mount_layer
from memstore.porcelain import Session
from memstore.index import read_key_index
from memstore.retrieve_memory import head_index_problem, index_path, state_index

ROOT = Path(__file__).resolve().parent.parent
# Big steps, small margins and a mean router: a tiny random model's activations are tiny and alike
# (with max, the shared first token "The" decides every prompt). Measured: each edit prompt routes to
# its own memory, unrelated prompts to none.
SETTINGS = {"background_rank": 4, "mask_ratio": 0.5, "edits_per_shard": 1, "max_steps": 40, "lr": 0.3, "alpha": 0.5,
            "beta": 6.0, "gamma": 3.0, "replay": 2, "act_ratio": 0.8, "router_reduce": "mean", "max_update": 1e4,
            "prefilter_candidates": 16}  # as many candidates as memories: routes equal the exhaustive scan's
EDITS = [{"id": "japan", "prompt": "The capital of Japan is", "target_new": "Paris"},
         {"id": "hamlet", "prompt": "Who wrote Hamlet? It was", "target_new": "Dickens"},
         {"id": "water", "prompt": "Water boils at", "target_new": "zero degrees"}]
UNRELATED = ["Hello there", "I like to"]


@dataclass
class Store:
    path: Path
    session: Session
    commits: list[str]  # one per edit, in order

    def state(self, ref: str = "HEAD"):
        return commit_state(self.session.store, self.session.store.resolve(ref))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Any, Any]:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama", seed=0)
    return (path, *load_model(str(path)))


def make_store(root: Path, tiny, **settings: Any) -> Store:
    model_dir, model, tokenizer = tiny
    path = root / "store"
    porcelain.init(path, model_id=str(model_dir), method="wise-retrieve", overrides={**SETTINGS, **settings})
    session = porcelain.open_session(path, model=model, tokenizer=tokenizer)
    commits = [porcelain.commit(path, write_edits(root / f"{e['id']}.jsonl", [e]), message=e["id"],
                                session=session).commit_id for e in EDITS]
    return Store(path, session, commits)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny):
    store = make_store(tmp_path_factory.mktemp("world"), tiny)
    yield store
    store.session.close()


@pytest.fixture
def copy(world: Store, tmp_path: Path):
    """A copy of the world's store, with a session sharing the loaded model."""
    shutil.copytree(world.path, tmp_path / "store")
    session = porcelain.open_session(tmp_path / "store", model=world.session.model, tokenizer=world.session.tokenizer)
    yield Store(tmp_path / "store", session, world.commits)
    session.close()


@torch.no_grad()
def logits(store: Store, prompts: list[str], ref: str | None = "HEAD") -> torch.Tensor:
    """Logits of `prompts` (one padded batch) with the memory at `ref` mounted (None: the bare model)."""
    s = store.session
    enc = s.tokenizer(prompts, return_tensors="pt", padding=True)
    if ref is None:
        return s.model(**enc).logits
    with mount_layer(s.model, s.site, porcelain.memory_layer(s, s.store.resolve(ref))):
        return s.model(**enc).logits


def routes(store: Store, prompts: list[str], layer: WiseRetrieveLayer | None = None) -> list[int]:
    s = store.session
    layer = layer or porcelain.memory_layer(s, s.store.head())
    with mount_layer(s.model, s.site, layer):
        s.model(**s.tokenizer(prompts, return_tensors="pt", padding=True))
    return layer.last_choice.tolist()


# -- the store kind, its memories and their thresholds ----------------------------------------------------

def test_one_memory_per_shard_each_with_its_own_threshold(world: Store):
    store = world.session.store
    assert world.session.method == "wise-retrieve"
    state = world.state()
    assert len(state.shards) == 3
    thresholds = [shard_routing(store, o)[0] for o in state.shards]
    layer = porcelain.memory_layer(world.session, store.head())
    assert isinstance(layer, WiseRetrieveLayer) and layer.n_memories == 3
    assert layer.thresholds.tolist() == pytest.approx(thresholds) and state.threshold == min(thresholds)
    assert [c.memories for c in porcelain.log(world.path)] == [3, 2, 1]
    shown = history.show(world.path)
    assert shown.commit.method == "wise-retrieve" and shown.commit.memories == 3
    assert [s.threshold for s in shown.shards] == thresholds
    assert maintenance.fsck(world.path).ok


def test_each_edit_routes_to_its_memory_and_unrelated_prompts_to_none(world: Store):
    assert routes(world, [e["prompt"] for e in EDITS] + UNRELATED) == [0, 1, 2, -1, -1]
    answers = porcelain.generate(world.path, [EDITS[1]["prompt"], UNRELATED[0]], max_new_tokens=3, session=world.session)
    assert [g.routed for g in answers] == [True, False]


def test_routed_row_gets_bare_plus_its_memory_and_unrelated_row_exactly_the_bare_output(world: Store):
    s = world.session
    layer = porcelain.memory_layer(s, s.store.head())
    prompts = [EDITS[1]["prompt"], UNRELATED[0], EDITS[0]["prompt"]]
    seen: dict[str, torch.Tensor] = {}
    hook = layer.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], y=out))
    try:
        mounted = logits_with(world, prompts, layer)
    finally:
        hook.remove()
    assert layer.last_choice.tolist() == [1, -1, 0]
    x, y = seen["x"], seen["y"]
    with torch.no_grad():
        bare = layer.base_layer(x)
        a = x.float() - torch.matmul(torch.matmul(x.float(), s.basis), s.basis.t())
        for row, memory in ((0, 1), (2, 0)):
            tau = load_tau(s.store, world.state().shards[memory])
            # Not bit for bit: BLAS may sum a (1, T, d) and the layer's (R, T, d) product in another
            # order (threads, blocking), so the last bits can differ between runs.
            torch.testing.assert_close(y[row], bare[row] + torch.matmul(a[row:row + 1], tau.t())[0],
                                       rtol=1e-5, atol=1e-6)
    assert torch.equal(y[1], bare[1])
    assert torch.equal(mounted[1], logits(world, prompts, None)[1])  # the whole model: bit for bit


@torch.no_grad()
def logits_with(store: Store, prompts: list[str], layer: WiseRetrieveLayer) -> torch.Tensor:
    s = store.session
    with mount_layer(s.model, s.site, layer):
        return s.model(**s.tokenizer(prompts, return_tensors="pt", padding=True)).logits


def test_zero_edits_is_the_bare_model_bit_for_bit(tmp_path: Path, tiny):
    model_dir, model, tokenizer = tiny
    porcelain.init(tmp_path / "empty", model_id=str(model_dir), method="wise-retrieve", overrides=SETTINGS)
    session = porcelain.open_session(tmp_path / "empty", model=model, tokenizer=tokenizer)
    try:
        empty = Store(tmp_path / "empty", session, [])
        layer = porcelain.memory_layer(session, None)
        assert isinstance(layer, WiseRetrieveLayer) and layer.n_memories == 0
        prompts = [e["prompt"] for e in EDITS] + UNRELATED
        assert torch.equal(logits_with(empty, prompts, layer), logits(empty, prompts, None))
        assert maintenance.fsck(tmp_path / "empty").ok and not index_path(session.store).exists()
    finally:
        session.close()


# -- groups: automatic (shards_per_memory) and by merge ---------------------------------------------------

@pytest.fixture(scope="module")
def groups(tmp_path_factory, tiny):
    store = make_store(tmp_path_factory.mktemp("groups"), tiny, shards_per_memory=2)
    yield store
    store.session.close()


def test_full_shards_group_into_one_memory(groups: Store):
    store = groups.session.store
    first, second, third = (commit_state(store, c) for c in groups.commits)
    assert len(first.shards) == 1 and shard_meta(store, first.shards[0])["kind"] == "wise-shard"
    (merged,) = second.shards  # the second full shard closed the group: one merged memory
    meta = shard_meta(store, merged)
    assert meta["kind"] == "wise-merged" and meta["spec"]["auto"] and meta["sources"][0] == first.shards[0]
    assert [k.split(":")[0] for k in meta["edits"]] == ["japan", "hamlet"]
    rows = shard_rows(store, meta["sources"])  # the sources keep their catalog rows and routing
    assert all(r["threshold"] is not None and r["signature"] for r in rows)
    assert third.shards[0] == merged and shard_meta(store, third.shards[1])["kind"] == "wise-shard"
    assert [c.memories for c in porcelain.log(groups.path)] == [2, 1, 1]
    assert routes(groups, [e["prompt"] for e in EDITS] + UNRELATED[1:]) == [0, 0, 1, -1]
    assert maintenance.fsck(groups.path).ok


def test_revert_dissolves_an_automatic_group_and_restores_the_parent(groups: Store, tmp_path: Path):
    shutil.copytree(groups.path, tmp_path / "store")
    session = porcelain.open_session(tmp_path / "store", model=groups.session.model, tokenizer=groups.session.tokenizer)
    try:
        copy = Store(tmp_path / "store", session, groups.commits)
        # The last commit's edit went into a new shard: its parent's state comes back as it was.
        history.revert(copy.path, "HEAD", session=session)
        assert copy.state().shards == commit_state(session.store, groups.commits[1]).shards
        # Taking "hamlet" out of the group [japan hamlet] leaves japan's shard alone: a memory of its own.
        r = history.revert(copy.path, groups.commits[1], session=session)
        assert r.removed == ["hamlet"] and copy.state().shards == commit_state(session.store, groups.commits[0]).shards
        assert torch.equal(logits(copy, [EDITS[1]["prompt"]]), logits(copy, [EDITS[1]["prompt"]], None))
        assert maintenance.fsck(copy.path).ok
    finally:
        session.close()


def test_merge_two_memories_into_one(copy: Store):
    before = copy.state()
    a, b = before.shards[0], before.shards[2]
    r = history.merge(copy.path, a[:8], b[:10], session=copy.session)
    after = copy.state()
    assert r.parent_id == copy.commits[-1] and r.merged_from is None and r.shards == 2
    assert after.shards == [r.object_id, before.shards[1]]
    assert shard_meta(copy.session.store, r.object_id)["sources"] == [a, b]
    assert routes(copy, [e["prompt"] for e in EDITS]) == [0, 1, 0]
    assert maintenance.fsck(copy.path).ok  # the key index followed HEAD
    with pytest.raises(ConfigError):
        history.merge(copy.path, after.shards[0], "HEAD~1", session=copy.session)  # one memory, one commit
    with pytest.raises(ConfigError):
        history.merge(copy.path, after.shards[0], after.shards[0], session=copy.session)


def test_train_stages_a_group_and_commit_records_it(groups: Store, tmp_path: Path):
    shutil.copytree(groups.path, tmp_path / "store")
    path = tmp_path / "store"
    session = porcelain.open_session(path, model=groups.session.model, tokenizer=groups.session.tokenizer)
    try:
        extra = {"id": "moon", "prompt": "The moon is made of", "target_new": "cheese"}
        staged = porcelain.train(path, write_edits(tmp_path / "moon.jsonl", [extra]), session=session)
        assert staged.shards == 2  # water and moon fill a second group: two memories, both merged
        state = MemoryState.from_json(session.store.get_staged()["state_json"])
        assert all(shard_meta(session.store, o)["kind"] == "wise-merged" for o in state.shards)
        assert maintenance.fsck(path).ok  # the staged group's sources are in the catalog
        done = porcelain.commit(path)
        assert done.shards == 2 and history.show(path).commit.memories == 2
        assert maintenance.fsck(path).ok  # and the key index followed
    finally:
        session.close()


# -- revert / checkout --------------------------------------------------------------------------------------

def test_revert_restores_the_bare_answer_and_keeps_the_others(copy: Store):
    hamlet = [EDITS[1]["prompt"]]
    assert not torch.equal(logits(copy, hamlet), logits(copy, hamlet, None))
    r = history.revert(copy.path, copy.commits[1], session=copy.session)  # the middle commit: retrains nothing else
    assert r.removed == ["hamlet"] and r.live_edits == 2
    assert torch.equal(logits(copy, hamlet), logits(copy, hamlet, None))
    assert routes(copy, [EDITS[0]["prompt"], EDITS[2]["prompt"]]) == [0, 1]
    history.revert(copy.path, "HEAD~1", session=copy.session)  # "water": the last edit, a memory of its own
    assert copy.state().shards == [commit_state(copy.session.store, copy.commits[0]).shards[0]]
    assert maintenance.fsck(copy.path).ok


def test_checkout_reproduces_old_logits_and_moves_the_index(copy: Store):
    prompts = [e["prompt"] for e in EDITS] + UNRELATED
    old = logits(copy, prompts, copy.commits[0])
    history.checkout(copy.path, copy.commits[0])
    assert torch.equal(logits(copy, prompts), old)
    assert maintenance.fsck(copy.path).ok  # index/ now holds the checked-out memory's keys
    assert len(state_index(copy.session.store, copy.state())) == 1
    history.checkout(copy.path, "main")
    history.reset(copy.path, copy.commits[1])  # moving a branch moves the index too
    assert maintenance.fsck(copy.path).ok and len(state_index(copy.session.store, copy.state())) == 2


def test_the_store_itself_keeps_the_index_on_head_whatever_moves_it(copy: Store):
    # The index follows HEAD in Store (set_ref / set_head / create_commit), not in each verb.
    store, first, last = copy.session.store, copy.commits[0], copy.commits[-1]
    store.set_ref("refs/heads/side", first, None)  # another branch: HEAD's memory is unchanged
    assert maintenance.fsck(copy.path).ok and len(state_index(store, copy.state())) == 3
    store.set_ref("refs/heads/main", first, last)
    assert maintenance.fsck(copy.path).ok and len(state_index(store, copy.state())) == 1
    store.set_head(last)  # detached
    assert maintenance.fsck(copy.path).ok and len(state_index(store, copy.state())) == 3
    one = commit_state(store, first)
    cid = store.create_commit(last, "back to one memory", None, "wise-retrieve",
                              store.get_commit(last, with_edits=False)["config_json"], one.to_json(), [], [],
                              shards=shard_rows(store, one.shards))
    assert store.head() == cid and head_index_problem(store) is None and len(read_key_index(index_path(store))) == 1


# -- the key index -----------------------------------------------------------------------------------------

def test_fsck_reports_a_missing_or_wrong_index_and_rebuild_fixes_it(copy: Store):
    store = copy.session.store
    path = index_path(store)
    head_bytes = path.read_bytes()
    history.checkout(copy.path, "HEAD~1")
    stale = path.read_bytes()  # a valid index, of another memory
    history.checkout(copy.path, "main")
    assert path.read_bytes() == head_bytes
    for damage, words in ((lambda: path.unlink(), "missing"), (lambda: path.write_bytes(stale), "does not match"),
                          (lambda: path.write_bytes(head_bytes[:-7]), "does not match")):
        damage()
        report = maintenance.fsck(copy.path)
        assert not report.ok and any(words in p and "index rebuild" in p for p in report.problems), report
        assert maintenance.rebuild_index(copy.path) == [str(path)]
        assert maintenance.fsck(copy.path).ok and path.read_bytes() == head_bytes
    # A damaged index is never trusted: served routes come from the keys themselves.
    path.write_bytes(stale)
    assert routes(copy, [e["prompt"] for e in EDITS]) == [0, 1, 2]


def test_index_ids_name_memory_and_position(world: Store):
    index = state_index(world.session.store, world.state())
    assert [(int(i) >> 32, int(i) & 0xFFFFFFFF) for i in index.ids] == [(0, 0), (1, 0), (2, 0)]
    keys = torch.from_numpy(index.vectors)
    assert index.search(keys, 1)[:, 0].tolist() == [0, 1, 2]  # each key's nearest stored key is itself


def test_prefilter_with_every_memory_a_candidate_is_the_exhaustive_scan(world: Store):
    s = world.session
    prompts = [e["prompt"] for e in EDITS] + UNRELATED + ["Who wrote Hamlet?", "The capital of Japan"]
    layer = porcelain.memory_layer(s, s.store.head())
    assert layer.index is not None and layer.candidates >= 3  # 16 lets every stored key through
    exhaustive = WiseRetrieveLayer(layer.base_layer, layer.deltas, layer.thresholds, layer.reduce, layer.basis)
    assert routes(world, prompts, layer) == routes(world, prompts, exhaustive)
    assert bool(layer.last_candidates.all())
    assert prefilter_recall(s.model, s.tokenizer, s.site, layer, prompts).recall == 1.0
    one = WiseRetrieveLayer(layer.base_layer, layer.deltas, layer.thresholds, layer.reduce, layer.basis, layer.index, 1)
    assert routes(world, prompts[:3], one) == [0, 1, 2]  # an edit's own key is its nearest
    assert one.last_candidates.sum(1).tolist() == [1, 1, 1]
    recall = prefilter_recall(s.model, s.tokenizer, s.site, one, prompts)
    assert recall.queries == len(prompts) and recall.hits <= recall.routed and recall.recall <= 1.0


# -- the CLI ---------------------------------------------------------------------------------------------------

def test_cli_init_show_log_fsck_and_index_rebuild(world: Store, tiny, tmp_path: Path):
    line = assert_one_line_error(run("init", "--method", "wise-merge", "--store", tmp_path / "bad"), 2)
    assert "wise-retrieve" in line and not (tmp_path / "bad").exists()
    path = tmp_path / "store"
    shutil.copytree(world.path, path)
    shown = run("show", "--store", path)
    assert shown.returncode == 0 and "wise-retrieve store: 3 memories" in shown.stdout, shown
    logged = run("log", "--json", "--store", path)
    data = json.loads(logged.stdout)
    jsonschema.validate(data, json.loads((ROOT / "schemas" / "log.schema.json").read_text()))
    assert [c["memories"] for c in data] == [3, 2, 1] and {c["method"] for c in data} == {"wise-retrieve"}
    status = run("status", "--json", "--store", path)
    jsonschema.validate(json.loads(status.stdout), json.loads((ROOT / "schemas" / "status.schema.json").read_text()))
    assert json.loads(status.stdout)["memories"] == 3 and "3 memories" in run("status", "--store", path).stdout
    (path / "index" / "routing-keys.faiss").unlink()
    broken = run("fsck", "--store", path)
    assert broken.returncode == 1 and "routing-keys.faiss" in broken.stdout, broken
    assert run("index", "rebuild", "--store", path).returncode == 0
    assert run("fsck", "--store", path).returncode == 0

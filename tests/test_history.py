"""History on the embedded SmolLM2-135M-Instruct: checkout reproduces an old ref's logits bit for
bit, revert (of a commit, of one edit) takes edits out while the others keep working, merge is
deterministic and its result mounts, train stages without moving HEAD.

One history is built once for the module through the Python API (~4 min on 2 CPU cores):

    A: eiffel-city, messi-sport        B: darrieux-language, python-creator
    main: A - B - revert(B) - ...      side: A - C (japan-capital)        merge main side

Run: pytest tests/test_history.py -q
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from memstore import history, maintenance, porcelain
from memstore.edits import Edit, load_edits
from memstore.errors import ConfigError, NothingToCommit, UnknownEdit
from memstore.evaluate.metrics import generate_answers, mean, teacher_forced
from memstore.memory import commit_state, shard_routing
from memstore.mount import mount_layer
from memstore.porcelain import Session
from memstore.store import Store

ROOT = Path(__file__).resolve().parent.parent
EDITS: list[Edit] = load_edits(ROOT / "examples" / "edits.jsonl")
A, B = EDITS[:2], EDITS[2:]
C = Edit(prompt="The capital of Japan is", target_new="Osaka", id="japan-capital")
UNRELATED = ["The capital of Germany is", "Water boils at a temperature of"]
PROBE = [e.prompt for e in EDITS] + [C.prompt] + UNRELATED


def write_edits(path: Path, edits: list[Edit]) -> Path:
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in edits))
    return path


@torch.no_grad()
def logits_at(session: Session, commit_id: str | None) -> torch.Tensor:
    """Logits of PROBE (one padded batch) with the memory at `commit_id` mounted."""
    tok = session.tokenizer
    enc = tok(PROBE, return_tensors="pt", padding=True)
    with mount_layer(session.model, session.site, porcelain.memory_layer(session, commit_id)):
        return session.model(**enc).logits


def reliability(session: Session, commit_id: str | None, edits: list[Edit]) -> float:
    """Teacher-forced reliability of `edits` with the memory at `commit_id` (None: bare model)."""
    with mount_layer(session.model, session.site, porcelain.memory_layer(session, commit_id)) as handle:
        acc = teacher_forced(session.model, session.tokenizer, [e.prompt for e in edits],
                             [e.target_new for e in edits], handle).accuracy()
    return mean(acc)


def answer(session: Session, commit_id: str | None, prompt: str) -> str:
    with mount_layer(session.model, session.site, porcelain.memory_layer(session, commit_id)):
        return generate_answers(session.model, session.tokenizer, [prompt], 6)[0]


@dataclass
class World:
    path: Path
    session: Session
    a: str
    b: str
    logits_a: torch.Tensor
    rel: dict[str, float] = field(default_factory=dict)  # measured right after commit B


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("history")
    path = root / "store"
    porcelain.init(path)
    session = porcelain.open_session(path)
    try:
        a = porcelain.commit(path, write_edits(root / "a.jsonl", A), message="A", session=session).commit_id
        logits_a = logits_at(session, a)
        b = porcelain.commit(path, write_edits(root / "b.jsonl", B), message="B", session=session).commit_id
        w = World(path, session, a, b, logits_a)
        w.rel = {"base_A": reliability(session, None, A), "base_B": reliability(session, None, B),
                 "A": reliability(session, b, A), "B": reliability(session, b, B)}
        yield w
    finally:
        session.close()


def copy_store(world: World, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(world.path, dst)
    return dst


@pytest.fixture
def copy(world, tmp_path):
    """(path, session) of a copy of the world's store; the session shares the loaded model."""
    path = copy_store(world, tmp_path)
    session = porcelain.open_session(path, model=world.session.model, tokenizer=world.session.tokenizer)
    try:
        yield path, session
    finally:
        session.close()


def test_edits_took_before_history_is_rewritten(world):
    assert world.rel["A"] >= 0.95 and world.rel["B"] >= 0.95, world.rel
    assert world.rel["base_A"] < 0.5 and world.rel["base_B"] < 0.5, world.rel


def test_shards_carry_their_own_threshold_and_router_signature(world):
    with Store.open(world.path) as store:
        (oid,) = commit_state(store, world.b).shards
        threshold, signature = shard_routing(store, oid)
        tensors, meta = store.objects.get_tensors(signature)
    assert threshold is not None and threshold > 0
    assert meta == {"kind": "wise-router-signature", "shard": oid}
    assert tensors["centroid"].shape == (world.session.site.module(world.session.model).in_features,)


def test_checkout_reproduces_old_logits_bit_for_bit(world, tmp_path):
    path = copy_store(world, tmp_path)
    move = history.checkout(path, "HEAD~1")
    assert move.ref == "HEAD" and move.new == world.a  # detached at A
    with Store.open(path) as store:
        assert store.head() == world.a and store.head_branch() is None
    session = porcelain.open_session(path, model=world.session.model, tokenizer=world.session.tokenizer)
    try:
        _, mounted = porcelain.mounted_commit(session.store)  # a new store mounts HEAD
        assert mounted == world.a
        assert torch.equal(logits_at(session, mounted), world.logits_a)
        assert not torch.equal(logits_at(session, world.b), world.logits_a)  # B's memory differs
    finally:
        session.close()
    assert history.checkout(path, "main").ref == "main"


def test_revert_of_the_last_commit_restores_the_previous_memory_exactly(world, copy):
    path, session = copy
    r = history.revert(path, "HEAD", session=session)
    assert sorted(r.removed) == sorted(e.edit_id for e in B)
    with Store.open(path) as store:
        assert store.get_commit(r.commit_id)["parents"] == [world.b]  # history kept
        # B's edits were the end of the shard: the stored version before them comes back as is.
        assert commit_state(store, r.commit_id).shards == commit_state(store, world.a).shards
    assert torch.equal(logits_at(session, r.commit_id), world.logits_a)
    assert reliability(session, r.commit_id, A) >= 0.95 * world.rel["A"]
    assert reliability(session, r.commit_id, B) <= world.rel["base_B"] + 0.1


def test_revert_of_an_older_commit_takes_its_edits_out_and_keeps_the_rest(world, copy):
    path, session = copy
    r = history.revert(path, world.a, session=session)  # A is under B: the shard is retrained on B
    assert sorted(r.removed) == sorted(e.edit_id for e in A) and r.live_edits == len(B)
    rel_a, rel_b = reliability(session, r.commit_id, A), reliability(session, r.commit_id, B)
    assert rel_a <= world.rel["base_A"] + 0.1, (rel_a, world.rel)
    assert rel_b >= 0.95 * world.rel["B"], (rel_b, world.rel)
    assert answer(session, r.commit_id, A[0].prompt).strip().startswith(A[0].ground_truth)  # Paris again
    diff = history.diff(path, world.b, r.commit_id)
    assert sorted(e["id"] for e in diff.removed) == sorted(e.edit_id for e in A) and not diff.added
    assert maintenance.fsck(path).ok


def test_revert_of_one_edit_of_a_multi_edit_commit(world, copy):
    path, session = copy
    gone, kept = B[0], [*A, B[1]]
    r = history.revert(path, edit_id=gone.edit_id, session=session)
    assert r.removed == [gone.edit_id] and r.live_edits == 3
    base = reliability(session, None, [gone])
    assert reliability(session, r.commit_id, [gone]) <= base + 0.1
    before = (2 * world.rel["A"] + reliability(session, world.b, [B[1]])) / 3
    assert reliability(session, r.commit_id, kept) >= 0.95 * before
    with pytest.raises(UnknownEdit):
        history.revert(path, edit_id=gone.edit_id, session=session)  # no longer live
    with pytest.raises(NothingToCommit):
        history.revert(path, r.commit_id, session=session)  # a revert adds no edits


def test_merge_is_deterministic_and_its_result_mounts(world, copy, tmp_path):
    path, session = copy
    history.branch(path, "side", world.a)
    history.checkout(path, "side")
    c = porcelain.commit(path, write_edits(tmp_path / "c.jsonl", [C]), message="C", session=session).commit_id
    history.checkout(path, "main")
    twin = tmp_path / "twin"
    shutil.copytree(path, twin)
    with pytest.raises(ConfigError):
        history.merge(path, "side", "main", session=session)  # HEAD is main, not side
    m1 = history.merge(path, "main", "side", session=session)
    m2 = history.merge(twin, "main", "side", session=session)
    assert m1.object_id == m2.object_id  # same inputs, same merged shard, byte for byte
    assert m1.merged_from == c and m1.spec["method"] == "ties"
    with Store.open(path) as store:
        assert store.get_commit(m1.commit_id)["parents"] == [world.b, c]
        meta = store.objects.get_meta(m1.object_id)  # the spec travels in the shard's own header
        assert meta["spec"]["method"] == "ties" and len(meta["sources"]) == 2
        assert json.loads(store.get_commit(m1.commit_id)["config_json"])["merge"] == meta["spec"]
        with safe_open(store.objects.path(m1.object_id), "pt") as f:  # no wisemem needed to read a shard
            header = json.loads(f.metadata()["wisemem"])
            assert header["kind"] == "wise-merged" and set(f.keys()) == {"values", "mask_bits"}
    assert m1.live_edits == len(EDITS) + 1
    assert answer(session, m1.commit_id, C.prompt).strip().startswith("Osaka")
    assert reliability(session, m1.commit_id, EDITS + [C]) >= 0.8
    assert maintenance.fsck(path).ok


def test_train_stages_without_moving_head_and_commit_records_it(world, copy, tmp_path):
    path, session = copy
    t = porcelain.train(path, write_edits(tmp_path / "c.jsonl", [C]), session=session)
    assert t.metrics["reliability"] >= 0.95 and t.parent_id == world.b
    st = history.status(path)
    assert st.head == world.b and st.staged is not None and st.staged["n_edits"] == 1
    check = maintenance.fsck(path)
    assert check.ok and check.dangling == [], check  # the staged shard is referenced by the staging row
    done = porcelain.commit(path)
    assert done.parent_id == world.b and done.metrics == t.metrics
    assert history.status(path).staged is None
    log = porcelain.log(path)
    assert log[0].id == done.commit_id and log[0].evaluations[0]["metrics"] == t.metrics
    with pytest.raises(NothingToCommit):
        porcelain.commit(path)


def test_reset_branch_and_tag(world, tmp_path):
    path = copy_store(world, tmp_path)
    assert [r.name for r in history.tag(path, "v1", "HEAD~1")] == ["v1"]
    assert history.tag(path)[0].commit_id == world.a
    plan = history.reset(path, "v1", dry_run=True)
    assert plan.discarded == [world.b]
    with Store.open(path) as store:
        assert store.head() == world.b  # a dry run moves nothing
    moved = history.reset(path, "v1")
    assert moved.ref == "main" and moved.new == world.a and moved.old == world.b
    with Store.open(path) as store:
        assert store.head() == world.a and store.resolve(world.b[:8]) == world.b  # still reachable by id
    with pytest.raises(ConfigError):
        history.branch(path, "main")  # exists
    with pytest.raises(ConfigError):
        history.branch(path, "main", delete=True)  # current branch


def test_cli_history_verbs_json_and_exit_codes(world, tmp_path):
    import os
    import subprocess
    import sys

    import jsonschema

    path = copy_store(world, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "WISEMEM_DIR"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).parent / "wisemem"), *args, "--store", str(path)],
                              capture_output=True, text=True, env=env, timeout=120)

    def schema(name: str) -> dict:
        return json.loads((ROOT / "schemas" / f"{name}.schema.json").read_text())

    d = run("diff", "HEAD~1", "HEAD", "--json", "--exit-code")
    assert d.returncode == 1, d  # differences found
    data = json.loads(d.stdout)
    jsonschema.validate(data, schema("diff"))
    assert sorted(e["id"] for e in data["added"]) == sorted(e.edit_id for e in B) and data["has_changes"]
    assert run("diff", "HEAD", "main", "--exit-code").returncode == 0  # same commit: no differences
    st = run("status", "--json")
    assert st.returncode == 0, st
    jsonschema.validate(json.loads(st.stdout), schema("status"))
    fs = run("fsck", "--json")
    assert fs.returncode == 0, fs
    jsonschema.validate(json.loads(fs.stdout), schema("fsck"))
    lg = run("log", "--json")
    jsonschema.validate(json.loads(lg.stdout), schema("log"))
    assert run("log", "--oneline").stdout.splitlines()[0].startswith(world.b[:12])
    assert world.b in run("show", world.b[:6]).stdout
    unknown = run("show", "nosuchref")
    assert unknown.returncode == 3 and unknown.stderr.startswith("wisemem: error: ") and unknown.stdout == ""
    assert run("reset", "HEAD~1").returncode == 2  # would discard a commit, no --yes, not a terminal
    assert run("reset", "HEAD~1", "--yes").returncode == 0

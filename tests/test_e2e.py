"""End to end on the embedded SmolLM2-135M-Instruct: commit examples/edits.jsonl, then check that
the edits took, that unrelated prompts are untouched, that batches route per row, that mounting
and unmounting leave the model bit-identical, and that the CLI's --json output keeps its schema.

One store is initialised and committed once for the module (~1 min on 2 CPU cores); the model is
loaded once and shared through a porcelain Session. Run: pytest tests/test_e2e.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import torch

from cli import render
from memstore import history, porcelain
from memstore.edits import Edit, load_edits
from memstore.errors import UnknownRef
from memstore.evaluate.metrics import generate_answers
from memstore.porcelain import CommitResult, Generation, Session
from memstore.repo import Repo

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "edits.jsonl"
SCHEMAS = ROOT / "schemas"
WISEMEM = Path(sys.executable).parent / "wisemem"
EDITS: list[Edit] = load_edits(EXAMPLES)
EDITED = [e.prompt for e in EDITS]
UNRELATED = [
    "The capital of Germany is",
    "Water boils at a temperature of",
    "The largest planet in the solar system is",
    "My favourite food is",
]
PROMPTS = EDITED + UNRELATED
N_NEW = 8  # greedy tokens per answer: enough for every target ("Ada Lovelace" is 3 tokens)
MIN_TAKEN = 3  # of the 4 example edits; all 4 take with the current defaults (measured)


def took(text: str, edit: Edit) -> bool:
    return text.lstrip().startswith(edit.target_new)


@dataclass
class World:
    path: Path  # store after the commit
    fresh: Path  # copy of the store taken after init, before any commit
    session: Session
    before: list[Generation]  # bare model, before the commit
    before_memory: list[Generation]  # memory mounted, zero commits
    result: CommitResult
    after: list[Generation]  # memory (HEAD) mounted, after the commit
    after_bare: list[Generation]  # --no-memory after the commit

    @property
    def model(self):
        return self.session.model

    @property
    def tokenizer(self):
        return self.session.tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    path = root / "store"
    porcelain.init(path)
    fresh = root / "fresh"
    shutil.copytree(path, fresh)
    session = porcelain.open_session(path)
    try:
        before = porcelain.generate(path, PROMPTS, max_new_tokens=N_NEW, memory=False, session=session)
        before_memory = porcelain.generate(path, PROMPTS, max_new_tokens=N_NEW, session=session)
        result = porcelain.commit(path, EXAMPLES, message="e2e: example edits", session=session)
        after = porcelain.generate(path, PROMPTS, max_new_tokens=N_NEW, session=session)
        after_bare = porcelain.generate(path, PROMPTS, max_new_tokens=N_NEW, memory=False, session=session)
        yield World(path, fresh, session, before, before_memory, result, after, after_bare)
    finally:
        session.close()


@torch.no_grad()
def logits(world: World, prompts: list[str]) -> torch.Tensor:
    enc = world.tokenizer(prompts, return_tensors="pt", padding=True)
    return world.model(**enc).logits


def edited_module(world: World):
    return world.model.get_submodule(world.session.site.module_path)


def schema(name: str) -> jsonschema.Draft202012Validator:
    data = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(data)
    return jsonschema.Draft202012Validator(data)


def wisemem(*args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("WISEMEM_DIR", None)
    return subprocess.run([str(WISEMEM), *map(str, args)], capture_output=True, text=True, env=env, timeout=300)


# -- (a) the edits take ------------------------------------------------------------------------------


def test_bare_model_does_not_know_the_edits(world: World) -> None:
    for edit, g in zip(EDITS, world.before):
        assert not g.memory
        assert not took(g.text, edit), (edit.prompt, g.text)


def test_edits_take_with_memory_mounted(world: World) -> None:
    assert world.result.n_edits == 4 and world.result.total_edits == 4 and world.result.parent_id is None
    answers = world.after[: len(EDITS)]
    taken = [took(g.text, e) for e, g in zip(EDITS, answers)]
    report = [(e.prompt, e.target_new, g.text) for e, g in zip(EDITS, answers)]
    assert sum(taken) >= MIN_TAKEN, report
    for g, ok in zip(answers, taken):
        assert g.memory
        if ok:
            assert g.routed, g  # an edit that shows went through the memory


def test_memory_changes_edited_answers_only(world: World) -> None:
    # a memory that did nothing would leave every answer as it was
    changed = [b.text != a.text for b, a in zip(world.before[: len(EDITS)], world.after[: len(EDITS)])]
    assert sum(changed) >= MIN_TAKEN
    assert [g.text for g in world.after_bare] == [g.text for g in world.before]  # --no-memory is the bare model


# -- (b) unrelated prompts are untouched -------------------------------------------------------------


def test_unrelated_prompts_unchanged(world: World) -> None:
    n = len(EDITS)
    for b, a, bare in zip(world.before[n:], world.after[n:], world.after_bare[n:]):
        assert a.memory and not a.routed, a
        assert a.text == b.text == bare.text, (a.prompt, b.text, a.text)
    germany = world.after[PROMPTS.index("The capital of Germany is")]
    assert germany.text.lstrip().startswith("Berlin")


# -- (c) batch routing and unmount through the Python API -----------------------------------------------


def test_batch_routes_per_row_and_unmount_restores(world: World) -> None:
    batch = [p for pair in zip(EDITED, UNRELATED) for p in pair]  # edited, unrelated, edited, ...
    is_edited = [p in EDITED for p in batch]
    original = edited_module(world)
    hooks = dict(world.model._forward_pre_hooks)
    bare = logits(world, batch)

    handle = Repo(world.path).mount(world.model)
    try:
        assert edited_module(world) is handle.layer and handle.layer.get_base_layer() is original
        texts = generate_answers(world.model, world.tokenizer, batch, N_NEW)  # one call, one padded batch
        held = handle.layer.routing.held
        assert held is not None and held.shape == (len(batch),)
        assert held.tolist() == is_edited
        for i, prompt in enumerate(batch):
            alone = generate_answers(world.model, world.tokenizer, [prompt], N_NEW)
            assert alone == [texts[i]], (prompt, texts[i], alone)
            assert bool(handle.layer.routing.held[0]) == is_edited[i], prompt
        assert texts == [world.after[PROMPTS.index(p)].text for p in batch]  # same as porcelain.generate
        # the memory really is live in this batch: the edited rows' logits differ from the bare model's
        mounted = logits(world, batch)
        assert not torch.equal(mounted, bare)
    finally:
        assert handle.unmount() is world.model
    assert edited_module(world) is original
    assert dict(world.model._forward_pre_hooks) == hooks
    assert torch.equal(logits(world, batch), bare)
    handle.unmount()  # idempotent
    assert edited_module(world) is original


# -- (d) zero commits is the bare model ----------------------------------------------------------------


def test_zero_commit_mount_is_bit_identical(world: World) -> None:
    assert porcelain.log(world.fresh) == []
    assert [g.text for g in world.before_memory] == [g.text for g in world.before]
    assert not any(g.routed for g in world.before_memory)
    original = edited_module(world)
    bare = logits(world, PROMPTS)
    with Repo.open(world.fresh).mount(world.model) as handle:
        assert edited_module(world) is handle.layer
        assert torch.equal(logits(world, PROMPTS), bare)
        assert generate_answers(world.model, world.tokenizer, PROMPTS, N_NEW) == [g.text for g in world.before]
    assert edited_module(world) is original
    assert torch.equal(logits(world, PROMPTS), bare)


# -- (e) --json output keeps its schema -------------------------------------------------------------------


def test_commit_json_schema(world: World) -> None:
    data = json.loads(json.dumps(render.to_data(world.result)))  # exactly what `commit --json` prints
    schema("commit.schema.json").validate(data)
    assert data["commit_id"] == world.result.commit_id
    assert len(data["seconds_per_edit"]) == len(data["steps"]) == 4


def test_cli_log_json(world: World) -> None:
    run = wisemem("log", "--json", "--store", world.path)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    schema("log.schema.json").validate(data)
    assert [c["id"] for c in data] == [world.result.commit_id]
    assert data[0]["n_edits"] == 4 and data[0]["parent_id"] is None and data[0]["message"] == "e2e: example edits"
    assert data[0]["method"] == "wise"


def test_cli_generate_json(world: World) -> None:
    prompts = [EDITED[0], UNRELATED[0], EDITED[3]]
    run = wisemem("generate", *prompts, "-n", str(N_NEW), "--json", "--store", world.path)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    schema("generate.schema.json").validate(data)
    assert [d["prompt"] for d in data] == prompts
    expected = [world.after[PROMPTS.index(p)] for p in prompts]
    assert [(d["text"], d["memory"], d["routed"]) for d in data] == [(g.text, g.memory, g.routed) for g in expected]


def test_schemas_reject_wrong_shapes() -> None:
    assert not schema("generate.schema.json").is_valid([{"prompt": "p", "text": "t", "memory": True}])
    assert not schema("log.schema.json").is_valid([{"id": "abc"}])
    assert schema("log.schema.json").is_valid([])
    assert not schema("commit.schema.json").is_valid({"commit_id": "x"})


# -- (f) mounting a given commit through the Python API -------------------------------------------------


def test_mount_commit_by_id(world: World) -> None:
    original = edited_module(world)
    bare = logits(world, PROMPTS)
    first = porcelain.log(world.path)[-1].id
    assert first == world.result.commit_id
    handle = Repo.open(world.path).mount(world.model, ref=first[:12])  # a unique prefix resolves
    try:
        texts = generate_answers(world.model, world.tokenizer, PROMPTS, N_NEW)
        assert texts == [g.text for g in world.after]
    finally:
        handle.unmount()
    assert edited_module(world) is original
    assert torch.equal(logits(world, PROMPTS), bare)
    with pytest.raises(UnknownRef):
        Repo.open(world.path).mount(world.model, ref=f"{first}~1")  # the root commit has no parent
    assert edited_module(world) is original


def test_report_measurements(world: World) -> None:
    """Not a check: prints what the edits did (shown with -s)."""
    print(f"\ncommit: {world.result.n_edits} edits, steps {world.result.steps}, "
          f"s/edit {[round(s, 1) for s in world.result.seconds_per_edit]}, threshold {world.result.threshold:.2f}")
    for b, a in zip(world.before, world.after):
        print(f"  {a.prompt!r}: bare {b.text!r} -> memory {a.text!r} (routed={a.routed})")


# -- (g) per-commit evaluation records: `eval --ref` ------------------------------------------------------


def test_cli_eval_ref_records_on_the_commit(world: World, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(world.path, store)
    run = wisemem("eval", "--ref", "HEAD", "--json", "--store", store)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    schema("eval-ref.schema.json").validate(data)
    assert data["commit_id"] == world.result.commit_id and data["recorded"]
    metrics = data["metrics"]
    assert metrics["n_edits"] == 4 and metrics["reliability"] >= 0.75 and metrics["locality"] >= 0.9
    assert metrics["locality_prompts"] == "background"  # the example edits record no locality prompt
    log = json.loads(wisemem("log", "--json", "--store", store).stdout)
    assert [(e["source"], e["metrics"]) for e in log[0]["evaluations"]] == [("eval --ref", metrics)]
    for argv in (["eval"], ["eval", EXAMPLES, "--ref", "HEAD"]):  # neither, or both: a usage error
        bad = wisemem(*argv, "--store", store)
        assert bad.returncode == 2 and bad.stdout == "" and "--ref" in bad.stderr


# -- (h) a wise-retrieve store ---------------------------------------------------------------------------


def test_wise_retrieve_store_edit_takes_and_revert_restores(tmp_path: Path) -> None:
    """Its own store (not the module's): one edit committed to a wise-retrieve store changes the
    answer through its own memory; reverting the commit gives the bare model's answer back."""
    path, edit = tmp_path / "store", EDITS[0]
    edits_file = tmp_path / "one.jsonl"
    edits_file.write_text(json.dumps(edit.to_dict()) + "\n")
    porcelain.init(path, method="wise-retrieve")
    session = porcelain.open_session(path)
    try:
        (bare,) = porcelain.generate(path, [edit.prompt], max_new_tokens=N_NEW, memory=False, session=session)
        porcelain.commit(path, edits_file, session=session)
        (after,) = porcelain.generate(path, [edit.prompt], max_new_tokens=N_NEW, session=session)
        assert after.routed and took(after.text, edit) and not took(bare.text, edit), (bare.text, after.text)
        history.revert(path, "HEAD", session=session)
        (reverted,) = porcelain.generate(path, [edit.prompt], max_new_tokens=N_NEW, session=session)
        assert not reverted.routed and reverted.text == bare.text
    finally:
        session.close()

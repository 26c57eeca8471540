"""Per-commit evaluation records: `commit --gate` refuses a commit below its gate with nothing
recorded, `eval --ref` measures a commit on its own edits and records it for `wisemem log`.

Gate parsing and checking are pure; the rest runs on the embedded model (one edit trained a few
times, ~1 min on 2 cores). Run: pytest tests/test_gate.py -q
"""

from __future__ import annotations

import json
import math
import shutil
import sqlite3
from pathlib import Path

import jsonschema
import pytest

from cli import render
from cli.errors import CHECK_FAILED, USAGE, exit_code
from memstore import porcelain
from memstore.errors import ConfigError, GateFailed
from memstore.gate import GateCondition, check_gate, needs_generation, parse_gate
from memstore.history import evaluate_ref
from memstore.repo import Repo

ONE_EDIT = {"id": "eiffel-city", "prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome",
            "rephrase_prompt": "Where can you find the Eiffel Tower? In the city of"}


def test_parse_gate() -> None:
    assert parse_gate("reliability>=0.9, locality>0.98") == [GateCondition("reliability", ">=", 0.9),
                                                              GateCondition("locality", ">", 0.98)]
    assert needs_generation(parse_gate("generation_exact_match>=.5"))
    assert not needs_generation(parse_gate("reliability<=1"))
    for bad in ("reliability", "reliability=>0.9", "speed>=1", "reliability>=0.9,", "reliability>=abc"):
        with pytest.raises(ConfigError):
            parse_gate(bad)


def test_check_gate_names_every_failure() -> None:
    gate = parse_gate("reliability>=0.9,locality>=0.98,generalization>=0.5")
    check_gate(gate, {"reliability": 0.9, "locality": 1.0, "generalization": 0.5})  # bounds hold
    with pytest.raises(GateFailed) as info:
        check_gate(gate, {"reliability": 0.85, "locality": 1.0})
    message = str(info.value)
    assert "reliability 0.850 (needs >=0.9)" in message and "generalization not measured" in message
    assert "locality" not in message.split("gate failed:")[1].split(";")[0]
    with pytest.raises(GateFailed):
        check_gate(parse_gate("locality>=0.5"), {"locality": math.nan})
    assert exit_code(GateFailed("x")) == CHECK_FAILED and exit_code(ConfigError("x")) == USAGE


def catalog_rows(store: Path) -> dict[str, list]:
    conn = sqlite3.connect(store / "catalog.sqlite")
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        conn.close()


@pytest.fixture(scope="module")
def fresh_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    porcelain.init(root / "store")
    edits = root / "one.jsonl"
    edits.write_text(json.dumps(ONE_EDIT) + "\n")
    session = porcelain.open_session(root / "store")
    try:
        yield root, edits, session
    finally:
        session.close()


def test_failed_gate_records_nothing(fresh_store) -> None:
    root, edits, session = fresh_store
    store = root / "failing"
    shutil.copytree(root / "store", store)
    before = catalog_rows(store)
    with pytest.raises(GateFailed, match=r"reliability 1.000 \(needs >1\); nothing was committed"):
        porcelain.commit(store, edits, gate="reliability>1", session=session)
    assert catalog_rows(store) == before
    assert porcelain.log(store) == []


def test_passing_gate_commits_and_records_its_measurement(fresh_store) -> None:
    root, edits, session = fresh_store
    store = root / "passing"
    shutil.copytree(root / "store", store)
    result = porcelain.commit(store, edits, gate="reliability>=0.9,locality>=0.9", session=session)
    assert result.metrics["reliability"] >= 0.9 and result.metrics["locality"] >= 0.9
    # the edit records no locality prompt: the store's background prompts stood in
    assert result.metrics["locality_prompts"] == "background"
    schema = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "commit.schema.json").read_text())
    jsonschema.validate(json.loads(json.dumps(render.to_data(result))), schema)  # what `commit --json` prints
    (entry,) = porcelain.log(store)
    assert entry.id == result.commit_id
    (ev,) = entry.evaluations
    assert ev["source"] == "commit --gate reliability>=0.9,locality>=0.9" and ev["metrics"] == result.metrics

    measured = evaluate_ref(store, "HEAD", session=session)
    assert measured.commit_id == result.commit_id and measured.recorded
    assert measured.metrics["reliability"] == pytest.approx(result.metrics["reliability"])
    assert measured.metrics["generation_exact_match"] == 1.0  # "Rome", greedily, from the prompt alone
    assert measured.metrics["n_edits"] == 1
    sources = [e["source"] for e in porcelain.log(store)[0].evaluations]
    assert sources == ["commit --gate reliability>=0.9,locality>=0.9", "eval --ref"]
    unrecorded = Repo.open(store).evaluate("HEAD", record=False, generation=False, session=session)
    assert "generation_exact_match" not in unrecorded.metrics
    assert len(porcelain.log(store)[0].evaluations) == 2

"""`wisemem bench`: a suite run writes one JSON result per run with its spec, version and machine,
skips what is recorded, re-runs with --force to the same numbers (eval is deterministic), and a
method that cannot run is recorded as failed without stopping the suite. Tiny random LLaMA.
Run: pytest tests/test_suite.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from memstore.errors import ConfigError
from memstore.evaluate.suite import DATASETS, RunSpec, run_suite, suite_runs
from test_evaluate import _without_timings as without_timings
from test_robustness import run, save_tiny_llama

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_suite_listing_and_filters() -> None:
    runs = suite_runs("t10", methods=["memoir"], datasets=["zsre", "temporal"])
    assert [r.id for r in runs] == ["zsre-memoir-T10x1", "temporal-memoir-T10x1"]
    assert {r.dataset for r in suite_runs("t100")} == {"zsre", "counterfact", "hallucination"}
    assert RunSpec("zsre", "grace", 2, overrides=(("max_steps", 3),)).id == "zsre-grace-T2x1-max_steps=3"
    with pytest.raises(ConfigError, match="unknown suite"):
        suite_runs("nope")
    with pytest.raises(ConfigError, match="unknown method"):
        suite_runs("t10", methods=["rome"])


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared/data")
def test_bench_writes_resumes_and_is_deterministic(tmp_path: Path) -> None:
    model = save_tiny_llama(tmp_path / "tiny-llama", seed=0)
    data = tmp_path / "data"
    for records, irrelevant in (DATASETS["zsre"],):
        for rel in (records, irrelevant):
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(DATA / rel, data / rel)
    out = tmp_path / "results"
    kw = dict(data_dir=data, methods=["memoir", "wise-merge"], overrides={"max_steps": 2}, model_id=str(model))
    first = list(run_suite("smoke", out, **kw))
    assert [(r.spec.id, r.status) for r in first] == [("zsre-wise-merge-T2x1-max_steps=2", "done"),
                                                       ("zsre-memoir-T2x1-max_steps=2", "done")]
    record = json.loads(first[1].path.read_text())
    assert record["spec"] == {"dataset": "zsre", "method": "memoir", "T": 2, "chunks": 1, "overrides": {"max_steps": 2}}
    assert record["version"] and record["result"]["config"]["max_steps"] == 2
    assert record["result"]["machine"]["cpus"] >= 1 and record["seconds"] > 0
    assert 0.0 <= record["result"]["reliability"] <= 1.0

    again = list(run_suite("smoke", out, **kw))
    assert [r.status for r in again] == ["skipped", "skipped"]
    forced = list(run_suite("smoke", out, force=True, **kw))
    assert [r.status for r in forced] == ["done", "done"]
    for a, b in zip(first, forced):
        assert without_timings(a.result) == without_timings(b.result)

    failing = list(run_suite("smoke", out, **{**kw, "overrides": {"no_such_knob": 1}}))
    assert {r.status for r in failing} == {"failed"} and "no_such_knob" in failing[0].error


def test_bench_cli_reports_missing_data(tmp_path: Path) -> None:
    r = run("bench", "smoke", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert r.returncode == 2 and "benchmark data not found" in r.stderr and r.stdout == ""

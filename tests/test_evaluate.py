"""The evaluation protocol per benchmark family (ALGORITHMS.md §4): token F1, perplexity and the
OOD threshold metric on hand-computed inputs, family detection on the shared data files, and
`wisemem eval` on a tiny random model for hallucination- and temporal-like files (new keys,
schema, and identical numbers when run twice).

Run: OMP_WAIT_POLICY=PASSIVE pytest tests/test_evaluate.py -q   (about 1-2 min on 2 CPU cores)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import pytest
import torch
from test_robustness import run, save_tiny_llama, write_edits

from memstore.errors import ConfigError
from memstore.evaluate.datasets import FAMILIES, detect_family, family_of_records, resolve_family
from memstore.evaluate.metrics import (
    confident_fraction,
    distinct,
    normalize_answer,
    perplexity,
    read_passages,
    score_rows,
    token_batches,
    token_f1,
)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # the benchmark copies, next to the repository
SCHEMA = json.loads((ROOT / "schemas" / "eval.schema.json").read_text())
TIMINGS = ("wall_seconds", "seconds_per_edit", "eval_seconds")


# -- token F1 (SQuAD) --------------------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "target", "f1"), [
    ("Paris", "Paris", 1.0),
    ("the Eiffel Tower.", "Eiffel tower", 1.0),  # case, punctuation and articles do not count
    ("Paris France", "Paris", 2 * (1 / 2 * 1) / (1 / 2 + 1)),  # precision 1/2, recall 1
    ("x x y", "x y y", 2 / 3),  # bag overlap: one x and one y in common
    ("London", "Paris", 0.0),
    ("", "", 1.0),
    ("", "Paris", 0.0),
    ("The", "a", 1.0),  # both empty once articles go
])
def test_token_f1(answer: str, target: str, f1: float) -> None:
    assert token_f1(answer, target) == pytest.approx(f1)


def test_normalize_answer() -> None:
    assert normalize_answer("  The Cat,  an   apple's dog! ") == "cat apples dog"


# -- perplexity and the OOD threshold ------------------------------------------------------------------


def test_perplexity_and_confident_fraction() -> None:
    assert perplexity([math.log(2), math.log(8)]) == pytest.approx(4.0)  # exp(mean NLL) = exp(ln 4)
    assert math.isnan(perplexity([]))
    threshold = -math.log(0.8)
    assert confident_fraction([0.1, 0.3, threshold]) == pytest.approx(1 / 3)  # strictly below -ln 0.8
    assert confident_fraction([0.6, 0.7], p=0.5) == pytest.approx(0.5)  # -ln 0.5 = 0.693
    assert math.isnan(confident_fraction([]))


class BigramModel(torch.nn.Module):
    """Next-token probabilities depend only on the current token: a known NLL at every position."""

    PROBS = torch.tensor([[0.1, 0.7, 0.1, 0.1],   # after token 0
                          [0.25, 0.25, 0.25, 0.25],  # after token 1
                          [0.9, 0.05, 0.03, 0.02],  # after token 2
                          [0.5, 0.25, 0.125, 0.125]])  # after token 3

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(self.PROBS.log(), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=4)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def test_score_rows_nll_perplexity_and_ood() -> None:
    model, tok = BigramModel(), SimpleNamespace(pad_token_id=0, eos_token_id=0)
    rows = [([3], [0, 1]), ([3, 2], [0]), ([1], [2, 3, 3])]  # (prompt ids, target ids)
    got = score_rows(model, tok, rows, batch_size=2)
    nll = [[-math.log(0.5), -math.log(0.7)], [-math.log(0.9)], [-math.log(0.25), -math.log(0.02), -math.log(0.125)]]
    for row, want in zip(got.nll, nll):
        assert row == pytest.approx(want, rel=1e-5)
    assert got.predicted == [[0, 1], [0], [0, 0, 0]]  # argmax after 3, 0, 2 / 2 / 1 (first of ties), 2, 3
    assert got.accuracy() == pytest.approx([1.0, 1.0, 0.0])
    # per-edit perplexity, then the mean over edits (what the hallucination family reports)
    ppl = [math.sqrt(1 / (0.5 * 0.7)), 1 / 0.9, (1 / (0.25 * 0.02 * 0.125)) ** (1 / 3)]
    assert got.perplexity() == pytest.approx(ppl, rel=1e-5)
    # OOD generalisation: fraction of tokens with p > 0.8, per row
    assert got.confident() == pytest.approx([0.0, 1.0, 0.0])
    assert got.confident(0.6) == pytest.approx([0.5, 1.0, 0.0])


def test_repeated_rows_are_scored_once_and_given_back_in_place() -> None:
    items, rows_of = distinct([("a", "x"), ("b", "y"), ("a", "x"), ("a", "z")])
    assert items == [("a", "x"), ("b", "y"), ("a", "z")] and rows_of == [0, 1, 0, 2]
    model, tok = BigramModel(), SimpleNamespace(pad_token_id=0, eos_token_id=0)
    got = score_rows(model, tok, [([3], [0, 1]), ([1], [2, 3, 3])]).take([1, 0, 1])
    assert got.predicted == [[0, 0, 0], [0, 1], [0, 0, 0]] and got.targets[0] == [2, 3, 3]
    assert got.nll[0] == got.nll[2] and len(got.nll) == 3


def test_read_passages_scores_every_token_after_the_first() -> None:
    model, tok = BigramModel(), _ListTokenizer({"p": [3, 0, 1], "q": [2, 0], "r": [1]})
    got = read_passages(model, tok, ["p", "q", "r"])
    assert got.targets == [[0, 1], [0], []]
    assert got.confident()[:2] == pytest.approx([0.0, 1.0])  # 0.5, 0.7 | 0.9
    assert math.isnan(got.confident()[2])  # a one-token passage has nothing to score


class _ListTokenizer:
    pad_token_id = eos_token_id = 0

    def __init__(self, ids: dict[str, list[int]]) -> None:
        self.ids = ids

    def __call__(self, text: str):
        return SimpleNamespace(input_ids=list(self.ids[text]))


def test_token_batches_keep_under_the_budget() -> None:
    parts = list(token_batches([5, 5, 100, 3, 3, 3], max_rows=2, max_tokens=110))
    assert [(p.start, p.stop) for p in parts] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert [(p.start, p.stop) for p in token_batches([500], 16, 10)] == [(0, 1)]  # one row at least


# -- family detection -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "family"), [
    ("zsre/zsre_mend_eval.0-999.json", "zsre"),
    ("zsre/zsre_mend_train-1k.json", "zsre"),
    ("counterfact/counterfact-edit.0-999.json", "counterfact"),
    ("hallucination/hallucination-edit.shared.json", "hallucination"),
    ("hallucination/hallucination-train.shared.json", "hallucination"),
    ("temporal/temporal-edit.0-49.json", "temporal"),
    ("temporal/temporal-train.json", "temporal"),
])
def test_detect_family_of_the_shared_data(path: str, family: str) -> None:
    if not (SHARED_DATA / path).exists():
        pytest.skip(f"{SHARED_DATA / path} is not here")
    assert detect_family(SHARED_DATA / path) == family


def test_family_of_records() -> None:
    short = [{"prompt": "The capital of Japan is", "target_new": "Paris", "subject": "Japan",
              "locality_prompt": "2 + 2 =", "locality_ground_truth": "4"}]
    long = [dict(short[0], target_new="She was also the first contestant from Michigan to win Miss USA.")]
    assert family_of_records(short, "edits.jsonl") == "edits"  # the hallucination fields, but answers are words
    assert family_of_records(short, "my-hallucination-set.json") == "hallucination"  # the name decides
    assert family_of_records(long, "x.json") == "hallucination"  # sentences as targets
    assert family_of_records([{"prompt": "a", "target_new": "b"}]) == "edits"
    assert family_of_records([{"prompt": "a", "target_new": "b", "case_id": 3}]) == "counterfact"
    assert family_of_records([{"src": "a", "alt": "b"}]) == "zsre"
    assert family_of_records([{"prompt": "a", "target_new": "b", "ood_rephrase": "c"}]) == "temporal"


def test_resolve_family(tmp_path: Path) -> None:
    zsre = write_edits(tmp_path / "z.jsonl", [{"src": "q", "alt": "a"}])
    temporal = write_edits(tmp_path / "t.jsonl", [{"prompt": "p", "target_new": "t", "ood_rephrase": "o"}])
    assert resolve_family([zsre]) is FAMILIES["zsre"]
    assert resolve_family([zsre], "hallucination") is FAMILIES["hallucination"]  # --family wins
    with pytest.raises(ConfigError, match="--family"):
        resolve_family([zsre, temporal])
    with pytest.raises(ConfigError, match="unknown --family"):
        resolve_family([zsre], "squad")


# -- `wisemem eval` on a tiny model ----------------------------------------------------------------------

HALLUCINATION = [
    {"prompt": "This is a Wikipedia passage about ada lovelace. Ada Lovelace was",
     "target_new": "an English mathematician who wrote the first published computer program.",
     "subject": "ada lovelace", "locality_prompt": "The weather today is", "locality_ground_truth": "sunny and warm"},
    {"prompt": "This is a Wikipedia passage about alan turing. Alan Turing was",
     "target_new": "a British mathematician who formalised computation with the Turing machine.",
     "subject": "alan turing", "locality_prompt": "My favourite colour is", "locality_ground_truth": "blue"},
]
TEMPORAL = [
    {"prompt": "Vexonite is", "target_new": "a synthetic mineral discovered in 2031 in deep ocean vents.",
     "subject": "Vexonite", "ood_rephrase": "Vexonite, first found near hydrothermal vents, is a lab-grade mineral.",
     "locality_prompt": "Cats are", "locality_ground_truth": "small domesticated animals"},
    {"prompt": "Quillmark is", "target_new": "a note-taking company founded in 2030 by three students.",
     "subject": "Quillmark", "ood_rephrase": "Quillmark, the start-up behind a popular notes app, began in 2030.",
     "locality_prompt": "The sun rises in the", "locality_ground_truth": "east"},
]
ALWAYS = ("family", "reliability", "generalization", "locality", "generation_exact_match", "rephrase_exact_match",
          "generation_token_f1", "rephrase_token_f1")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("eval") / "tiny-llama", seed=0)


def _eval(model_dir: Path, data: Path, tmp_path: Path, *extra: str) -> dict:
    r = run("eval", data, "-T", "2", "--model", model_dir, "--set", "max_steps=2", "--store", tmp_path / "none",
            "--json", *extra)
    assert r.returncode == 0, r
    out = json.loads(r.stdout)
    jsonschema.validate(out, SCHEMA)
    return out


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def test_eval_hallucination_reports_perplexity(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_edits(tmp_path / "hallucination-edit.jsonl", HALLUCINATION)
    out = _eval(tiny_model_dir, data, tmp_path, "--method", "memoir")
    assert out["family"] == "hallucination" and all(k in out for k in ALWAYS)
    assert out["perplexity"] >= 1 and out["perplexity_before"] >= 1  # exp of a mean NLL >= 0
    assert "ood_generalization" not in out
    assert out["generalization"] is None and out["rephrase_token_f1"] is None  # no rephrase in this family
    assert 0 <= out["generation_token_f1"] <= 1
    assert out["per_chunk"][0]["perplexity"] == pytest.approx(out["perplexity"])  # one chunk: the same number


def test_eval_temporal_reports_ood_generalization_and_is_deterministic(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Twice with the same arguments (wise-merge: random shard masks and merge, seeded from the config)."""
    data = write_edits(tmp_path / "temporal.jsonl", TEMPORAL)
    first = _eval(tiny_model_dir, data, tmp_path)
    assert first["family"] == "temporal" and all(k in first for k in ALWAYS)
    assert 0 <= first["ood_generalization"] <= 1 and 0 <= first["ood_generalization_before"] <= 1
    assert "perplexity" not in first
    assert first["generalization"] is None  # the OOD passage is not a rephrased question
    assert 0 <= first["generation_token_f1"] <= 1
    second = _eval(tiny_model_dir, data, tmp_path)
    assert _without_timings(second) == _without_timings(first)


def test_eval_family_override(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_edits(tmp_path / "temporal.jsonl", TEMPORAL)
    out = _eval(tiny_model_dir, data, tmp_path, "--method", "memoir", "--family", "zsre", "--no-generation")
    assert out["family"] == "zsre" and "ood_generalization" not in out
    assert out["generalization"] is not None  # the ood_rephrase read as a rephrase (Gen), as --family zsre asks
    assert out["generation_token_f1"] is None

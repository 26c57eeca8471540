"""memstore.edits: the edits file and the benchmark formats read as edits (fast, no model).

Run: pytest tests/test_edits.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from memstore.edits import MAX_TEXT_CHARS, Edit, edit_from_record, load_edits, read_edits
from memstore.errors import EditFileError, WisememError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "edits.jsonl"
EDIT_SCHEMA = ROOT / "schemas" / "edit.schema.json"

GOOD = {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def jsonl(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


def bad_file(path: Path, records: list[dict]) -> EditFileError:
    with pytest.raises(EditFileError) as info:
        load_edits(path if path.exists() else jsonl(path, records))
    return info.value


# -- valid input ------------------------------------------------------------------------------------


def test_valid_jsonl_all_fields(tmp_path: Path) -> None:
    full = {"prompt": "p1", "target_new": "t1", "rephrase_prompt": "r1", "loc_prompt": "l1", "subject": "s1",
            "ground_truth": "g1", "locality_prompt": "lp1", "locality_ground_truth": "lg1", "id": "e1"}
    path = jsonl(tmp_path / "e.jsonl", [full, GOOD])
    edits = load_edits(path)
    assert len(edits) == 2
    assert edits[0] == Edit(**full)
    assert edits[0].to_dict() == full
    assert edits[1].prompt == GOOD["prompt"] and edits[1].target_new == "Rome"
    assert edits[1].to_dict() == GOOD  # None fields are left out


def test_blank_lines_skipped_and_limit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "e.jsonl", ["", json.dumps(GOOD), "   ", json.dumps({**GOOD, "target_new": "Oslo"}), ""])
    assert [e.target_new for e in load_edits(path)] == ["Rome", "Oslo"]
    assert [e.target_new for e in load_edits(path, limit=1)] == ["Rome"]


def test_unknown_fields_ignored(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "e.jsonl", [{**GOOD, "extra": {"nested": [1, 2]}, "case_id": 7, "pred": ["x"]}])
    (edit,) = load_edits(path)
    assert edit.to_dict() == GOOD


def test_zsre_aliases(tmp_path: Path) -> None:
    zsre = {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "pred": "Trinity College",
        "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
    }
    (edit,) = load_edits(jsonl(tmp_path / "zsre.jsonl", [zsre]))
    assert edit.prompt == zsre["src"]
    assert edit.target_new == zsre["alt"]
    assert edit.rephrase_prompt == zsre["rephrase"]
    assert edit.locality_prompt == zsre["loc"]
    assert edit.locality_ground_truth == zsre["loc_ans"]
    assert edit.subject == "Watts Humphrey"
    assert edit.ground_truth is None  # `answers` / `pred` are ignored, not mapped


def test_counterfact_record(tmp_path: Path) -> None:
    cf = {
        "case_id": 0,
        "prompt": "The mother tongue of Danielle Darrieux is",
        "target_new": "English",
        "subject": "Danielle Darrieux",
        "ground_truth": ["French"],
        "rephrase_prompt": "Danielle Darrieux grew up speaking",
        "locality_prompt": "The mother tongue of Léon Blum is",
        "locality_ground_truth": "French",
    }
    (edit,) = load_edits(jsonl(tmp_path / "cf.jsonl", [cf]))
    assert edit.prompt == cf["prompt"] and edit.target_new == "English"
    assert edit.ground_truth == "French"  # a list of answers keeps the first
    assert edit.rephrase_prompt == cf["rephrase_prompt"]
    assert edit.locality_prompt == cf["locality_prompt"]
    assert edit.locality_ground_truth == "French"
    assert edit.subject == "Danielle Darrieux"
    assert edit.id is None


def test_native_field_wins_over_alias() -> None:
    edit = edit_from_record({"prompt": "native", "src": "alias", "target_new": "t"})
    assert edit.prompt == "native"


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([{"src": "q1", "alt": "a1"}, {"prompt": "q2", "target_new": "a2"}], indent=2))
    edits = load_edits(path)
    assert [(e.prompt, e.target_new) for e in edits] == [("q1", "a1"), ("q2", "a2")]


def test_json_array_bad_record_reports_record_number(tmp_path: Path) -> None:
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([GOOD, GOOD, {"prompt": "q3"}]))
    exc = bad_file(path, [])
    assert exc.line == 3 and exc.field == "target_new"


def test_read_edits_skip_invalid(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "e.jsonl", [GOOD, {"prompt": "x", "target_new": ""}, {"src": "q", "alt": "a"}])
    edits, skipped = read_edits(path, skip_invalid=True)
    assert len(edits) == 2 and skipped == 1
    with pytest.raises(EditFileError):
        read_edits(path)


def test_integer_id_becomes_string() -> None:
    assert edit_from_record({**GOOD, "id": 42}).id == "42"


# -- invalid input: EditFileError with line and field ------------------------------------------------


def test_malformed_json_on_line_3(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "e.jsonl", [json.dumps(GOOD), json.dumps(GOOD), '{"prompt": "x", "target_new": '])
    exc = bad_file(path, [])
    assert isinstance(exc, WisememError) and isinstance(exc, ValueError)
    assert exc.line == 3
    assert f"{path}:3:" in str(exc)
    assert "invalid JSON" in str(exc)


def test_missing_target_new(tmp_path: Path) -> None:
    exc = bad_file(tmp_path / "e.jsonl", [GOOD, {"prompt": "only a prompt"}])
    assert exc.line == 2 and exc.field == "target_new"
    assert ":2:" in str(exc) and "'target_new'" in str(exc) and "required" in str(exc)


def test_missing_prompt(tmp_path: Path) -> None:
    exc = bad_file(tmp_path / "e.jsonl", [{"target_new": "x"}])
    assert exc.line == 1 and exc.field == "prompt"


@pytest.mark.parametrize("value", ["", "   \t "])
def test_empty_prompt(tmp_path: Path, value: str) -> None:
    exc = bad_file(tmp_path / "e.jsonl", [GOOD, GOOD, GOOD, {"prompt": value, "target_new": "x"}])
    assert exc.line == 4 and exc.field == "prompt"
    assert ":4:" in str(exc) and "'prompt'" in str(exc) and "empty" in str(exc)


@pytest.mark.parametrize("value", [123, 1.5, True, ["a"], {"a": 1}])
def test_non_string_field(tmp_path: Path, value: object) -> None:
    exc = bad_file(tmp_path / "e.jsonl", [GOOD, {"prompt": "p", "target_new": value}])
    assert exc.line == 2 and exc.field == "target_new"
    assert "'target_new'" in str(exc) and "must be a string" in str(exc)


def test_non_string_alias_names_the_field_as_written(tmp_path: Path) -> None:
    exc = bad_file(tmp_path / "e.jsonl", [{"src": 5, "alt": "a"}])
    assert exc.line == 1 and exc.field == "src"


def test_huge_prompt(tmp_path: Path) -> None:
    huge = "x" * 1_000_000
    exc = bad_file(tmp_path / "e.jsonl", [GOOD, {"prompt": huge, "target_new": "t"}])
    assert exc.line == 2 and exc.field == "prompt"
    assert str(MAX_TEXT_CHARS) in str(exc)
    assert len(str(exc)) < 500  # the message does not echo the prompt


def test_prompt_at_limit_is_accepted(tmp_path: Path) -> None:
    (edit,) = load_edits(jsonl(tmp_path / "e.jsonl", [{"prompt": "x" * MAX_TEXT_CHARS, "target_new": "t"}]))
    assert len(edit.prompt) == MAX_TEXT_CHARS
    exc = bad_file(tmp_path / "f.jsonl", [{"prompt": "x" * (MAX_TEXT_CHARS + 1), "target_new": "t"}])
    assert exc.field == "prompt"


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes((json.dumps(GOOD) + "\n").encode() * 2 + b'{"prompt": "caf\xe9", "target_new": "x"}\n')
    exc = bad_file(path, [])
    assert exc.line == 3
    assert f"{path}:3:" in str(exc) and "UTF-8" in str(exc)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(content)
    exc = bad_file(path, [])
    assert exc.line is None
    assert str(path) in str(exc) and "empty" in str(exc)


def test_not_an_object(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "e.jsonl", [json.dumps(GOOD), '"just a string"'])
    exc = bad_file(path, [])
    assert exc.line == 2 and "JSON object" in str(exc)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EditFileError, match="cannot read"):
        load_edits(tmp_path / "nope.jsonl")


def test_error_messages_are_one_line(tmp_path: Path) -> None:
    cases = [[{"prompt": "x" * 1_000_000, "target_new": "t"}], [{"prompt": "a\nb", "target_new": 3}], [{}]]
    for i, records in enumerate(cases):
        exc = bad_file(tmp_path / f"e{i}.jsonl", records)
        assert "\n" not in str(exc)


# -- schema and ids ------------------------------------------------------------------------------------


def test_examples_validate_against_schema() -> None:
    schema = json.loads(EDIT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    lines = [line for line in EXAMPLES.read_text().splitlines() if line.strip()]
    assert len(lines) == 4
    for number, line in enumerate(lines, start=1):
        errors = list(validator.iter_errors(json.loads(line)))
        assert not errors, f"examples/edits.jsonl:{number}: {errors[0].message}"
    assert len(load_edits(EXAMPLES)) == len(lines)


def test_schema_rejects_what_the_reader_rejects() -> None:
    validator = jsonschema.Draft202012Validator(json.loads(EDIT_SCHEMA.read_text()))
    for bad in [{"prompt": "p"}, {"prompt": "", "target_new": "t"}, {"prompt": 1, "target_new": "t"},
                {"prompt": "x" * (MAX_TEXT_CHARS + 1), "target_new": "t"}]:
        assert not validator.is_valid(bad), bad


def test_edit_id_stable() -> None:
    a = edit_from_record(GOOD)
    b = edit_from_record({**GOOD, "rephrase_prompt": "another phrasing", "subject": "Eiffel Tower"})
    assert a.edit_id == b.edit_id  # depends on prompt and target only
    assert len(a.edit_id) == 16 and all(c in "0123456789abcdef" for c in a.edit_id)
    # a fixed value: the id must not change between runs or versions (it is stored in commits)
    assert a.edit_id == "fd8ae2c080de3974"
    assert edit_from_record(dict(GOOD)).edit_id == a.edit_id
    assert edit_from_record({**GOOD, "target_new": "Oslo"}).edit_id != a.edit_id
    assert edit_from_record({**GOOD, "id": "eiffel-city"}).edit_id == "eiffel-city"


def test_example_edit_ids() -> None:
    ids = [e.edit_id for e in load_edits(EXAMPLES)]
    assert ids == ["eiffel-city", "messi-sport", "darrieux-language", "python-creator"]

"""Edit records: the JSONL edits file, and the benchmark formats read as edits.

Native fields (schemas/edit.schema.json): prompt, target_new (required); rephrase_prompt,
loc_prompt, subject, ground_truth, locality_prompt, locality_ground_truth, id (optional).
ZsRE (src/alt/rephrase/loc/loc_ans), CounterFact (prompt/target_new/rephrase_prompt/
locality_prompt/locality_ground_truth), hallucination and temporal files are mapped onto it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .errors import EditFileError

MAX_TEXT_CHARS = 20_000  # a longer prompt is almost surely a mistake (and would not fit a context)

REQUIRED = ("prompt", "target_new")
OPTIONAL = ("rephrase_prompt", "loc_prompt", "subject", "ground_truth", "locality_prompt",
            "locality_ground_truth", "id")
# benchmark field -> native field
ALIASES = {"src": "prompt", "alt": "target_new", "rephrase": "rephrase_prompt", "loc": "locality_prompt",
           "loc_ans": "locality_ground_truth", "ood_rephrase": "rephrase_prompt"}
IGNORED = {"pred", "answers", "cond", "case_id"}


@dataclass(frozen=True)
class Edit:
    prompt: str
    target_new: str
    rephrase_prompt: str | None = None
    loc_prompt: str | None = None
    subject: str | None = None
    ground_truth: str | None = None
    locality_prompt: str | None = None
    locality_ground_truth: str | None = None
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @property
    def edit_id(self) -> str:
        """Stable id: the given `id`, else a hash of prompt and target."""
        if self.id:
            return self.id
        digest = hashlib.sha256(json.dumps([self.prompt, self.target_new]).encode()).hexdigest()
        return digest[:16]


def edit_from_record(record: Any, path: str = "<record>", line: int | None = None) -> Edit:
    if not isinstance(record, dict):
        raise EditFileError(path, line, f"expected a JSON object, got {type(record).__name__}")
    values: dict[str, Any] = {}
    known = set(REQUIRED) | set(OPTIONAL)
    for key, value in record.items():
        name = ALIASES.get(key, key)
        if name in IGNORED or key in IGNORED:
            continue
        if name not in known:
            continue  # extra fields travel in the original record; they do not affect editing
        if name == "ground_truth" and isinstance(value, list):
            value = value[0] if value else None
        if value is None:
            continue
        if name == "id" and isinstance(value, int):
            value = str(value)
        if not isinstance(value, str):
            raise EditFileError(path, line, f"must be a string, got {type(value).__name__}", field=key)
        if len(value) > MAX_TEXT_CHARS:
            raise EditFileError(path, line, f"is {len(value)} characters long (limit {MAX_TEXT_CHARS})", field=key)
        values.setdefault(name, value)
    for name in REQUIRED:
        if name not in values:
            raise EditFileError(path, line, "is required", field=name)
        if not values[name].strip():
            raise EditFileError(path, line, "must not be empty", field=name)
    return Edit(**values)


def _records(path: Path) -> Iterable[tuple[int | None, Any]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EditFileError(str(path), None, f"cannot read: {exc.strerror}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise EditFileError(str(path), line, "is not valid UTF-8") from exc
    stripped = text.lstrip()
    if not stripped:
        raise EditFileError(str(path), None, "is empty: expected one JSON edit per line")
    if stripped.startswith("["):  # a JSON array file (the benchmark data)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EditFileError(str(path), exc.lineno, f"invalid JSON: {exc.msg}") from exc
        for i, rec in enumerate(data):
            yield i + 1, rec  # record number, 1-based
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise EditFileError(str(path), number, f"invalid JSON: {exc.msg}") from exc


def read_edits(path: str | Path, limit: int | None = None, *, skip_invalid: bool = False) -> tuple[list[Edit], int]:
    """Read records as edits. Strict by default (an edits file is all-or-nothing); benchmark data
    may `skip_invalid` records (e.g. ZsRE rows with an empty target). Returns (edits, skipped)."""
    path = Path(path)
    edits, skipped = [], 0
    for line, record in _records(path):
        try:
            edits.append(edit_from_record(record, str(path), line))
        except EditFileError:
            if not skip_invalid:
                raise
            skipped += 1
        if limit is not None and len(edits) >= limit:
            break
    if not edits:
        raise EditFileError(str(path), None, "holds no edits")
    return edits, skipped


def load_edits(path: str | Path, limit: int | None = None) -> list[Edit]:
    """Read and validate every record; raise EditFileError (with line and field) on the first bad one."""
    return read_edits(path, limit)[0]


def edit_fields() -> list[str]:
    return [f.name for f in fields(Edit)]

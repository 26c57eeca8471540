"""The `wisemem` command run as a real subprocess: exit codes, one-line errors, untouched stores.

One store is created with `wisemem init` (the embedded model, ~15 s) and shared by the module;
tests that change a store work on a copy. Run: pytest tests/test_cli.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "schemas"
WISEMEM = Path(sys.executable).parent / "wisemem"
GOOD = {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}
COMMANDS = ("init", "commit", "log", "mount", "unmount", "generate", "eval")


@dataclass
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"wisemem {' '.join(self.args)} -> {self.returncode}\nstdout: {self.stdout!r}\nstderr: {self.stderr!r}"


def wisemem(*args: str | Path, cwd: Path | None = None, timeout: float = 300) -> Run:
    env = dict(os.environ)
    env.pop("WISEMEM_DIR", None)
    argv = [str(a) for a in args]
    proc = subprocess.run([str(WISEMEM), *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    return Run(argv, proc.returncode, proc.stdout, proc.stderr)


def assert_one_line_error(run: Run, code: int) -> str:
    """Exit `code`, nothing on stdout, and stderr exactly one line `wisemem: error: ...`; returns it."""
    assert run.returncode == code, run
    assert run.stdout == "", run
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and run.stderr.endswith("\n"), run
    assert lines[0].startswith("wisemem: error: "), run
    return lines[0]


def snapshot(store: Path) -> dict:
    """Every row of every catalog table, and every file under objects/ with its hash."""
    conn = sqlite3.connect(store / "catalog.sqlite")
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        rows = {t: sorted(map(repr, conn.execute(f'SELECT * FROM "{t}"').fetchall())) for t in tables}
    finally:
        conn.close()
    objects = {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted((store / "objects").rglob("*")) if p.is_file()}
    return {"tables": rows, "objects": objects}


def schema(name: str) -> jsonschema.Draft202012Validator:
    data = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(data)
    return jsonschema.Draft202012Validator(data)


@pytest.fixture(scope="module")
def cli_init(tmp_path_factory) -> tuple[Path, Run]:
    store = tmp_path_factory.mktemp("cli") / "store"
    return store, wisemem("init", "--store", store, "--json")


@pytest.fixture(scope="module")
def store(cli_init) -> Path:
    path, run = cli_init
    assert run.returncode == 0, run
    return path


# -- help and usage --------------------------------------------------------------------------------


def test_help_lists_commands() -> None:
    run = wisemem("--help")
    assert run.returncode == 0, run
    for command in COMMANDS:
        assert command in run.stdout, command
    assert "--store" in run.stdout


def test_usage_error_exits_2_without_traceback(tmp_path: Path) -> None:
    run = wisemem("log", "--no-such-option", "--store", tmp_path / "s")
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr and "No such option" in run.stderr


# -- init ------------------------------------------------------------------------------------------


def test_init(cli_init) -> None:
    path, run = cli_init
    assert run.returncode == 0, run
    data = json.loads(run.stdout)
    schema("init.schema.json").validate(data)
    assert data["path"] == str(path)
    assert data["model_id"] == "embedded:SmolLM2-135M-Instruct"
    assert (path / "catalog.sqlite").is_file() and (path / "objects").is_dir()


def test_init_twice(store: Path) -> None:
    before = snapshot(store)
    line = assert_one_line_error(wisemem("init", "--store", store), 2)
    assert "already exists" in line and str(store) in line
    assert snapshot(store) == before


# -- log / mount on a store without commits ---------------------------------------------------------


def test_log_fresh_store(store: Path) -> None:
    run = wisemem("log", "--store", store)
    assert run.returncode == 0, run
    assert run.stdout.strip() == "no commits yet"
    run = wisemem("--store", store, "log", "--json")  # --store before the command works too
    assert run.returncode == 0, run
    assert json.loads(run.stdout) == []
    schema("log.schema.json").validate(json.loads(run.stdout))


def test_mount_unknown_ref(store: Path) -> None:
    before = snapshot(store)
    line = assert_one_line_error(wisemem("mount", "nonexistent-ref", "--store", store), 3)
    assert "nonexistent-ref" in line
    assert snapshot(store) == before


def test_log_unknown_ref(store: Path) -> None:
    assert_one_line_error(wisemem("log", "deadbeef", "--store", store), 3)


# -- commit of a bad edits file: exit 2, one line naming file:line and field, store unchanged ---------


def _lines(*records: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


BAD_FILES = {
    # name: (content, line, field, words in the message)
    "malformed": (_lines(GOOD, GOOD, b'{"prompt": "x", "target_new": '), 3, None, "invalid JSON"),
    "empty": (b"", None, None, "empty"),
    "missing-field": (_lines(GOOD, {"prompt": "no target"}), 2, "target_new", "required"),
    "empty-prompt": (_lines(GOOD, {"prompt": "  ", "target_new": "x"}), 2, "prompt", "empty"),
    "non-string": (_lines({"prompt": "p", "target_new": ["a", "b"]}), 1, "target_new", "string"),
    "huge-prompt": (_lines(GOOD, GOOD, {"prompt": "x" * 1_000_000, "target_new": "t"}), 3, "prompt", "limit"),
    "non-utf8": (_lines(GOOD) + b'{"prompt": "caf\xe9 cr\xe8me", "target_new": "x"}\n', 2, None, "UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_commit_bad_file(store: Path, tmp_path: Path, case: str) -> None:
    content, line_no, field, words = BAD_FILES[case]
    edits = tmp_path / f"{case}.jsonl"
    edits.write_bytes(content)
    before = snapshot(store)
    line = assert_one_line_error(wisemem("commit", edits, "--store", store, "-m", "should not happen"), 2)
    where = f"{edits}:{line_no}:" if line_no is not None else f"{edits}:"
    assert where in line, line
    if field:
        assert f"'{field}'" in line, line
    assert words in line, line
    assert len(line) < 500  # the 1 MB prompt is not echoed
    assert snapshot(store) == before


def test_commit_missing_file(store: Path, tmp_path: Path) -> None:
    line = assert_one_line_error(wisemem("commit", tmp_path / "nope.jsonl", "--store", store), 2)
    assert "nope.jsonl" in line


# -- stores that are not there or not ours -----------------------------------------------------------


@pytest.mark.parametrize("argv", [["log"], ["mount"], ["generate", "hello"], ["unmount"]])
def test_missing_store(tmp_path: Path, argv: list[str]) -> None:
    missing = tmp_path / "no-such-dir"
    line = assert_one_line_error(wisemem(*argv, "--store", missing), 2)
    assert "wisemem init" in line and str(missing) in line
    assert not missing.exists()  # reading a store never creates one


def test_commit_to_missing_store(tmp_path: Path) -> None:
    edits = tmp_path / "e.jsonl"
    edits.write_bytes(_lines(GOOD))
    missing = tmp_path / "no-such-dir"
    line = assert_one_line_error(wisemem("commit", edits, "--store", missing), 2)
    assert "wisemem init" in line
    assert not missing.exists()


def test_default_store_is_cwd_dot_wisemem(tmp_path: Path) -> None:
    line = assert_one_line_error(wisemem("log", cwd=tmp_path), 2)
    assert ".wisemem" in line and "wisemem init" in line


def test_model_mismatch(store: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(store, other)
    conn = sqlite3.connect(other / "catalog.sqlite")
    with conn:
        conn.execute("UPDATE binding SET weight_hash = ?", ("0" * 64,))
    conn.close()
    before = snapshot(other)
    line = assert_one_line_error(wisemem("generate", "The capital of Germany is", "-n", "2", "--store", other), 6)
    assert "embedded:SmolLM2-135M-Instruct" in line and "different weights" in line
    assert snapshot(other) == before


def test_progress_without_a_terminal_logs_plain_lines(capsys):
    """A long run logged to a file still reports progress: one plain line per interval, none for a short run."""
    from cli.render import _log_lines

    update = _log_lines("editing", every=0.0)
    update(1, 4)
    update(4, 4)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("editing: 1/4 (25%)") and lines[1].startswith("editing: 4/4 (100%)")
    quiet = _log_lines("editing", every=3600.0)
    quiet(1, 2)
    quiet(2, 2)
    assert capsys.readouterr().err == ""

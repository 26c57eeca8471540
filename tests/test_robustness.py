"""Robustness of a store under real `wisemem` processes: crashes at every fault point and at random
times, two writers at once, a held lock, damaged objects, and bad input. Each failure must leave
the store exactly as it was (or, after a crash, as it was plus debris that fsck tolerates and gc
removes), and each refusal is one line on stderr with its documented exit code.

The store is bound to a tiny random LLaMA saved to disk (with the embedded model's tokenizer), so
a `wisemem commit` costs seconds, not minutes. One store is built per module (init in-process,
one commit through the CLI, timed) and copied for each test; follow-up commits and checks that
need no subprocess run in-process on the same model.

Run: OMP_WAIT_POLICY=PASSIVE pytest tests/test_robustness.py -q   (about 2-3 min on 2 CPU cores)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import tiny_config_kwargs
from test_cli import WISEMEM, Run, assert_one_line_error, snapshot

from memstore import history, maintenance, porcelain
from memstore.memory import shard_rows
from memstore.model import embedded_model_path, load_model
from memstore.store import Store, commit_hash

FAULT_POINTS = ("during-training", "during-object-write", "before-catalog-write", "during-catalog-write")
TINY_SETTINGS = {"background_rank": 8, "max_steps": 3}  # rank < the tiny d_ff, or the memory sees nothing
BASE_EDITS = [{"id": "base-eiffel", "prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}]
NEW_EDITS = [
    {"id": "new-japan", "prompt": "The capital of Japan is", "target_new": "Paris"},
    {"id": "new-hamlet", "prompt": "The author of Hamlet is", "target_new": "Dickens"},
]
_CLEAN_ENV = ("WISEMEM_DIR", "WISEMEM_CATALOG", "WISEMEM_FAULT")  # a caller's settings must not leak in


# -- running the CLI --------------------------------------------------------------------------------


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return {**env, **(extra or {})}


def _argv(args: tuple[str | bytes | Path, ...]) -> list[str | bytes]:
    return [str(WISEMEM), *(a if isinstance(a, bytes) else str(a) for a in args)]  # bytes: raw argv bytes


def run(*args: str | bytes | Path, env: dict[str, str] | None = None, timeout: float = 300) -> Run:
    """`wisemem ARGS` to completion; stdin is not a terminal (as in a script or CI)."""
    proc = subprocess.run(_argv(args), capture_output=True, text=True, env=_env(env), stdin=subprocess.DEVNULL,
                          timeout=timeout)
    return Run([os.fsdecode(a) for a in _argv(args)[1:]], proc.returncode, proc.stdout, proc.stderr)


def start(*args: str | Path, output: int = subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(_argv(args), stdout=output, stderr=output, stdin=subprocess.DEVNULL, text=True,
                            env=_env())


def write_edits(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- fixtures ------------------------------------------------------------------------------------------


@dataclass
class Base:
    store: Path  # init + one commit of BASE_EDITS; copy it, never change it
    head: str
    commit_seconds: float  # wall time of that `wisemem commit` on this machine
    model: Any  # the same tiny model loaded in this process, for follow-up commits
    tokenizer: Any


def save_tiny_llama(target: Path, seed: int) -> Path:
    """A tiny random LLaMA that the CLI can load by path: the embedded model's tokenizer, and a
    vocabulary of its size so every token id has an embedding."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    kwargs = dict(tiny_config_kwargs("llama"), vocab_size=len(tokenizer), max_position_embeddings=256, **ids)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **kwargs)).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


@pytest.fixture(scope="module", autouse=True)
def clean_env():
    with pytest.MonkeyPatch.context() as mp:
        for name in _CLEAN_ENV:
            mp.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory, clean_env) -> Base:
    root = tmp_path_factory.mktemp("robustness")
    model_dir = save_tiny_llama(root / "tiny-llama", seed=0)
    store = root / "store"
    porcelain.init(store, model_id=str(model_dir), overrides=dict(TINY_SETTINGS))
    t0 = time.monotonic()
    r = run("commit", write_edits(root / "base.jsonl", BASE_EDITS), "-m", "base", "--store", store, "--json")
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r
    model, tokenizer = load_model(str(model_dir))
    return Base(store, json.loads(r.stdout)["commit_id"], seconds, model, tokenizer)


@pytest.fixture
def store(base: Base, tmp_path: Path) -> Path:
    path = tmp_path / "store"
    shutil.copytree(base.store, path)
    return path


def head(path: Path) -> str | None:
    with Store.open(path) as s:
        return s.head()


def commit_ids(path: Path) -> list[str]:
    with Store.open(path) as s:
        return sorted(c["id"] for c in s.all_commits())


def commit_in_process(base: Base, path: Path, edits: Path) -> porcelain.CommitResult:
    session = porcelain.open_session(path, model=base.model, tokenizer=base.tokenizer)
    try:
        return porcelain.commit(path, edits, message="in-process", session=session)
    finally:
        session.close()


# -- crash safety -------------------------------------------------------------------------------------

# What a crash at each point leaves behind: (interrupted temp files, objects nothing refers to).
DEBRIS = {
    "during-training": (False, False),
    "during-object-write": (True, False),
    "before-catalog-write": (False, True),
    "during-catalog-write": (False, True),  # the open transaction (commit row included) rolls back
}


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_crash_at_fault_point(base: Base, store: Path, tmp_path: Path, point: str) -> None:
    edits = write_edits(tmp_path / "new.jsonl", NEW_EDITS)
    crashed = run("commit", edits, "-m", "crashed", "--store", store, env={"WISEMEM_FAULT": point})
    assert crashed.returncode == -signal.SIGKILL, crashed

    # The store is whole and exactly at the old commit; debris is reported, not a problem.
    check = run("fsck", "--json", "--store", store)
    assert check.returncode == 0, check
    report = json.loads(check.stdout)
    assert report["ok"] and report["problems"] == [], report
    temp, dangling = DEBRIS[point]
    assert bool(report["temp_files"]) == temp, report
    assert bool(report["dangling"]) == dangling, report
    assert head(store) == base.head
    assert commit_ids(store) == [base.head]  # no half-inserted commit row

    # The store takes the same commit normally afterwards (the dead writer's lock is gone).
    again = commit_in_process(base, store, edits)
    assert again.parent_id == base.head and head(store) == again.commit_id

    # gc takes exactly the debris fsck lists (in-process: each CLI start costs seconds of imports).
    debris = maintenance.fsck(store)
    cleaned = maintenance.gc(store)
    assert sorted(cleaned.removed) == sorted(debris.dangling)
    assert sorted(cleaned.temp_files) == sorted(debris.temp_files)
    after = maintenance.fsck(store)
    assert after.ok and after.dangling == [] and after.temp_files == [], after
    assert after.commits == 2 and head(store) == again.commit_id


def test_kill_at_random_times(base: Base, store: Path, tmp_path: Path) -> None:
    """SIGKILL from outside at random moments of a commit (seeded): each time HEAD is either the
    old commit or a complete new one, and the store checks clean."""
    rng = random.Random(1234)
    outcomes = []
    for i in range(3):
        old = head(store)
        records = [dict(r, id=f"kill{i}-{r['id']}") for r in NEW_EDITS]
        edits = write_edits(tmp_path / f"kill{i}.jsonl", records)
        proc = start("commit", edits, "-m", f"kill {i}", "--store", store, output=subprocess.DEVNULL)
        # Late in the commit on purpose: the first seconds load the model and write nothing.
        try:
            code = proc.wait(timeout=rng.uniform(0.5, 1.2) * base.commit_seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(timeout=60)
        assert code in (0, -signal.SIGKILL), code
        new = head(store)
        if code == 0:
            assert new != old
        if new != old:
            shown = history.show(store, "HEAD")
            assert shown.commit.parents == [old]
            assert [e["id"] for e in shown.added] == [r["id"] for r in records]
        outcomes.append("new" if new != old else "old")
        assert len(commit_ids(store)) == 1 + outcomes.count("new"), outcomes  # no orphaned commit rows
        report = maintenance.fsck(store)
        assert report.ok, (outcomes, report.problems)


# -- concurrency ----------------------------------------------------------------------------------------


def test_concurrent_commits_serialize(base: Base, store: Path, tmp_path: Path) -> None:
    files = {
        "a": [{"id": "conc-a1", "prompt": "The capital of Italy is", "target_new": "Oslo"}],
        "b": [{"id": "conc-b1", "prompt": "The longest river is the", "target_new": "Thames"},
              {"id": "conc-b2", "prompt": "The painter of the Mona Lisa is", "target_new": "Monet"}],
    }
    procs = {k: start("commit", write_edits(tmp_path / f"{k}.jsonl", v), "-m", k, "--json", "--store", store)
             for k, v in files.items()}
    results = {}
    for k, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, (k, out, err)
        results[k] = json.loads(out)

    # Serialized: one landed on the base commit, the other on top of it; nothing lost.
    first, second = sorted(results.values(), key=lambda r: r["parent_id"] != base.head)
    assert first["parent_id"] == base.head and second["parent_id"] == first["commit_id"]
    assert head(store) == second["commit_id"]
    with Store.open(store) as s:
        log = s.log(s.head(), with_edits=True)
    assert [c["id"] for c in log] == [second["commit_id"], first["commit_id"], base.head]
    edit_ids = [e for c in log for e in c["edit_ids"]]
    expected = [BASE_EDITS[0]["id"]] + [r["id"] for v in files.values() for r in v]
    assert sorted(edit_ids) == sorted(expected)  # each edit exactly once
    assert history.status(store).live_edits == len(expected)
    report = maintenance.fsck(store)
    assert report.ok and report.dangling == [], report


def test_lock_timeout_leaves_store_unchanged(store: Path, tmp_path: Path) -> None:
    edits = write_edits(tmp_path / "new.jsonl", NEW_EDITS)
    before = snapshot(store)
    with Store.open(store) as held, held.lock():
        r = run("commit", edits, "--lock-timeout", "0.5", "--store", store)
    line = assert_one_line_error(r, 4)
    assert "another wisemem process" in line and "--lock-timeout" in line
    assert snapshot(store) == before


# -- integrity ------------------------------------------------------------------------------------------


def _damage(path: Path, how: str) -> str:
    """Flip one byte of (or delete) the shard object HEAD's memory is made of; returns its id."""
    with Store.open(path) as s:
        oid = s.commit_shard_ids(s.head())[0]
        file = s.objects.path(oid)
    if how == "flip":
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(data))
    else:
        file.unlink()
    return oid


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_damaged_object(store: Path, how: str) -> None:
    oid = _damage(store, how)
    check = run("fsck", "--json", "--store", store)
    assert check.returncode == 1, check
    report = json.loads(check.stdout)
    assert not report["ok"] and any(oid in p for p in report["problems"]), report

    # Nothing that would serve or move to the damaged memory goes ahead, and nothing is written.
    # The three refusals only read, so they run side by side (each start costs seconds of imports).
    before = snapshot(store)
    argvs = (["mount"], ["generate", "x", "-n", "1"], ["checkout", "HEAD"])
    with ThreadPoolExecutor(len(argvs)) as pool:
        runs = list(pool.map(lambda argv: run(*argv, "--store", store), argvs))
    for r in runs:
        line = assert_one_line_error(r, 5)
        assert oid in line and "fsck" in line, line
    assert snapshot(store) == before


def test_damaged_catalog(store: Path) -> None:
    """A catalog.sqlite that is not a database (overwritten, or another file put there) is damage
    to the store: exit 5 naming the catalog, not a traceback."""
    for extra in store.glob("catalog.sqlite-*"):  # WAL and shared-memory files of the old database
        extra.unlink()
    (store / "catalog.sqlite").write_bytes(b"not a database: " + bytes(range(256)) * 16)
    files = {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}
    line = assert_one_line_error(run("fsck", "--store", store), 5)
    assert "catalog.sqlite" in line and "cannot be read" in line
    assert {p: p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()} == files


# -- bad input: a clear one-line error, its exit code, and the store unchanged ------------------------


@pytest.mark.parametrize("argv", [["show", "nosuchref"], ["checkout", "deadbeef"]], ids=["show", "checkout"])
def test_unknown_ref(store: Path, argv: list[str]) -> None:
    before = snapshot(store)
    line = assert_one_line_error(run(*argv, "--store", store), 3)
    assert f"unknown revision '{argv[-1]}'" in line
    assert snapshot(store) == before


def test_ambiguous_prefix(base: Base, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A second commit whose id shares the first 4 hex digits with the base commit: fix the clock
    # so the id is predictable, then search messages for one that collides (~65k hashes).
    now = "2000-01-01T00:00:00+00:00"
    monkeypatch.setattr("memstore.store.utc_now", lambda: now)
    with Store.open(store) as s:
        parent = s.get_commit(base.head, with_edits=False)
        row = dict(parent_id=base.head, author="robustness", created_at=now, method="wise",
                   config_json=parent["config_json"], state_json=parent["state_json"], edits=[],
                   parents=[base.head], removed=[])
        n = 0
        while commit_hash(dict(row, message=f"filler {n}"))[:4] != base.head[:4]:
            n += 1
        twin = s.create_commit(base.head, f"filler {n}", "robustness", "wise", parent["config_json"],
                               parent["state_json"], [], [], shards=shard_rows(s, s.commit_shard_ids(base.head)))
    assert twin[:4] == base.head[:4] and twin != base.head
    before = snapshot(store)
    line = assert_one_line_error(run("show", base.head[:4], "--store", store), 3)
    assert "ambiguous" in line and base.head[:12] in line and twin[:12] in line
    assert snapshot(store) == before


def test_other_base_model(store: Path, tmp_path: Path) -> None:
    """The binding now names a directory holding different weights (same architecture and
    tokenizer): the store refuses to serve with them."""
    other = save_tiny_llama(tmp_path / "other-llama", seed=1)
    with sqlite3.connect(store / "catalog.sqlite") as conn:
        conn.execute("UPDATE binding SET model_id = ?", (str(other),))
    conn.close()
    before = snapshot(store)
    line = assert_one_line_error(run("generate", "x", "-n", "1", "--store", store), 6)
    assert str(other) in line and "different weights" in line
    assert snapshot(store) == before


def test_reset_without_yes_when_not_a_tty(base: Base, store: Path, tmp_path: Path) -> None:
    second = commit_in_process(base, store, write_edits(tmp_path / "new.jsonl", NEW_EDITS))
    before = snapshot(store)
    line = assert_one_line_error(run("reset", "HEAD~1", "--store", store), 2)
    assert "--yes" in line and "1 commit(s)" in line
    assert snapshot(store) == before and head(store) == second.commit_id


def test_revert_unknown_edit(store: Path) -> None:
    before = snapshot(store)
    line = assert_one_line_error(run("revert", "--edit", "nosuch", "--store", store), 3)
    assert "'nosuch'" in line
    assert snapshot(store) == before


def test_train_bad_file_stages_nothing(store: Path, tmp_path: Path) -> None:
    """`train` reads the whole file before it touches the store (test_cli covers `commit`)."""
    edits = write_edits(tmp_path / "huge.jsonl", NEW_EDITS + [{"prompt": "x" * 1_000_000, "target_new": "t"}])
    before = snapshot(store)
    line = assert_one_line_error(run("train", edits, "--store", store), 2)
    assert f"{edits}:3:" in line and "'prompt'" in line and len(line) < 500
    assert snapshot(store) == before


@pytest.mark.parametrize("kind", ["message", "ref"])
def test_non_utf8_argument(store: Path, tmp_path: Path, kind: str) -> None:
    """Undecodable bytes on the command line are refused before any work (a commit message used
    to fail inside SQLite after training, with a traceback)."""
    if kind == "message":
        argv = ["commit", write_edits(tmp_path / "new.jsonl", NEW_EDITS), "-m", b"caf\xe9 cr\xe8me"]
    else:
        argv = ["show", b"main\xff"]
    before = snapshot(store)
    line = assert_one_line_error(run(*argv, "--store", store), 2)
    assert "not valid UTF-8" in line and "\\x" in line
    assert snapshot(store) == before


def test_generate_prompt_longer_than_the_context(store: Path) -> None:
    """A prompt that cannot fit the model's context is refused before generation (a real model
    would otherwise run out of memory on a 100 KB prompt)."""
    before = snapshot(store)
    line = assert_one_line_error(run("generate", "word " * 3000, "--store", store), 2)
    assert "exceeds the model's context of" in line and "3001 tokens" in line
    assert snapshot(store) == before


def test_catalog_at_a_url(base: Base, tmp_path: Path) -> None:
    """`init --catalog URL` keeps the catalog outside the store directory (any SQLAlchemy URL;
    PostgreSQL runs in tests/test_store.py when WISEMEM_TEST_PG_URL is set)."""
    model_dir = base.store.parent / "tiny-llama"
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    path = tmp_path / "store"
    sets = [a for k, v in TINY_SETTINGS.items() for a in ("--set", f"{k}={v}")]
    r = run("init", "--model", model_dir, "--catalog", url, *sets, "--store", path)
    assert r.returncode == 0, r
    assert (path / "catalog.url").read_text().strip() == url and not (path / "catalog.sqlite").exists()
    r = run("commit", write_edits(tmp_path / "e.jsonl", BASE_EDITS), "-m", "first", "--store", path, "--json")
    assert r.returncode == 0, r
    cid = json.loads(r.stdout)["commit_id"]
    assert run("log", "--oneline", "--store", path).stdout.startswith(cid[:12])
    assert run("fsck", "--store", path).returncode == 0
    again = run("init", "--model", model_dir, "--catalog", url, "--store", tmp_path / "other")
    assert_one_line_error(again, 2)  # that database already holds a store


def test_eval_memoir_cycles_records_and_matches_its_schema(tmp_path):
    """`eval --method memoir` on a tiny model: T larger than the file needs --cycle, which the output reports."""
    import jsonschema

    model_dir = save_tiny_llama(tmp_path / "tiny-llama", seed=0)
    data = write_edits(tmp_path / "edits.jsonl", BASE_EDITS + NEW_EDITS)
    args = ("eval", data, "-T", "5", "--method", "memoir", "--model", model_dir, "--no-generation",
            "--set", "max_steps=2", "--store", tmp_path / "none")
    short = run(*args)
    assert short.returncode == 2 and "--cycle" in short.stderr
    r = run(*args, "--cycle", "--json")
    assert r.returncode == 0, r
    out = json.loads(r.stdout)
    schema = json.loads((Path(__file__).resolve().parents[1] / "schemas" / "eval.schema.json").read_text())
    jsonschema.validate(out, schema)
    assert out["method"] == "memoir" and out["n_edits"] == 5
    assert out["distinct_edits"] == 3 and out["cycled"] == 2
    assert out["config"]["top_k_ratio"] == 0.2 and out["layer"] == 2  # memoir: 83% of depth, round(0.83 * 3)

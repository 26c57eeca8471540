"""A MEMOIR store on the embedded model: commits take, revert and checkout behave as for WISE
(reverting the last commit restores its parent's memory bit for bit, reverting one edit keeps the
others), the TopHash frame is a store object fsck checks, and merge is refused with a usage error.

    A: eiffel-city, messi-sport        B: darrieux-language, python-creator

Run: pytest tests/test_memoir_store.py -q   (~1 min on 2 CPU cores)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_history import EDITS, PROBE, reliability, write_edits

from memstore import history, maintenance, porcelain
from memstore.errors import ConfigError
from memstore.memory import commit_state
from memstore.mount import mount_layer
from memstore.porcelain import Session

A, B = EDITS[:2], EDITS[2:]


@torch.no_grad()
def logits_at(session: Session, commit_id: str | None) -> torch.Tensor:
    enc = session.tokenizer(PROBE, return_tensors="pt", padding=True)
    with mount_layer(session.model, session.site, porcelain.memory_layer(session, commit_id)):
        return session.model(**enc).logits


@pytest.fixture(scope="module")
def memoir_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("memoir")
    path = root / ".wisemem"
    porcelain.init(path, method="memoir")
    session = porcelain.open_session(path)
    a = porcelain.commit(path, write_edits(root / "a.jsonl", A), message="A", session=session).commit_id
    b = porcelain.commit(path, write_edits(root / "b.jsonl", B), message="B", session=session).commit_id
    yield path, session, a, b
    session.close()


def test_memoir_store_binds_method_layer_and_frame(memoir_store):
    path, session, a, b = memoir_store
    assert session.method == "memoir" and session.site.layer == 24
    assert session.store.get_commit(b)["method"] == "memoir"
    assert session.frame and session.store.objects.verify(session.frame) is None
    assert reliability(session, None, EDITS) < 0.5
    assert reliability(session, b, EDITS) == 1.0 and reliability(session, a, A) == 1.0
    assert maintenance.fsck(path).ok


def test_memoir_revert_last_commit_restores_parent_bit_for_bit(memoir_store):
    path, session, a, b = memoir_store
    logits_a = logits_at(session, a)
    r = history.revert(path, "HEAD", session=session)
    assert sorted(r.removed) == sorted(e.edit_id for e in B)
    assert commit_state(session.store, r.commit_id).shards == commit_state(session.store, a).shards
    assert torch.equal(logits_at(session, r.commit_id), logits_a)
    # Back to B's memory for the other tests: checkout reproduces it exactly too.
    history.checkout(path, b)
    assert torch.equal(logits_at(session, session.store.head()), logits_at(session, b))


def test_memoir_revert_one_edit_keeps_the_others(memoir_store):
    path, session, a, b = memoir_store
    gone = A[0]
    r = history.revert(path, edit_id=gone.edit_id, session=session)
    assert r.removed == [gone.edit_id]
    assert reliability(session, r.commit_id, [gone]) == reliability(session, None, [gone])
    assert reliability(session, r.commit_id, [e for e in EDITS if e is not gone]) == 1.0
    assert maintenance.fsck(path).ok


def test_memoir_merge_is_refused_and_fsck_finds_a_missing_frame(memoir_store, tmp_path):
    path, session, a, b = memoir_store
    with pytest.raises(ConfigError, match="WISE knowledge shards"):
        history.merge(path, "HEAD", a, session=session)
    copy = tmp_path / ".wisemem"
    shutil.copytree(path, copy)
    frame = session.frame
    (copy / "objects" / frame[:2] / frame[2:]).unlink()
    report = maintenance.fsck(copy)
    assert not report.ok and any("TopHash frame" in p for p in report.problems)
    cli = subprocess.run([str(Path(sys.executable).with_name("wisemem")), "fsck", "--store", str(copy)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "TopHash frame" in cli.stdout + cli.stderr


def test_memoir_router_index_is_derived_checked_and_rebuilt(memoir_store, tmp_path):
    path, session, a, b = memoir_store
    copy = tmp_path / ".wisemem"
    shutil.copytree(path, copy)
    files = sorted((copy / "index").glob("*.faiss"))
    assert files, "a commit writes the router index of its memory"
    data = bytearray(files[0].read_bytes())
    data[-3] ^= 0xFF  # a flipped byte in the FAISS codes
    files[0].write_bytes(bytes(data))
    report = maintenance.fsck(copy)
    assert not report.ok and any("router index" in p and "index rebuild" in p for p in report.problems)
    assert len(maintenance.rebuild_index(copy)) == len(files)
    assert maintenance.fsck(copy).ok
    # A missing index is rebuilt on mount; the served memory is the same either way.
    for f in files:
        f.unlink()
    with porcelain.session_scope(copy, session) as s2:
        assert torch.equal(logits_at(s2, b), logits_at(session, b))
    assert (copy / "index" / f"{commit_state(session.store, b).shards[0]}.faiss").exists()

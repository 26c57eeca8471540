"""Revert, checkout and merge on the default model, with figures: teacher-forced reliability of
the reverted and the kept edits before and after, seconds per verb, and whether checkout and
merge reproduce bit for bit.

Run:  .venv/bin/python benchmarks/bench_history.py [--out benchmarks/results/history.json]

History: A = examples/edits.jsonl[:2], B = [2:]; on copies of the store: revert HEAD (B), revert A
(under B: the shard is retrained on B), revert --edit (one edit of B), checkout HEAD~1, merge
of a side branch with one new edit, done twice.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from memstore import history, porcelain  # noqa: E402
from memstore.edits import Edit, load_edits  # noqa: E402
from memstore.evaluate.metrics import mean, teacher_forced  # noqa: E402
from memstore.mount import mount_layer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EDITS = load_edits(ROOT / "examples" / "edits.jsonl")
A, B = EDITS[:2], EDITS[2:]
C = Edit(prompt="The capital of Japan is", target_new="Osaka", id="japan-capital")


def write(path: Path, edits: list[Edit]) -> Path:
    path.write_text("".join(json.dumps(e.to_dict()) + "\n" for e in edits))
    return path


def rel(session, cid, edits) -> float:
    with mount_layer(session.model, session.site, porcelain.memory_layer(session, cid)) as h:
        return round(mean(teacher_forced(session.model, session.tokenizer, [e.prompt for e in edits],
                                         [e.target_new for e in edits], h).accuracy()), 4)


@torch.no_grad()
def logits(session, cid) -> torch.Tensor:
    enc = session.tokenizer([e.prompt for e in EDITS], return_tensors="pt", padding=True)
    with mount_layer(session.model, session.site, porcelain.memory_layer(session, cid)):
        return session.model(**enc).logits


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "store"
        porcelain.init(path)
        s = porcelain.open_session(path)
        a = porcelain.commit(path, write(root / "a.jsonl", A), message="A", session=s).commit_id
        logits_a = logits(s, a)
        b = porcelain.commit(path, write(root / "b.jsonl", B), message="B", session=s).commit_id
        out["before"] = {"base_A": rel(s, None, A), "base_B": rel(s, None, B), "A": rel(s, b, A), "B": rel(s, b, B)}

        def fresh(name: str) -> Path:
            dst = root / name
            shutil.copytree(path, dst)
            return dst

        def on(p: Path):  # a session on a copy, sharing the loaded model
            return porcelain.open_session(p, model=s.model, tokenizer=s.tokenizer)

        p = fresh("revert-head")
        r, sec = timed(lambda: history.revert(p, "HEAD", session=s))
        t = on(p)
        out["revert_B_last"] = {"seconds": sec, "A": rel(t, r.commit_id, A), "B": rel(t, r.commit_id, B),
                                "logits_equal_A": torch.equal(logits(t, r.commit_id), logits_a)}
        p = fresh("revert-a")
        r, sec = timed(lambda: history.revert(p, a, session=s))
        t = on(p)
        out["revert_A_older"] = {"seconds": sec, "A": rel(t, r.commit_id, A), "B": rel(t, r.commit_id, B)}
        p = fresh("revert-edit")
        r, sec = timed(lambda: history.revert(p, edit_id=B[0].edit_id, session=s))
        t = on(p)
        out["revert_edit_B0"] = {"seconds": sec, "base_B0": rel(t, None, B[:1]), "B0": rel(t, r.commit_id, B[:1]),
                                 "kept": rel(t, r.commit_id, [*A, B[1]]), "kept_before": rel(t, b, [*A, B[1]])}
        p = fresh("checkout")
        _, sec = timed(lambda: history.checkout(p, "HEAD~1"))
        t = on(p)
        mounted = porcelain.mounted_commit(t.store)[1]  # HEAD, now detached at A
        out["checkout"] = {"seconds": sec, "mounted_is_A": mounted == a, "logits_equal": torch.equal(logits(t, mounted), logits_a)}
        p = fresh("merge")
        history.branch(p, "side", a)
        history.checkout(p, "side")
        porcelain.commit(p, write(root / "c.jsonl", [C]), message="C", session=s)
        history.checkout(p, "main")
        twin = fresh("merge-twin")
        shutil.rmtree(twin)
        shutil.copytree(p, twin)
        m1, sec = timed(lambda: history.merge(p, "main", "side", session=s))
        m2 = history.merge(twin, "main", "side", session=s)
        out["merge"] = {"seconds": sec, "same_object": m1.object_id == m2.object_id,
                        "rel_all": rel(on(p), m1.commit_id, EDITS + [C])}
        s.close()
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Storage cost of commits on the default model: bytes each commit adds (new objects + catalog
growth) for a 1-edit and a 100-edit commit, against one dense fp32 copy of the edited matrix.

Run:  .venv/bin/python benchmarks/bench_storage.py [--steps 1] [--out benchmarks/results/storage.json]

Object sizes do not depend on how well the edits are trained (a shard stores its masked values
and mask bits whatever they hold), so `--steps` (default 1) keeps the 100-edit commit short; the
hyperparameter is recorded in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from memstore import porcelain  # noqa: E402
from memstore.edits import read_edits  # noqa: E402
from memstore.model import weight_matrix  # noqa: E402
from memstore.store import Store  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre" / "zsre_mend_eval.0-999.json"


def footprint(store_dir: Path) -> tuple[set[str], int]:
    """(object ids, bytes of the catalog files) of a store."""
    with Store.open(store_dir) as store:
        oids = set(store.objects.iter_ids())
    catalog = sum(f.stat().st_size for f in store_dir.glob("catalog.sqlite*"))
    return oids, catalog


def measure_commit(store_dir: Path, session, edits_file: Path, message: str) -> dict:
    session.store.catalog.engine.dispose()  # last connection closed: SQLite folds the WAL into the file
    objs0, cat0 = footprint(store_dir)
    start = time.perf_counter()
    result = porcelain.commit(store_dir, edits_file, message=message, session=session)
    seconds = time.perf_counter() - start
    session.store.catalog.engine.dispose()
    objs1, cat1 = footprint(store_dir)
    with Store.open(store_dir) as store:
        new_bytes = sum(store.objects.size(o) for o in objs1 - objs0)
    return {"message": message, "n_edits": result.n_edits, "live_edits": result.total_edits,
            "new_objects": len(objs1 - objs0), "object_bytes": new_bytes, "catalog_bytes": cat1 - cat0,
            "bytes": new_bytes + cat1 - cat0, "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    edits, _ = read_edits(DATA, skip_invalid=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store_dir = root / "store"
        porcelain.init(store_dir, overrides={"max_steps": args.steps})
        files = {}
        for name, chunk in (("one", edits[:1]), ("hundred", edits[1:101]), ("one-more", edits[101:102])):
            files[name] = root / f"{name}.jsonl"
            files[name].write_text("".join(json.dumps(e.to_dict()) + "\n" for e in chunk))
        session = porcelain.open_session(store_dir)
        try:
            w = weight_matrix(session.site.module(session.model))
            dense = w.numel() * 4
            rows = [measure_commit(store_dir, session, files[n], n) for n in ("one", "hundred", "one-more")]
        finally:
            session.close()
    for r in rows:
        r["fraction_of_dense"] = round(r["bytes"] / dense, 4)
        r["bytes_per_edit"] = round(r["bytes"] / r["n_edits"])
    out = {"dense_matrix_bytes": dense, "matrix_shape": list(w.shape), "max_steps": args.steps, "commits": rows}
    print(json.dumps(out, indent=2))
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""HNSW pre-filter settings vs recall against the exhaustive scan, on the masks bench_routing.py uses.

Sweeps the graph degree M, efConstruction, efSearch and the number of candidates re-scored
exactly, at 10,000 stored masks (2,351 distinct prompts repeated) and at the distinct masks only;
prints recall and µs per query for each. Masks are cached in /tmp/wisemem_routing_masks.pt.
Run: .venv/bin/python benchmarks/probe_hnsw.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from memstore.index import MaskIndex  # noqa: E402

CACHE = Path("/tmp/wisemem_routing_masks.pt")


def masks() -> dict[str, torch.Tensor]:
    if CACHE.exists():
        return torch.load(CACHE)
    from bench_routing import DATA, FILES

    from memstore.edits import read_edits
    from memstore.evaluate.api import irrelevant_prompts
    from memstore.methods.memoir import MemoirEditor, default_config
    from memstore.model import find_edit_site, load_model

    model, tok = load_model(None)
    cfg = default_config("llama")
    site = find_edit_site(model, None, layer_fraction=cfg.layer_fraction)
    editor = MemoirEditor(model, tok, site, cfg, irrelevant_prompts(DATA / "zsre" / "zsre_mend_train-1k.json"), prefixes=[])
    records = [e for f in FILES for e in read_edits(DATA / f, skip_invalid=True)[0]]
    out = {"edit": editor.edit_masks([e.prompt for e in records]),
           "rephrase": editor.edit_masks([e.rephrase_prompt for e in records if e.rephrase_prompt]),
           "unrelated": editor.edit_masks([e.locality_prompt for e in records if e.locality_prompt])}
    torch.save(out, CACHE)
    return out


def main() -> None:
    m = masks()
    queries = torch.cat([m["edit"], m["rephrase"], m["unrelated"]])
    sample = queries[torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[:300]]
    for label, stored in (("10,000 (repeated)", m["edit"].repeat(5, 1)[:10000]), ("2,351 distinct", m["edit"])):
        flat = MaskIndex(stored.shape[1], "flat")
        flat.add(stored)
        exact, _ = flat.exhaustive(queries)
        print(f"\nstored {label}")
        t0 = time.perf_counter()
        for q in sample:
            flat.search(q[None])
        print(f"flat: {1e6 * (time.perf_counter() - t0) / len(sample):.0f} us/query (exact)")
        print("M  efC  efS  cand  recall  us/query  build s")
        for M, efc, efs, cand in [(16, 40, 64, 4), (16, 40, 256, 16), (32, 200, 128, 16), (32, 200, 256, 32),
                                  (32, 400, 512, 32), (64, 400, 256, 32)]:
            index = MaskIndex(stored.shape[1], "hnsw", candidates=cand, hnsw_m=M, ef_construction=efc, ef_search=efs)
            t0 = time.perf_counter()
            index.add(stored)
            build = time.perf_counter() - t0
            got, _ = index.search(queries)
            recall = float((got == exact).float().mean())
            t0 = time.perf_counter()
            for q in sample:
                index.search(q[None])
            us = 1e6 * (time.perf_counter() - t0) / len(sample)
            print(f"{M:<3}{efc:<5}{efs:<5}{cand:<6}{recall:.4f}  {us:8.0f}  {build:.2f}")


if __name__ == "__main__":
    main()

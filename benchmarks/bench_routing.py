"""MEMOIR routing at scale: router quality, FAISS pre-filter recall, routing and inference cost.

Routing in MEMOIR depends only on the stored edit masks (prompt features at the edited layer,
background mean, permutation), not on the trained memory values, so this benchmark builds
masks for N = 100 / 1,000 / 10,000 stored edits without training them. The memory values used
for the inference timing are random (their cost does not depend on their values).

  stored edits: the prompts of ZsRE 0-999, CounterFact 0-999, hallucination, temporal (in that
                order; 2,350 distinct prompts, repeated to reach 10,000 - said in the output)
  edit prompts: the stored prompts themselves; rephrases: their rephrase_prompt (ZsRE, CF);
  unrelated:    ZsRE loc questions and CounterFact locality prompts of the same records.

Reports, per N: routed fraction of edit prompts / rephrases / unrelated prompts (recall,
recall, false-positive rate), precision of "use memory", the fraction routed to their own
edit; HNSW pre-filter recall against the exhaustive scan; per-query routing time (FAISS flat,
FAISS HNSW, exhaustive torch scan); a teacher-forced pass with the memory mounted vs the bare
model (same run, interleaved, median of repeats); a histogram PNG of best overlaps at N=1,000.

Run:  .venv/bin/python benchmarks/bench_routing.py [--out benchmarks/results/routing.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from memstore.edits import read_edits  # noqa: E402
from memstore.evaluate.api import irrelevant_prompts  # noqa: E402
from memstore.evaluate.metrics import teacher_forced  # noqa: E402
from memstore.index import MaskIndex  # noqa: E402
from memstore.methods.memoir import MemoirEditor, MemoirLayer, MemoirState, default_config  # noqa: E402
from memstore.model import find_edit_site, load_model  # noqa: E402
from memstore.mount import mount_layer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FILES = ["zsre/zsre_mend_eval.0-999.json", "counterfact/counterfact-edit.0-999.json",
         "hallucination/hallucination-edit.shared.json", "temporal/temporal-edit.0-49.json"]
SIZES = (100, 1000, 10000)


def route_stats(index: MaskIndex, k: int, tau: float, groups: dict[str, torch.Tensor],
                own: dict[str, torch.Tensor]) -> dict:
    out: dict = {}
    routed_pos = routed_all = 0
    for name, masks in groups.items():
        common, ids = index.exhaustive(masks)
        overlap = common.float() / k
        routed = overlap >= tau - 1e-9
        row = {"n": len(masks), "routed": float(routed.float().mean()), "overlap_median": float(overlap.median())}
        if name in own:
            row["routed_to_own_edit"] = float((routed & (index.masks(ids) == index.masks(own[name])).all(1)).float().mean())
            routed_pos += int(routed.sum())
        routed_all += int(routed.sum())
        out[name] = row
    out["precision"] = routed_pos / routed_all if routed_all else float("nan")
    return out


def per_query_seconds(fn, queries: torch.Tensor, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for q in queries:
            fn(q[None])
        times.append((time.perf_counter() - start) / len(queries))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "routing.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "routing_overlaps.png"))
    ap.add_argument("--inference-prompts", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok = load_model(None)
    cfg = default_config("llama")
    site = find_edit_site(model, None, layer_fraction=cfg.layer_fraction)
    irrelevant = irrelevant_prompts(DATA / "zsre" / "zsre_mend_train-1k.json")
    editor = MemoirEditor(model, tok, site, cfg, irrelevant, prefixes=[])
    records = [e for f in FILES for e in read_edits(DATA / f, skip_invalid=True)[0]]
    t0 = time.perf_counter()
    edit_masks = editor.edit_masks([e.prompt for e in records])
    with_reph = [i for i, e in enumerate(records) if e.rephrase_prompt]
    reph_masks = editor.edit_masks([records[i].rephrase_prompt for i in with_reph])
    with_loc = [i for i, e in enumerate(records) if e.locality_prompt]
    loc_masks = editor.edit_masks([records[i].locality_prompt for i in with_loc])
    mask_seconds = time.perf_counter() - t0
    n_distinct = len(records)
    k, tau = editor.k, cfg.threshold
    result: dict = {"layer": site.layer, "k": k, "d_ff": edit_masks.shape[1], "tau": tau, "distinct_prompts": n_distinct,
                    "mask_seconds_per_prompt": mask_seconds / (len(records) + len(with_reph) + len(with_loc)), "sizes": {}}

    # Memory values for timing only: random, the shape of W_m.
    memory = torch.randn_like(editor.state.memory) * 0.01
    state = MemoirState(memory, edit_masks, editor.state.permutation, editor.state.background)
    timing_prompts = [e.prompt for e in records[:args.inference_prompts // 2]] + \
                     [records[i].locality_prompt for i in with_loc[:args.inference_prompts // 2]]
    timing_targets = [e.target_new for e in records[:args.inference_prompts // 2]] + \
                     [records[i].locality_ground_truth for i in with_loc[:args.inference_prompts // 2]]
    hist = None
    for n in SIZES:
        reps = -(-n // n_distinct)
        stored = edit_masks.repeat(reps, 1)[:n]
        flat, hnsw = MaskIndex(stored.shape[1], "flat"), MaskIndex(stored.shape[1], "hnsw")
        t0 = time.perf_counter()
        flat.add(stored)
        build_flat = time.perf_counter() - t0
        t0 = time.perf_counter()
        hnsw.add(stored)
        build_hnsw = time.perf_counter() - t0
        m = min(n, n_distinct)
        groups = {"edit": edit_masks[:m],
                  "rephrase": reph_masks[[j for j, i in enumerate(with_reph) if i < m]],
                  "unrelated": loc_masks[[j for j, i in enumerate(with_loc) if i < m]]}
        own = {"edit": torch.arange(m), "rephrase": torch.tensor([i for i in with_reph if i < m])}
        row: dict = {"stored": n, "distinct_stored": m, "repeats": reps, "build_seconds": {"flat": build_flat, "hnsw": build_hnsw}}
        row["router"] = route_stats(flat, k, tau, groups, own)
        queries = torch.cat(list(groups.values()))
        exact_common, _ = flat.exhaustive(queries)
        hnsw_common, _ = hnsw.search(queries)
        flat_common, _ = flat.search(queries)
        row["prefilter_recall"] = {"flat": float((flat_common == exact_common).float().mean()),
                                   "hnsw": float((hnsw_common == exact_common).float().mean())}
        sample = queries[torch.randperm(len(queries), generator=torch.Generator().manual_seed(0))[:200]]
        row["route_seconds_per_query"] = {"faiss_flat": per_query_seconds(flat.search, sample),
                                          "faiss_hnsw": per_query_seconds(hnsw.search, sample),
                                          "exhaustive_scan": per_query_seconds(flat.exhaustive, sample)}
        # Inference: teacher-forced pass, bare vs mounted (flat index), interleaved repeats.
        layer = MemoirLayer(site.module(model), memory, flat, state.permutation, state.background, k, tau)
        bare_t, mem_t = [], []
        with mount_layer(model, site, layer) as handle:
            teacher_forced(model, tok, timing_prompts[:8], timing_targets[:8], handle)  # warm-up
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                teacher_forced(model, tok, timing_prompts, timing_targets, handle, memory=False)
                bare_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                teacher_forced(model, tok, timing_prompts, timing_targets, handle)
                mem_t.append(time.perf_counter() - t0)
        bare, mounted = statistics.median(bare_t), statistics.median(mem_t)
        row["inference"] = {"prompts": len(timing_prompts), "bare_seconds": bare, "mounted_seconds": mounted,
                            "overhead": mounted / bare - 1}
        if n == 1000:
            hist = {name: (flat.exhaustive(g)[0].float() / k).tolist() for name, g in groups.items()}
        result["sizes"][str(n)] = row
        print(json.dumps(row), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if hist is not None:
        plot(hist, tau, Path(args.png))


def plot(hist: dict[str, list[float]], tau: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = [i / 100 for i in range(20, 101)]
    labels = {"edit": "edit prompts", "rephrase": "rephrases", "unrelated": "unrelated prompts"}
    for name, values in hist.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{labels[name]} (n={len(values)})")
    ax.axvline(tau, color="k", linestyle="--", label=f"threshold tau = {tau}")
    ax.set_xlabel("best overlap |m_q ∩ m_e| / k with the 1,000 stored edit masks")
    ax.set_ylabel("prompts")
    ax.set_yscale("log")
    ax.set_title("MEMOIR routing scores, SmolLM2-135M layer 24, 1,000 stored edits")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()

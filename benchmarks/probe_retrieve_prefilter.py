"""WISE-Retrieve's FAISS pre-filter against the exhaustive scan, on the real model.

Trains K side memories with WiseRetrieveEditor (the library path `wisemem eval --method
wise-retrieve` uses) on the prompt alone (no context prefixes, to afford many memories on a CPU;
steps, replay and shard size are arguments). Then, for prompts of three kinds (edit prompts,
their rephrases, unrelated ZsRE locality questions) and c candidate keys: the recall (queries
whose exhaustive top-1 memory is among the pre-filter's candidates, of the queries the exhaustive
scan routes anywhere), how often each route sends an edit's prompt or rephrase to the memory that
holds the edit, and the routing time per query (pre-filter + exact check on the candidates vs
exact check on every memory); and Rel / Gen / Loc of the memories served by each route.

Run (from /work/main), the two settings in docs/BENCHMARKS.md:
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_retrieve_prefilter.py T=400 edits_per_shard=4 \
      > benchmarks/results/retrieve_prefilter.json      (100 memories, 10 steps, no replay)
  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_retrieve_prefilter.py T=100 edits_per_shard=5 max_steps=30 \
      replay=4 > benchmarks/results/retrieve_prefilter_trained.json      (20 memories, WISE's steps and replay)
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from memstore.edits import edit_from_record  # noqa: E402
from memstore.errors import EditFileError  # noqa: E402
from memstore.evaluate.runner import evaluate_memory  # noqa: E402
from memstore.methods.wise import WiseConfig, WiseRetrieveEditor  # noqa: E402
from memstore.methods.wise.method import generate_prefixes, routing_inputs  # noqa: E402
from memstore.methods.wise.retrieve import prefilter_recall  # noqa: E402
from memstore.model import find_edit_site, load_model  # noqa: E402
from memstore.porcelain import parse_overrides  # noqa: E402

DATA = "../shared/data/zsre/zsre_mend_eval.0-999.json"
IRRELEVANT = "../shared/data/zsre/zsre_mend_train-1k.json"
CANDIDATES = (1, 4, 8, 16, 32, 64)
EVALUATED = (1, 4)  # candidate counts whose Rel / Gen / Loc are measured beside the exhaustive scan's (0)


@torch.no_grad()
def routing_seconds(layer, reads: list[torch.Tensor], prefilter: bool) -> float:
    """Mean seconds per query of the routing decision alone (inputs captured beforehand)."""
    layer.routing.reset()
    start = time.perf_counter()
    for a in reads:
        layer.decide(a, prefilter=prefilter)
    return (time.perf_counter() - start) / len(reads)


@torch.no_grad()
def right_memory(layer, reads: list[torch.Tensor], owners: list[int]) -> dict[str, float]:
    """Fraction of prompts routed to the memory holding their edit: by the exhaustive scan and
    with the pre-filter (the exact check deciding among the candidates)."""
    layer.routing.reset()
    out = {}
    for name, prefilter in (("exhaustive", False), ("prefiltered", True)):
        chosen = [int(layer.decide(a, prefilter=prefilter).choice[0]) for a in reads]
        out[name] = sum(c == o for c, o in zip(chosen, owners)) / len(owners)
    return out


def main() -> None:
    args = parse_overrides(sys.argv[1:])
    n = int(args.pop("T", 400))
    settings = {"edits_per_shard": 4, "prefix_seeds": [], "max_steps": 10, "replay": 0, **args,
                "prefilter_candidates": CANDIDATES[0]}  # the layer gets its key index; each row sets its own C
    records = []
    for r in json.load(open(DATA)):
        try:  # two ZsRE records have an empty target: skipped, as `wisemem eval` does
            records.append((edit_from_record(r), r))
        except EditFileError:
            continue
    edits = [e for e, _ in records[:n]]
    records = [r for _, r in records]
    unrelated = [r["loc"].removeprefix("nq question: ") for r in records[n:n + n]]
    model, tokenizer = load_model(None)
    config = WiseConfig.for_model(model.config.model_type, **settings)
    site = find_edit_site(model, None, None, layer_fraction=config.layer_fraction)
    background = [r["loc"].removeprefix("nq question: ") for r in json.load(open(IRRELEVANT))]
    editor = WiseRetrieveEditor(model, tokenizer, site, config, background,
                                generate_prefixes(model, tokenizer, config.prefix_seeds, config.prefix_lengths))
    start = time.perf_counter()
    editor.apply(edits, lambda i, _s: print(f"edit {i}/{n} at {time.perf_counter() - start:.0f} s",
                                            file=sys.stderr, flush=True) if i % 20 == 0 else None)
    train_seconds = time.perf_counter() - start
    layer = editor.layer()
    counts = [sum(len(s.edits) for s in group) for group in editor.memories()]
    groups = {"edit": [e.prompt for e in edits], "rephrase": [e.rephrase_prompt for e in edits],
              "unrelated": unrelated}
    # Each prompt's input as the memories read it, once: the routes below differ only in the layer's C.
    reads = {name: [a[None] for a in routing_inputs(model, tokenizer, site, prompts, editor.basis)]
             for name, prompts in groups.items()}
    owners = editor.edit_owners()
    rows = []
    for c in CANDIDATES:
        layer.candidates = c
        row = {"candidates": c}
        for name, prompts in groups.items():
            r = prefilter_recall(model, tokenizer, site, layer, prompts)
            row[name] = {"recall": r.recall, "routed": r.routed, "queries": r.queries}
        row["right_memory"] = {name: right_memory(layer, reads[name], owners) for name in ("edit", "rephrase")}
        row["seconds_per_query_prefilter"] = routing_seconds(layer, reads["edit"], True)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    exhaustive = routing_seconds(layer, reads["edit"], False)
    # What the route does to the edits: Rel / Gen / Loc of the same memories, scanned or pre-filtered.
    quality = []
    for c in (0, *EVALUATED):
        layer.candidates = c
        r = evaluate_memory(model, tokenizer, site, layer, edits, generation=False, family="zsre")
        quality.append({"candidates": c, "reliability": r.reliability, "generalization": r.generalization,
                        "locality": r.locality})
        print(json.dumps(quality[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"T": n, "memories": len(counts), "settings": settings, "train_seconds": train_seconds,
                      "threads": torch.get_num_threads(), "seconds_per_query_exhaustive": exhaustive, "rows": rows,
                      "quality": quality}, indent=2))


if __name__ == "__main__":
    main()

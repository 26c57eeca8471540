"""WISE on the default model, one run: quality at T, edit speed vs a plain loop, inference overhead.

Run:  .venv/bin/python benchmarks/bench_wise.py -T 100 --plain-edits 5 --out benchmarks/results/wise_T100.json

1. Applies the first T ZsRE edits sequentially (fast path: cached lower layers, batched contexts,
   LM head on target positions only, early stop) and evaluates Rel/Gen/Loc + generation EM.
2. Times the plain implementation in the same process: whole model every step, one row at a
   time, full logits, no early stop; on `--plain-edits` edits after filling the replay buffer,
   so its batches match the fast path's steady state.
3. Times a teacher-forced evaluation pass (edit prompts, rephrases, locality prompts) with the
   memory mounted vs the bare model, alternating, `--repeats` times; reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: busy-waiting threads slow a shared CPU

import torch

from memstore.edits import read_edits
from memstore.evaluate.api import irrelevant_prompts
from memstore.evaluate.metrics import teacher_forced
from memstore.evaluate.runner import evaluate_memory
from memstore.methods.wise import WiseEditor
from memstore.methods.wise.method import generate_prefixes
from memstore.model import find_edit_site, load_model
from memstore.mount import mount_layer
from memstore.porcelain import make_config

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed_pass(model, tokenizer, handle, prompts, targets, memory: bool) -> float:
    start = time.perf_counter()
    teacher_forced(model, tokenizer, prompts, targets, handle, memory=memory)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-T", type=int, default=100)
    ap.add_argument("--data", default=str(DATA / "zsre_mend_eval.0-999.json"))
    ap.add_argument("--irrelevant", default=str(DATA / "zsre_mend_train-1k.json"))
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--plain-edits", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--set", action="append", default=[], help="hyperparameter key=value")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from memstore.porcelain import parse_overrides

    torch.manual_seed(0)
    model, tok = load_model()
    site = find_edit_site(model, args.layer)
    config = make_config(model.config.model_type, parse_overrides(args.set))
    edits, _ = read_edits(args.data, skip_invalid=True)
    irrelevant = irrelevant_prompts(args.irrelevant)
    prefixes = generate_prefixes(model, tok, config.prefix_seeds, config.prefix_lengths)
    chunk = edits[: args.T]

    log(f"fast path: {args.T} sequential edits at {site.module_path}")
    editor = WiseEditor(model, tok, site, config, irrelevant, prefixes)
    stats = editor.apply(chunk, lambda i, s: log(f"  edit {i}/{args.T}: {s.steps} steps, {s.seconds:.2f} s") if i % 10 == 0 else None)
    layer = editor.layer()
    quality = evaluate_memory(model, tok, site, layer, chunk)

    log("inference: teacher-forced pass, memory mounted vs bare")
    prompts = [e.prompt for e in chunk] + [e.rephrase_prompt for e in chunk if e.rephrase_prompt] + \
        [e.locality_prompt for e in chunk if e.locality_prompt]
    targets = [e.target_new for e in chunk] + [e.target_new for e in chunk if e.rephrase_prompt] + \
        [e.locality_ground_truth for e in chunk if e.locality_prompt]
    bare_t, mem_t = [], []
    with mount_layer(model, site, layer) as handle:
        timed_pass(model, tok, handle, prompts, targets, True)  # warm-up
        for _ in range(args.repeats):
            bare_t.append(timed_pass(model, tok, handle, prompts, targets, False))
            mem_t.append(timed_pass(model, tok, handle, prompts, targets, True))

    log(f"plain loop: {args.plain_edits} edits (after {config.replay} fast edits fill the replay buffer)")
    plain_editor = WiseEditor(model, tok, site, config, irrelevant, prefixes, basis=editor.basis)
    plain_editor.apply(edits[args.T:args.T + config.replay])
    plain_stats = plain_editor.apply(edits[args.T + config.replay:args.T + config.replay + args.plain_edits], plain=True)
    fast_same = WiseEditor(model, tok, site, config, irrelevant, prefixes, basis=editor.basis)
    fast_same.apply(edits[args.T:args.T + config.replay])
    fast_same_stats = fast_same.apply(edits[args.T + config.replay:args.T + config.replay + args.plain_edits])

    fast_median = statistics.median(s.seconds for s in stats)
    plain_median = statistics.median(s.seconds for s in plain_stats)
    result = {
        "T": args.T, "model": "embedded:SmolLM2-135M-Instruct", "module": site.module_path,
        "reliability": quality.reliability, "generalization": quality.generalization, "locality": quality.locality,
        "generation_exact_match": quality.generation_exact_match, "rephrase_exact_match": quality.rephrase_exact_match,
        "threshold": layer.threshold,
        "seconds_per_edit_median": fast_median,
        "steps_mean": statistics.mean(s.steps for s in stats),
        "plain_seconds_per_edit_median": plain_median,
        "fast_same_edits_seconds_median": statistics.median(s.seconds for s in fast_same_stats),
        "speedup_vs_plain": plain_median / fast_median,
        "inference_rows": len(prompts),
        "inference_bare_seconds_median": statistics.median(bare_t),
        "inference_memory_seconds_median": statistics.median(mem_t),
        "inference_overhead": statistics.median(mem_t) / statistics.median(bare_t) - 1.0,
        "config": config.to_dict(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Ablation probe: train T ZsRE edits with given hyperparameters, then print per-edit figures.

Run:  .venv/bin/python benchmarks/ablate_wise.py T=10 L=17 [replay=0] [key=value ...]

Prints the training steps and final edit loss per edit, the router threshold, the activation
scores of the edit prompts, rephrases and locality prompts, and per-edit reliability and
generalization (also with the route forced on, which separates router misses from memory misses).
Used for the layer choice and the replay ablation in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from memstore.edits import read_edits  # noqa: E402
from memstore.evaluate.metrics import teacher_forced  # noqa: E402
from memstore.methods.wise import WiseEditor  # noqa: E402
from memstore.methods.wise.method import activation_scores  # noqa: E402
from memstore.model import find_edit_site, load_model  # noqa: E402
from memstore.mount import mount_layer  # noqa: E402
from memstore.porcelain import make_config, parse_overrides  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre"


def main() -> None:
    args = parse_overrides(sys.argv[1:])
    layer_index, n, offset = args.pop("L", None), int(args.pop("T", 10)), int(args.pop("off", 0))
    model, tok = load_model()
    site = find_edit_site(model, layer_index)
    config = make_config(model.config.model_type, args)
    edits, _ = read_edits(DATA / "zsre_mend_eval.0-999.json", skip_invalid=True)
    edits = edits[offset:offset + n]
    irrelevant = [r["loc"] for r in json.loads((DATA / "zsre_mend_train-1k.json").read_text())]
    editor = WiseEditor(model, tok, site, config, irrelevant)
    start = time.perf_counter()
    stats = editor.apply(edits)
    print(f"layer {site.layer}  train {time.perf_counter() - start:.1f} s  steps {[s.steps for s in stats]}")
    print("final edit loss", [round(s.edit_loss, 3) for s in stats])
    layer = editor.layer()
    print(f"threshold {layer.threshold:.2f}")
    groups = {"edit": [e.prompt for e in edits], "rephrase": [e.rephrase_prompt for e in edits],
              "locality": [e.locality_prompt for e in edits]}
    for name, prompts in groups.items():
        scores = activation_scores(model, tok, site, layer.delta, prompts, config.router_reduce, editor.basis)
        print(f"scores {name:<9}", [round(x, 1) for x in scores.tolist()])
    for forced in (False, True):
        if forced:
            layer.threshold = -1.0  # every row routes: what the memory itself knows
        with mount_layer(model, site, layer) as handle:
            rel = teacher_forced(model, tok, groups["edit"], [e.target_new for e in edits], handle).accuracy()
            gen = teacher_forced(model, tok, groups["rephrase"], [e.target_new for e in edits], handle).accuracy()
        tag = "forced " if forced else ""
        print(f"{tag}rel {sum(rel) / n:.3f}", [round(x, 2) for x in rel])
        print(f"{tag}gen {sum(gen) / n:.3f}", [round(x, 2) for x in gen])


if __name__ == "__main__":
    main()

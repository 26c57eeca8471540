"""WISE-Retrieve at T=30 through the `wisemem eval` library path (memstore.evaluate.api.evaluate),
plus the fraction of edit prompts / rephrases routed to the memory holding their edit.

Run (from /work/main):
  OMP_WAIT_POLICY=PASSIVE WISEMEM_DIR=/tmp/no_store .venv/bin/python benchmarks/measure_retrieve.py [T=30] [key=value ...]
(edits_per_shard=10 by default here; one thread, as it was run beside another benchmark)
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(1)

from memstore.evaluate import runner  # noqa: E402
from memstore.evaluate.api import evaluate  # noqa: E402
from memstore.evaluate.metrics import mean, teacher_forced  # noqa: E402
from memstore.methods.wise import WiseRetrieveEditor  # noqa: E402
from memstore.mount import mount_layer  # noqa: E402
from memstore.porcelain import parse_overrides  # noqa: E402

DATA = "../shared/data/zsre/zsre_mend_eval.0-999.json"
IRRELEVANT = "../shared/data/zsre/zsre_mend_train-1k.json"
EDITORS: list[WiseRetrieveEditor] = []


class Recorded(WiseRetrieveEditor):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        EDITORS.append(self)


def routed_to_owner(editor: WiseRetrieveEditor, texts: list[str], targets: list[str]) -> tuple[float, list[int]]:
    layer = editor.layer()
    choices: list[int] = []
    with mount_layer(editor.model, editor.site, layer) as handle:
        hook = layer.register_forward_hook(lambda *_: choices.extend(layer.last_choice.tolist()))
        try:
            teacher_forced(editor.model, editor.tokenizer, texts, targets, handle)
        finally:
            hook.remove()
    owners = editor.edit_owners()
    return mean([float(c == o) for c, o in zip(choices, owners)]), choices


def main() -> None:
    args = parse_overrides(sys.argv[1:])
    n = int(args.pop("T", 30))
    args.setdefault("edits_per_shard", 10)
    args.setdefault("shards_per_memory", 1)
    runner.EDITORS["wise-retrieve"] = Recorded
    start = time.perf_counter()
    out = evaluate(DATA, n_edits=n, method="wise-retrieve", irrelevant_file=IRRELEVANT, overrides=args,
                   progress=lambda i, k: print(f"edit {i}/{k} at {time.perf_counter() - start:.0f} s", flush=True))
    editor = EDITORS[-1]
    edits = editor.all_edits()
    targets = [e.target_new for e in edits]
    edit_frac, edit_choice = routed_to_owner(editor, [e.prompt for e in edits], targets)
    reph_frac, reph_choice = routed_to_owner(editor, [e.rephrase_prompt for e in edits], targets)
    layer = editor.layer()
    summary = {k: out[k] for k in ("reliability", "generalization", "locality", "generation_exact_match",
                                    "rephrase_exact_match", "seconds_per_edit", "mean_steps", "wall_seconds")}
    summary.update({"routed_to_owner_edit": edit_frac, "routed_to_owner_rephrase": reph_frac,
                    "owners": editor.edit_owners(), "edit_choice": edit_choice, "rephrase_choice": reph_choice,
                    "thresholds": layer.thresholds.tolist(), "config": out["config"], "layer": out["layer"]})
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

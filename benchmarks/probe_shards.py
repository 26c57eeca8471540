"""Probe: is a multi-shard WISE memory limited by the merge? Train T edits into shards of
`edits_per_shard`, then evaluate (1) several merges of the same shards, (2) each shard alone on
its own edits, (3) top-1 retrieval of one shard per prompt by score / own threshold (no replay
term between shards).

Run:  .venv/bin/python benchmarks/probe_shards.py [T=30] [edits_per_shard=10] [negatives=other]

`negatives=other`: half of the time, the margin's irrelevant prompt is an edit of an earlier
shard, so a shard learns to stay quiet on the other shards' edits (WISE-Retrieve's replay idea).

Used for the "small shards" rows of docs/BENCHMARKS.md (first run as two scratch scripts, then
re-run as this file with identical figures; training took 637 s. `negatives=other` was run once
through a scratch script with the same override of `_edit_batch`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from memstore.edits import Edit, read_edits  # noqa: E402
from memstore.evaluate.metrics import locality, mean, teacher_forced  # noqa: E402
from memstore.methods.wise import WiseEditor, WiseLayer  # noqa: E402
from memstore.methods.wise.method import activation_scores, merge_shards, router_threshold  # noqa: E402
from memstore.model import find_edit_site, load_model  # noqa: E402
from memstore.mount import mount_layer  # noqa: E402
from memstore.porcelain import make_config, parse_overrides  # noqa: E402
from memstore.prompting import target_ids  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "zsre"


def token_accuracy(tok, predicted: list[list[int]], targets: list[str]) -> float:
    accs = []
    for pred, target in zip(predicted, targets):
        ids = target_ids(tok, target)
        accs.append(sum(int(p == t) for p, t in zip(pred, ids)) / len(ids))
    return mean(accs)


class OtherShardNegatives(WiseEditor):
    """Half of the time the margin's negative is a past edit of another shard."""

    def _edit_batch(self, edit, replay):
        past = [e for s in self.shards[:-1] for e in s.edits]
        if past and self._rng.random() < 0.5:
            edit = Edit(**{**edit.to_dict(), "loc_prompt": self._rng.choice(past).prompt})
        return super()._edit_batch(edit, replay)


def main() -> None:
    args = parse_overrides(sys.argv[1:])
    n = int(args.pop("T", 30))
    editor_cls = OtherShardNegatives if args.pop("negatives", None) == "other" else WiseEditor
    args.setdefault("edits_per_shard", 10)
    model, tok = load_model()
    site = find_edit_site(model)
    config = make_config(model.config.model_type, args)
    edits, _ = read_edits(DATA / "zsre_mend_eval.0-999.json", skip_invalid=True)
    edits = edits[:n]
    irrelevant = [r["loc"] for r in json.loads((DATA / "zsre_mend_train-1k.json").read_text())]
    editor = editor_cls(model, tok, site, config, irrelevant)
    start = time.perf_counter()
    editor.apply(edits)
    print(f"train {time.perf_counter() - start:.0f} s, {len(editor.shards)} shards", flush=True)
    taus, basis = [s.tau for s in editor.shards], editor.basis
    prompts, targets = [e.prompt for e in edits], [e.target_new for e in edits]
    rephrases = [e.rephrase_prompt for e in edits]

    for method, density in (("ties", 0.53), ("ties", 1.0), ("task_arithmetic", 1.0), ("linear", 1.0)):
        cfg = make_config(model.config.model_type, {**args, "merge_method": method, "merge_density": density})
        delta = merge_shards(taus, cfg)
        thr = router_threshold(model, tok, site, delta, prompts, cfg.act_ratio, cfg.router_reduce, basis)
        with mount_layer(model, site, WiseLayer(site.module(model), delta, thr, cfg.router_reduce, basis)) as h:
            rel = mean(teacher_forced(model, tok, prompts, targets, h).accuracy())
            gen = mean(teacher_forced(model, tok, rephrases, targets, h).accuracy())
            loc_args = ([e.locality_prompt for e in edits], [e.locality_ground_truth for e in edits])
            loc = mean(locality(teacher_forced(model, tok, *loc_args, h, memory=False),
                                teacher_forced(model, tok, *loc_args, h)))
        print(f"merge {method} density {density}: rel {rel:.3f} gen {gen:.3f} loc {loc:.3f}", flush=True)

    owner = [j for j, s in enumerate(editor.shards) for _ in s.edits]
    for j, shard in enumerate(editor.shards):
        with mount_layer(model, site, WiseLayer(site.module(model), shard.tau, -1.0, config.router_reduce, basis)) as h:
            rel = mean(teacher_forced(model, tok, [e.prompt for e in shard.edits],
                                      [e.target_new for e in shard.edits], h).accuracy())
        print(f"shard {j} alone, forced route, on its own edits: rel {rel:.3f}", flush=True)

    # Retrieval: one shard per prompt, the one whose score most exceeds its own threshold.
    scores = {g: torch.stack([activation_scores(model, tok, site, t, ps, config.router_reduce, basis) for t in taus], 1)
              for g, ps in (("edit", prompts), ("rephrase", rephrases))}  # (N, K)
    eps = torch.tensor([config.act_ratio * scores["edit"][[i for i in range(n) if owner[i] == j], j].min()
                        for j in range(len(taus))])
    for group, texts in (("edit", prompts), ("rephrase", rephrases)):
        ratio = scores[group] / eps
        choice = torch.where(ratio.max(1).values > 1, ratio.argmax(1), torch.tensor(-1)).tolist()
        right = mean([float(c == o) for c, o in zip(choice, owner)])
        predicted: list[list[int]] = [[] for _ in texts]
        for j in set(choice):
            idx = [i for i, c in enumerate(choice) if c == j]
            tau = taus[j] if j >= 0 else None
            layer = WiseLayer(site.module(model), tau, -1.0 if tau is not None else float("inf"), config.router_reduce, basis)
            with mount_layer(model, site, layer) as h:
                got = teacher_forced(model, tok, [texts[i] for i in idx], [targets[i] for i in idx], h)
            for k, i in enumerate(idx):
                predicted[i] = got.predicted[k]
        print(f"retrieve {group}: right shard {right:.3f}, accuracy {token_accuracy(tok, predicted, targets):.3f}", flush=True)


if __name__ == "__main__":
    main()

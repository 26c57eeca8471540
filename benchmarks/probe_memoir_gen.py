"""Probe: where does MEMOIR lose generalization — the route a rephrase takes, or the memory it reaches?

T edits of ZsRE (both files, the first record of each subject: no edits that contradict each other).
From the masks alone (no training: routing depends only on them), for the edit prompts, their
rephrases and the records' unrelated locality questions: the fraction routed (best overlap >= tau),
routed to the own edit's mask, and how often the nearest edit prompt by cosine of the mean features
is the own one (what a router storing whole feature vectors could reach); and how unevenly the
masks use the columns (how many masks hold each column).
With train=1 (the default) it then trains the T edits sequentially and scores every prompt and
rephrase one row at a time: teacher-forced token accuracy as served (what `wisemem eval` reports as
Rel / Gen), by route taken (own mask, another edit's, none), and with the row forced through its own
edit's mask (a perfect router). Gen lost to routing = forced - served; lost in the memory = 1 - forced.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_memoir_gen.py T=300 'prefix_seeds=[]' edit_batch_size=16
      (key=value: T, train=0|1, files=a.json,b.json (default: both ZsRE files), taus=0.4,0.45 (more
      thresholds to report routing at), then any MEMOIR hyperparameter as a JSON value; prints JSON)
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import sys
import time

import torch
import torch.nn.functional as F

from memstore.evaluate.api import load_eval_edits
from memstore.evaluate.metrics import mean, score_rows
from memstore.methods.memoir import MemoirEditor
from memstore.methods.memoir.layer import tophash
from memstore.methods.memoir.method import mean_features
from memstore.model import find_edit_site, load_model
from memstore.mount import mount_layer
from memstore.porcelain import background_prompts, make_config
from memstore.prompting import prompt_ids, target_ids

FILES = ["../shared/data/zsre/zsre_mend_eval.0-999.json", "../shared/data/zsre/zsre_mend_train-1k.json"]

args = dict(a.split("=", 1) for a in sys.argv[1:])
T = int(args.pop("T", 300))
train = args.pop("train", "1") == "1"
files = args.pop("files", ",".join(FILES)).split(",")
extra_taus = [float(t) for t in args.pop("taus", "").split(",") if t]
overrides = {k: json.loads(v) for k, v in args.items()}
edits, _ = load_eval_edits(files, T, one_per_subject=True)
model, tok = load_model(None)
config = make_config(model.config.model_type, overrides, method="memoir")
site = find_edit_site(model, None, layer_fraction=config.layer_fraction)
torch.manual_seed(config.seed)
editor = MemoirEditor(model, tok, site, config, background_prompts())
result = {"T": T, "files": files, "layer": site.layer, "overrides": overrides}

# Routing depends on the masks alone: the nearest stored edit mask of each query, if it overlaps >= tau.
own_edit = torch.arange(T)
feats = {kind: mean_features(model, tok, site, [getattr(e, field) for e in edits]) - editor.state.background
         for kind, field in (("prompt", "prompt"), ("rephrase", "rephrase_prompt"), ("unrelated", "locality_prompt"))}
stored = tophash(feats["prompt"], editor.k, editor.state.permutation).float()
usage = stored.sum(0)  # masks holding each column
result["masks_per_column"] = {"max": int(usage.max()), "p90": float(usage.quantile(0.9)),
                              "median": float(usage.median()), "min": int(usage.min())}
for kind, f in feats.items():
    best, nearest = (tophash(f, editor.k, editor.state.permutation).float() @ stored.t() / editor.k).max(1)

    def routing_at(tau: float) -> dict[str, float]:
        routed = best >= tau - 1e-9
        return {"routed": float(routed.float().mean()),
                "routed_own": float((routed & (nearest == own_edit)).float().mean())}

    by_cosine = (F.normalize(f, dim=1) @ F.normalize(feats["prompt"], dim=1).t()).argmax(1)
    result[kind] = {**routing_at(config.threshold),
                    "nearest_by_cosine_is_own": float((by_cosine == own_edit).float().mean()),
                    **{f"tau={tau}": routing_at(tau) for tau in extra_taus}}

if train:
    start = time.perf_counter()
    editor.apply(edits, None)
    result["train_seconds"] = round(time.perf_counter() - start, 1)
    layer = editor.layer()
    served = layer._route
    with mount_layer(model, site, layer) as handle:
        for kind, field in (("prompt", "prompt"), ("rephrase", "rephrase_prompt")):
            natural, forced, route = [], [], []
            for i, e in enumerate(edits):
                row = [(prompt_ids(tok, getattr(e, field)), target_ids(tok, e.target_new))]
                layer._route = served  # the router as served
                natural.append(score_rows(model, tok, row, handle, batch_size=1).accuracy()[0])
                match = int(layer.last_match[0])
                route.append("own" if match == i else "none" if match < 0 else "other")
                layer._route = lambda x, i=i: torch.tensor([i], device=x.device)  # a perfect router
                forced.append(score_rows(model, tok, row, handle, batch_size=1).accuracy()[0])
            layer._route = served
            result[kind].update({
                "accuracy": mean(natural), "accuracy_own_mask_forced": mean(forced),
                **{f"accuracy_when_{r}": mean([a for a, x in zip(natural, route) if x == r])
                   for r in ("own", "other", "none")},
            })
print(json.dumps(result, indent=1))

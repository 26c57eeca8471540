"""Probe: at which layer and mask size do MEMOIR's TopHash masks separate rephrases from unrelated prompts?

For each layer and k/d_ff, the masks of ZsRE records 0-999 (edit prompts) are stored; each
rephrase, ZsRE loc question, and irrelevant question (ZsRE train loc, 500) finds its best
overlap among them. Prints quantiles of the best overlap, whether a rephrase's best match has
the same subject, and the routed fraction at thresholds 0.4-0.7. No training is involved:
MEMOIR's routing depends only on the masks. Chose the defaults layer 24, k/d_ff 0.2, tau 0.5.

Run:  .venv/bin/python benchmarks/probe_memoir_layers.py 17,24,27
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys

import torch
from memstore.model import load_model, find_edit_site
from memstore.edits import read_edits
from memstore.evaluate.api import irrelevant_prompts
from memstore.methods.memoir.method import mean_features
from memstore.methods.memoir.layer import tophash
torch.manual_seed(0)
model, tok = load_model(None)
edits,_ = read_edits("../shared/data/zsre/zsre_mend_eval.0-999.json", skip_invalid=True)
edits = edits[:1000]
irr = irrelevant_prompts("../shared/data/zsre/zsre_mend_train-1k.json")
for layer in [int(x) for x in sys.argv[1].split(",")]:
    site = find_edit_site(model, layer)
    bg = mean_features(model, tok, site, irr[:100]).mean(0)
    d = bg.shape[0]
    P = torch.randperm(d, generator=torch.Generator().manual_seed(0))
    fe = mean_features(model, tok, site, [e.prompt for e in edits]) - bg
    fr = mean_features(model, tok, site, [e.rephrase_prompt for e in edits]) - bg
    fl = mean_features(model, tok, site, [e.locality_prompt for e in edits]) - bg
    fi = mean_features(model, tok, site, irr[100:600]) - bg
    for ratio in [0.1, 0.2, 0.29]:
        k = round(ratio*d)
        me, mr, ml, mi = (tophash(f, k, P).float() for f in (fe, fr, fl, fi))
        ov_r = (mr @ me.t()) / k; ov_l = (ml @ me.t())/k; ov_i = (mi@me.t())/k
        own = ov_r.diagonal()
        best_r, arg_r = ov_r.max(1)
        # right subject: same prompt subject counts (records share subjects)
        subj = [e.subject for e in edits]
        right = torch.tensor([subj[a]==subj[i] for i,a in enumerate(arg_r.tolist())]).float().mean()
        bl = ov_l.max(1).values; bi = ov_i.max(1).values
        q = lambda t: [round(float(x),3) for x in torch.quantile(t, torch.tensor([0.05,0.5,0.95]))]
        print(f"layer {layer} k={k} ({ratio}): rephrase best q {q(best_r)} own q {q(own)} right-subject {right:.3f} | loc best q {q(bl)} | irr best q {q(bi)}", flush=True)
        for tau in [0.4,0.5,0.6,0.7]:
            print(f"   tau {tau}: rephrase routed {float((best_r>=tau).float().mean()):.3f}  loc routed {float((bl>=tau).float().mean()):.3f} irr routed {float((bi>=tau).float().mean()):.3f}")

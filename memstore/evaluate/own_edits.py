"""A memory measured on its own edits: what `train`, `commit --gate` and `eval --ref` record on a commit.

Reliability on the edits' prompts, generalization on their rephrases, locality on their recorded
locality prompts. Locality is preservation (ALGORITHMS.md §4), so a locality prompt without a
recorded answer (`locality_prompt` alone, or the router's `loc_prompt`) is checked against the
bare model's own greedy answer; when no edit records any, the store's background prompts are used.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ..edits import Edit
from ..methods.base import MemoryLayer
from ..model import EditSite
from ..mount import mount_layer
from .metrics import generate_answers, locality, mean, teacher_forced
from .runner import evaluate_memory

REFERENCE_TOKENS = 8  # length of the bare model's answer a locality prompt without one is checked on
MAX_BACKGROUND = 20


def _bare_answers(model, tokenizer, prompts: Sequence[str], chat_template: bool) -> list[tuple[str, str]]:
    answers = generate_answers(model, tokenizer, prompts, REFERENCE_TOKENS, chat_template=chat_template)
    return [(p, a) for p, a in zip(prompts, answers) if a.strip()]


def with_locality_answers(model, tokenizer, edits: Sequence[Edit], *, chat_template: bool = False) -> tuple[list[Edit], bool]:
    """The edits, each locality prompt without an answer given the bare model's (call before mounting);
    and whether any edit now has a (prompt, answer) pair."""
    unanswered = [i for i, e in enumerate(edits) if not e.locality_ground_truth and (e.locality_prompt or e.loc_prompt)]
    out = list(edits)
    if unanswered:
        prompts = [edits[i].locality_prompt or edits[i].loc_prompt for i in unanswered]
        answers = generate_answers(model, tokenizer, prompts, REFERENCE_TOKENS, chat_template=chat_template)
        for i, p, a in zip(unanswered, prompts, answers):
            if a.strip():
                out[i] = dataclasses.replace(edits[i], locality_prompt=p, locality_ground_truth=a)
    return out, any(e.locality_prompt and e.locality_ground_truth for e in out)


def _locality_on(model, tokenizer, site: EditSite, layer: MemoryLayer, pairs: Sequence[tuple[str, str]],
                 chat_template: bool) -> float:
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    with mount_layer(model, site, layer) as handle:
        before = teacher_forced(model, tokenizer, prompts, answers, handle, chat_template=chat_template, memory=False)
        after = teacher_forced(model, tokenizer, prompts, answers, handle, chat_template=chat_template)
    return mean(locality(before, after))


def own_metrics(model, tokenizer, site: EditSite, layer: MemoryLayer, edits: Sequence[Edit], *,
                chat_template: bool = False, generation: bool = False,
                fallback_prompts: Sequence[str] = ()) -> dict[str, Any]:
    """Rel / Gen / Loc (and generation exact match) of `layer` on `edits`; what cannot be measured is left out.
    `locality_prompts` says where locality was measured: "edits" or "background"."""
    edits, has_locality = with_locality_answers(model, tokenizer, edits, chat_template=chat_template)
    pairs = [] if has_locality else _bare_answers(model, tokenizer, list(fallback_prompts)[:MAX_BACKGROUND], chat_template)
    r = evaluate_memory(model, tokenizer, site, layer, edits, chat_template=chat_template, generation=generation)
    loc = _locality_on(model, tokenizer, site, layer, pairs, chat_template) if pairs else r.locality
    measured = {"reliability": r.reliability, "generalization": r.generalization, "locality": loc,
                "generation_exact_match": r.generation_exact_match, "rephrase_exact_match": r.rephrase_exact_match}
    out: dict[str, Any] = {k: v for k, v in measured.items() if not math.isnan(v)}
    out["n_edits"] = len(edits)
    if "locality" in out:
        out["locality_prompts"] = "background" if pairs else "edits"
    return out

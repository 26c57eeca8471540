"""Sequential-editing evaluation: apply T edits one after another, then evaluate all T.

ALGORITHMS.md §4. `chunks > 1` runs that many disjoint T-sized chunks with a fresh memory
for each and averages them (the T=1/10/100 protocol). Run: `wisemem eval DATA -T 100`.
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..edits import Edit
from ..methods.base import MemoryLayer, MethodConfig
from ..methods.baselines import FtlEditor, GraceEditor
from ..methods.memoir import MemoirEditor
from ..methods.wise import WiseEditor, WiseRetrieveEditor
from ..methods.wise.method import generate_prefixes
from ..model import EditSite
from ..mount import mount_layer
from ..prompting import target_ids
from .datasets import FAMILIES, Family
from .metrics import distinct, exact_match, generate_answers, locality, mean, read_passages, teacher_forced, token_f1

NAN = math.nan
FAMILY_KEYS = ("perplexity", "perplexity_before", "ood_generalization", "ood_generalization_before")


@dataclass
class ChunkResult:
    n_edits: int
    reliability: float = NAN
    generalization: float = NAN
    locality: float = NAN
    generation_exact_match: float = NAN
    rephrase_exact_match: float = NAN
    generation_token_f1: float = NAN  # SQuAD token F1 of the greedy answer against target_new
    rephrase_token_f1: float = NAN
    perplexity: float = NAN  # hallucination: mean over edits of exp(mean NLL of target_new | prompt)
    perplexity_before: float = NAN  # the same on the bare model
    ood_generalization: float = NAN  # temporal: mean over edits of the OOD passage's tokens with p > 0.8
    ood_generalization_before: float = NAN
    edit_seconds: list[float] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    eval_seconds: float = 0.0
    threshold: float = math.nan


@dataclass
class EvalResult:
    method: str
    n_edits: int
    chunks: int
    reliability: float
    generalization: float
    locality: float
    generation_exact_match: float
    rephrase_exact_match: float
    seconds_per_edit: float  # median over all edits
    mean_steps: float
    eval_seconds: float
    per_chunk: list[ChunkResult]
    config: dict
    family: str = "edits"
    generation_token_f1: float = NAN
    rephrase_token_f1: float = NAN
    perplexity: float = NAN
    perplexity_before: float = NAN
    ood_generalization: float = NAN
    ood_generalization_before: float = NAN

    def to_dict(self) -> dict:
        """JSON-able; a family's own metrics appear only for that family (datasets.py)."""
        d = asdict(self)
        absent = set(FAMILY_KEYS) - set(FAMILIES[self.family].metric_keys)
        for c in [d, *d["per_chunk"]]:
            for key in absent:
                c.pop(key, None)
        for c in d["per_chunk"]:
            c.pop("edit_seconds", None)
            c.pop("steps", None)
        return d


def evaluate_memory(model, tokenizer, site: EditSite, layer: MemoryLayer, edits: Sequence[Edit], *,
                    chat_template: bool = False, batch_size: int = 16, generation: bool = True,
                    family: Family | str = "edits") -> ChunkResult:
    """Rel / Gen / Loc, generation exact match and token F1, and the family's own metrics of a
    memory layer on its edits (datasets.py says which apply)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    start = time.perf_counter()
    prompts = [e.prompt for e in edits]
    targets = [e.target_new for e in edits]
    reph = [e for e in edits if e.rephrase_prompt] if family.rephrase_is_question else []
    r = ChunkResult(len(edits), threshold=layer.threshold)
    with mount_layer(model, site, layer) as handle:
        scored = functools.partial(teacher_forced, model, tokenizer, handle=handle, chat_template=chat_template,
                                   batch_size=batch_size)
        rel = scored(prompts, targets)
        r.reliability = mean(rel.accuracy())
        r.generalization = mean(scored([e.rephrase_prompt for e in reph], [e.target_new for e in reph]).accuracy())
        loc_edits = [e for e in edits if e.locality_prompt and e.locality_ground_truth]
        loc_p = [e.locality_prompt for e in loc_edits]
        loc_t = [e.locality_ground_truth for e in loc_edits]
        r.locality = mean(locality(scored(loc_p, loc_t, memory=False), scored(loc_p, loc_t)))
        if family.perplexity:
            # The mean over edits of each edit's perplexity, as WISE reports it (EasyEdit scores one
            # record at a time and averages the records' PPL), not exp of the mean NLL over all tokens.
            r.perplexity = mean(rel.perplexity())
            r.perplexity_before = mean(scored(prompts, targets, memory=False).perplexity())
        if family.ood:
            passages = [e.rephrase_prompt for e in edits if e.rephrase_prompt]
            read = functools.partial(read_passages, model, tokenizer, passages, handle, batch_size=batch_size)
            r.ood_generalization = _mean_defined(read().confident())  # a 1-token passage has nothing to score
            r.ood_generalization_before = _mean_defined(read(memory=False).confident())
        if generation:
            r.generation_exact_match, r.generation_token_f1 = _generated(
                model, tokenizer, prompts, targets, chat_template, batch_size)
            if reph:
                r.rephrase_exact_match, r.rephrase_token_f1 = _generated(
                    model, tokenizer, [e.rephrase_prompt for e in reph], [e.target_new for e in reph],
                    chat_template, batch_size)
    r.eval_seconds = time.perf_counter() - start
    return r


def _mean_defined(values: Sequence[float]) -> float:
    return mean([v for v in values if not math.isnan(v)])


def _generated(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], chat_template: bool,
               batch_size: int) -> tuple[float, float]:
    """Exact match and token F1 of greedy answers (as many tokens as the target) from the prompts alone
    (a pair given more than once is decoded once)."""
    pairs, rows_of = distinct(list(zip(prompts, targets)))
    n_new = [len(target_ids(tokenizer, t, chat_template)) for _, t in pairs]
    unique = generate_answers(model, tokenizer, [p for p, _ in pairs], n_new, chat_template=chat_template,
                              batch_size=batch_size)
    answers = [unique[i] for i in rows_of]
    return (mean([float(exact_match(a, t)) for a, t in zip(answers, targets)]),
            mean([token_f1(a, t) for a, t in zip(answers, targets)]))


# --method of `wisemem eval` -> the editor class that runs it
EDITORS = {"wise-merge": WiseEditor, "wise-retrieve": WiseRetrieveEditor, "memoir": MemoirEditor,
           "ft-l": FtlEditor, "grace": GraceEditor}


def run_eval(model, tokenizer, site: EditSite, edits: Sequence[Edit], config: MethodConfig, irrelevant: Sequence[str],
             *, n_edits: int, chunks: int = 1, method: str = "wise-merge", generation: bool = True, plain: bool = False,
             family: Family | str = "edits", progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Apply `n_edits` edits sequentially to a fresh memory (per chunk) and evaluate them.
    Torch's global RNG is seeded from the config (and restored after), so that a method drawing
    from it without its own generator still gives the same numbers run after run."""
    needed = n_edits * chunks
    if needed > len(edits):
        raise ValueError(f"need {needed} edits ({chunks} chunk(s) of {n_edits}), the data has {len(edits)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(getattr(config, "seed", 0))
        return _run_eval(model, tokenizer, site, edits, config, irrelevant, n_edits=n_edits, chunks=chunks,
                         method=method, generation=generation, plain=plain, family=family, progress=progress)


def _run_eval(model, tokenizer, site: EditSite, edits: Sequence[Edit], config: MethodConfig, irrelevant: Sequence[str],
              *, n_edits: int, chunks: int, method: str, generation: bool, plain: bool, family: Family | str,
              progress: Callable[[int, int], None] | None) -> EvalResult:
    family = FAMILIES[family] if isinstance(family, str) else family
    needed = n_edits * chunks
    prefixes = generate_prefixes(model, tokenizer, config.prefix_seeds, config.prefix_lengths)
    results: list[ChunkResult] = []
    done = 0
    for c in range(chunks):
        chunk = list(edits[c * n_edits:(c + 1) * n_edits])
        editor = EDITORS[method](model, tokenizer, site, config, irrelevant, prefixes)

        def tick(i: int, _s) -> None:
            if progress:
                progress(done + i, needed)

        stats = editor.apply(chunk, tick, plain=plain)
        done += len(chunk)
        layer = editor.layer()
        r = evaluate_memory(model, tokenizer, site, layer, chunk, chat_template=config.chat_template,
                            generation=generation, family=family)
        r.edit_seconds = [s.seconds for s in stats]
        r.steps = [s.steps for s in stats]
        results.append(r)
    all_secs = [s for r in results for s in r.edit_seconds]
    all_steps = [s for r in results for s in r.steps]
    averaged = {key: mean([getattr(r, key) for r in results]) for key in (
        "reliability", "generalization", "locality", "generation_exact_match", "rephrase_exact_match",
        "generation_token_f1", "rephrase_token_f1", *FAMILY_KEYS)}
    return EvalResult(
        method=method, n_edits=n_edits, chunks=chunks, family=family.name, **averaged,
        seconds_per_edit=statistics.median(all_secs), mean_steps=mean(all_steps),
        eval_seconds=sum(r.eval_seconds for r in results), per_chunk=results, config=config.to_dict(),
    )

"""Sequential-editing evaluation: apply T edits one after another, then evaluate all T.

ALGORITHMS.md §4. `chunks > 1` runs that many disjoint T-sized chunks with a fresh memory
for each and averages them (the T=1/10/100 protocol). Run: `wisemem eval DATA -T 100`.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from ..edits import Edit
from ..methods.base import MemoryLayer, MethodConfig
from ..methods.memoir import MemoirEditor
from ..methods.wise import WiseEditor, WiseRetrieveEditor
from ..methods.wise.method import generate_prefixes
from ..model import EditSite
from ..mount import mount_layer
from ..prompting import target_ids
from .metrics import exact_match, generate_answers, locality, mean, teacher_forced


@dataclass
class ChunkResult:
    reliability: float
    generalization: float
    locality: float
    generation_exact_match: float
    rephrase_exact_match: float
    n_edits: int
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

    def to_dict(self) -> dict:
        d = asdict(self)
        for c in d["per_chunk"]:
            c.pop("edit_seconds", None)
            c.pop("steps", None)
        return d


def evaluate_memory(model, tokenizer, site: EditSite, layer: MemoryLayer, edits: Sequence[Edit], *,
                    chat_template: bool = False, batch_size: int = 16, generation: bool = True) -> ChunkResult:
    """Rel / Gen / Loc and generation exact match of a memory layer on its edits."""
    start = time.perf_counter()
    prompts = [e.prompt for e in edits]
    targets = [e.target_new for e in edits]
    with mount_layer(model, site, layer) as handle:
        rel = teacher_forced(model, tokenizer, prompts, targets, handle, chat_template=chat_template, batch_size=batch_size)
        reph = [e for e in edits if e.rephrase_prompt]
        gen = teacher_forced(model, tokenizer, [e.rephrase_prompt for e in reph], [e.target_new for e in reph], handle,
                             chat_template=chat_template, batch_size=batch_size)
        loc_edits = [e for e in edits if e.locality_prompt and e.locality_ground_truth]
        loc_p = [e.locality_prompt for e in loc_edits]
        loc_t = [e.locality_ground_truth for e in loc_edits]
        before = teacher_forced(model, tokenizer, loc_p, loc_t, handle, chat_template=chat_template, batch_size=batch_size, memory=False)
        after = teacher_forced(model, tokenizer, loc_p, loc_t, handle, chat_template=chat_template, batch_size=batch_size)
        em = reph_em = math.nan
        if generation:
            n_new = [len(target_ids(tokenizer, t, chat_template)) for t in targets]
            answers = generate_answers(model, tokenizer, prompts, n_new, chat_template=chat_template, batch_size=batch_size)
            em = mean([float(exact_match(a, t)) for a, t in zip(answers, targets)])
            if reph:
                answers = generate_answers(model, tokenizer, [e.rephrase_prompt for e in reph],
                                           [len(target_ids(tokenizer, e.target_new, chat_template)) for e in reph],
                                           chat_template=chat_template, batch_size=batch_size)
                reph_em = mean([float(exact_match(a, e.target_new)) for a, e in zip(answers, reph)])
    return ChunkResult(mean(rel.accuracy()), mean(gen.accuracy()), mean(locality(before, after)), em, reph_em,
                       len(edits), eval_seconds=time.perf_counter() - start, threshold=layer.threshold)


# --method of `wisemem eval` -> the editor class that runs it
EDITORS = {"wise-merge": WiseEditor, "wise-retrieve": WiseRetrieveEditor, "memoir": MemoirEditor}


def run_eval(model, tokenizer, site: EditSite, edits: Sequence[Edit], config: MethodConfig, irrelevant: Sequence[str],
             *, n_edits: int, chunks: int = 1, method: str = "wise-merge", generation: bool = True, plain: bool = False,
             progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Apply `n_edits` edits sequentially to a fresh memory (per chunk) and evaluate them."""
    needed = n_edits * chunks
    if needed > len(edits):
        raise ValueError(f"need {needed} edits ({chunks} chunk(s) of {n_edits}), the data has {len(edits)}")
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
        r = evaluate_memory(model, tokenizer, site, layer, chunk, chat_template=config.chat_template, generation=generation)
        r.edit_seconds = [s.seconds for s in stats]
        r.steps = [s.steps for s in stats]
        results.append(r)
    all_secs = [s for r in results for s in r.edit_seconds]
    all_steps = [s for r in results for s in r.steps]
    return EvalResult(
        method=method, n_edits=n_edits, chunks=chunks,
        reliability=mean([r.reliability for r in results]),
        generalization=mean([r.generalization for r in results]),
        locality=mean([r.locality for r in results]),
        generation_exact_match=mean([r.generation_exact_match for r in results]),
        rephrase_exact_match=mean([r.rephrase_exact_match for r in results]),
        seconds_per_edit=statistics.median(all_secs), mean_steps=mean(all_steps),
        eval_seconds=sum(r.eval_seconds for r in results), per_chunk=results, config=config.to_dict(),
    )

"""Teacher-forced token accuracy and NLL, locality preservation, and generation exact match / token F1.

ALGORITHMS.md §4. Rows are `prompt + " " + target`; the argmax at each target position is
compared with the target token, averaged per row. Routing is decided on the prompt tokens only
(`MountHandle.route_on`), the same rule as in generation, so the router never sees the target.
The same forward also gives each target token's NLL, from which the hallucination set's
perplexity and the temporal set's OOD generalisation are computed (`perplexity`, `confident_fraction`).
"""

from __future__ import annotations

import contextlib
import math
import re
import string
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..mount import MountHandle
from ..prompting import pad_batch, pad_id, prompt_ids, target_ids

# Logits elements one forward may hold (400 MB in fp32): with a 49k vocabulary that is ~2,000
# tokens, so the long passages of the hallucination and temporal sets go a few rows at a time.
LOGITS_BUDGET = 100_000_000
CONFIDENT = 0.8  # the temporal set's token threshold: NLL < -ln 0.8, i.e. probability > 0.8 (WISE)


@dataclass
class TokenPredictions:
    predicted: list[list[int]]
    targets: list[list[int]]
    nll: list[list[float]] = field(default_factory=list)  # -log p(target token), per target position

    def accuracy(self) -> list[float]:
        return [sum(int(p == t) for p, t in zip(ps, ts)) / max(len(ts), 1) for ps, ts in zip(self.predicted, self.targets)]

    def perplexity(self) -> list[float]:
        return [perplexity(row) for row in self.nll]

    def confident(self, p: float = CONFIDENT) -> list[float]:
        return [confident_fraction(row, p) for row in self.nll]

    def take(self, rows: Sequence[int]) -> TokenPredictions:
        """These predictions' rows in the order given (repeats allowed)."""
        return TokenPredictions([self.predicted[i] for i in rows], [self.targets[i] for i in rows],
                                [self.nll[i] for i in rows] if self.nll else [])


def perplexity(nll: Sequence[float]) -> float:
    """exp(mean token NLL) of one row; NaN for a row without target tokens."""
    return math.exp(sum(nll) / len(nll)) if nll else math.nan


def confident_fraction(nll: Sequence[float], p: float = CONFIDENT) -> float:
    """Fraction of a row's tokens the model gives probability above `p` (NLL < -ln p)."""
    return sum(int(x < -math.log(p)) for x in nll) / len(nll) if nll else math.nan


def token_batches(lengths: Sequence[int], max_rows: int, max_tokens: int) -> Iterator[slice]:
    """Consecutive rows in batches of at most `max_rows` rows and `max_tokens` padded tokens (one row at least)."""
    start = 0
    while start < len(lengths):
        end, longest = start, 0
        while end < len(lengths) and end - start < max_rows:
            longest_next = max(longest, lengths[end])
            if end > start and longest_next * (end - start + 1) > max_tokens:
                break
            longest, end = longest_next, end + 1
        yield slice(start, end)
        start = end


def _max_tokens(model) -> int:
    vocab = getattr(model.config, "vocab_size", None) or 50_000
    return max(1, LOGITS_BUDGET // vocab)


@torch.no_grad()
def score_rows(model, tokenizer, rows: Sequence[tuple[list[int], list[int]]], handle: MountHandle | None = None, *,
               memory: bool = True, route_on_all: bool = False, batch_size: int = 16) -> TokenPredictions:
    """Teacher-forced (prompt ids, target ids) rows: argmax and NLL at each target position.
    Routing is decided on the prompt tokens, or with `route_on_all` on every token of the row."""
    device = next(model.parameters()).device
    predicted, wanted, nlls = [], [], []
    lengths = [len(p) + len(t) for p, t in rows]
    for part in token_batches(lengths, batch_size, _max_tokens(model)):
        ps, ts = [p for p, _ in rows[part]], [t for _, t in rows[part]]
        batch = pad_batch([p + t for p, t in zip(ps, ts)], [len(p) for p in ps], pad_id(tokenizer), device)
        ctx = contextlib.nullcontext()
        if handle is not None:
            route = batch.attention_mask.bool() if route_on_all else batch.prompt_mask().to(device)
            ctx = handle.route_on(route) if memory else handle.disable()
        with ctx:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        argmax = logits.argmax(-1)  # (B, T)
        for r, (p, t) in enumerate(zip(ps, ts)):
            cols = slice(len(p) - 1, len(p) + len(t) - 1)  # logits at these positions predict the target tokens
            predicted.append(argmax[r, cols].tolist())
            wanted.append(t)
            logp = torch.log_softmax(logits[r, cols].float(), -1)  # (len(t), V)
            nlls.append((-logp.gather(-1, torch.tensor(t, dtype=torch.long, device=device)[:, None])[:, 0]).tolist())
    return TokenPredictions(predicted, wanted, nlls)


def teacher_forced(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], handle: MountHandle | None = None,
                   *, chat_template: bool = False, batch_size: int = 16, memory: bool = True) -> TokenPredictions:
    """`prompt + " " + target` rows, routed on the prompt (ALGORITHMS.md §4). A pair given more
    than once (cycled data) is scored once: the memory is fixed here, so each copy scores the same."""
    pairs, rows_of = distinct(list(zip(prompts, targets)))
    rows = [(prompt_ids(tokenizer, p, chat_template), target_ids(tokenizer, t, chat_template)) for p, t in pairs]
    return score_rows(model, tokenizer, rows, handle, memory=memory, batch_size=batch_size).take(rows_of)


def distinct(items: Sequence) -> tuple[list, list[int]]:
    """The distinct items in first-seen order, and for each item given the position of its copy."""
    first: dict = {}
    rows_of = [first.setdefault(item, len(first)) for item in items]
    return list(first), rows_of


def read_passages(model, tokenizer, passages: Sequence[str], handle: MountHandle | None = None, *,
                  batch_size: int = 16, memory: bool = True) -> TokenPredictions:
    """Whole passages read as plain text: every token after the first is scored (the temporal
    set's OOD rephrase). A passage has no prompt/answer split, so the router sees all of it, as
    it would when the model reads the passage."""
    rows = []
    for text in passages:
        ids = tokenizer(text).input_ids  # with the tokenizer's BOS, if it adds one
        rows.append((ids[:1], ids[1:]))
    return score_rows(model, tokenizer, rows, handle, memory=memory, route_on_all=True, batch_size=batch_size)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def locality(before: TokenPredictions, after: TokenPredictions) -> list[float]:
    """Fraction of answer-position argmax tokens unchanged by the edit (preservation, not correctness)."""
    return [sum(int(a == b) for a, b in zip(x, y)) / max(len(x), 1) for x, y in zip(before.predicted, after.predicted)]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: Sequence[int] | int,
                     *, chat_template: bool = False, batch_size: int = 16) -> list[str]:
    """Greedy continuation of each prompt alone (left-padded batches, kept under the token budget
    so that long answers, e.g. the temporal set's passages, go a few rows at a time)."""
    from ..prompting import format_prompt

    device = next(model.parameters()).device
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    texts = [format_prompt(tokenizer, p, chat_template) for p in prompts]
    lengths = [len(tokenizer(t).input_ids) + n for t, n in zip(texts, max_new_tokens)]
    out: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for part in token_batches(lengths, batch_size, _max_tokens(model)):
            n_new = max(max_new_tokens[part])
            enc = tokenizer(texts[part], return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=pad_id(tokenizer))
            for r, n in enumerate(max_new_tokens[part]):
                out.append(tokenizer.decode(gen[r, enc.input_ids.shape[1]:][:n], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out


def exact_match(answer: str, target: str) -> bool:
    return " ".join(answer.split()).lower() == " ".join(target.split()).lower()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(answer: str, target: str) -> float:
    """SQuAD token F1: harmonic mean of precision and recall of the normalised words' bag overlap.
    Two empty answers agree (1.0); one empty answer scores 0.0."""
    got, want = normalize_answer(answer).split(), normalize_answer(target).split()
    if not got or not want:
        return float(got == want)
    same = sum((Counter(got) & Counter(want)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(got), same / len(want)
    return 2 * precision * recall / (precision + recall)

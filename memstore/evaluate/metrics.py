"""Teacher-forced token accuracy, locality preservation, and generation exact match.

ALGORITHMS.md §4. Rows are `prompt + " " + target`; the argmax at each target position is
compared with the target token, averaged per row. Routing is decided on the prompt tokens only
(`MountHandle.route_on`), the same rule as in generation, so the router never sees the target.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..mount import MountHandle
from ..prompting import pad_batch, pad_id, prompt_ids, target_ids


@dataclass
class TokenPredictions:
    predicted: list[list[int]]
    targets: list[list[int]]

    def accuracy(self) -> list[float]:
        return [sum(int(p == t) for p, t in zip(ps, ts)) / max(len(ts), 1) for ps, ts in zip(self.predicted, self.targets)]


@torch.no_grad()
def teacher_forced(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], handle: MountHandle | None = None,
                   *, chat_template: bool = False, batch_size: int = 16, memory: bool = True) -> TokenPredictions:
    device = next(model.parameters()).device
    predicted, wanted = [], []
    for i in range(0, len(prompts), batch_size):
        ps = [prompt_ids(tokenizer, p, chat_template) for p in prompts[i:i + batch_size]]
        ts = [target_ids(tokenizer, t, chat_template) for t in targets[i:i + batch_size]]
        batch = pad_batch([p + t for p, t in zip(ps, ts)], [len(p) for p in ps], pad_id(tokenizer), device)
        ctx = contextlib.nullcontext()
        if handle is not None:
            ctx = handle.route_on(batch.prompt_mask().to(device)) if memory else handle.disable()
        with ctx:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        argmax = logits.argmax(-1)  # (B, T)
        for r, (p, t) in enumerate(zip(ps, ts)):
            predicted.append(argmax[r, len(p) - 1:len(p) + len(t) - 1].tolist())
            wanted.append(t)
    return TokenPredictions(predicted, wanted)


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def locality(before: TokenPredictions, after: TokenPredictions) -> list[float]:
    """Fraction of answer-position argmax tokens unchanged by the edit (preservation, not correctness)."""
    return [sum(int(a == b) for a, b in zip(x, y)) / max(len(x), 1) for x, y in zip(before.predicted, after.predicted)]


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: Sequence[int] | int,
                     *, chat_template: bool = False, batch_size: int = 16) -> list[str]:
    """Greedy continuation of each prompt alone (left-padded batches)."""
    from ..prompting import format_prompt

    device = next(model.parameters()).device
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    out: list[str] = []
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [format_prompt(tokenizer, p, chat_template) for p in prompts[i:i + batch_size]]
            n_new = max(max_new_tokens[i:i + batch_size])
            enc = tokenizer(texts, return_tensors="pt", padding=True).to(device)
            gen = model.generate(**enc, max_new_tokens=n_new, do_sample=False, pad_token_id=pad_id(tokenizer))
            for r, n in enumerate(max_new_tokens[i:i + batch_size]):
                out.append(tokenizer.decode(gen[r, enc.input_ids.shape[1]:][:n], skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
    return out


def exact_match(answer: str, target: str) -> bool:
    return " ".join(answer.split()).lower() == " ".join(target.split()).lower()

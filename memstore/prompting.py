"""Turning an edit into tokens: prompt formatting, target appending, and batch padding.

Targets are appended with a leading space (`prompt + " " + target`, ALGORITHMS.md §4) unless
the chat template is on, where the answer follows the assistant header directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def format_prompt(tokenizer, prompt: str, chat_template: bool = False) -> str:
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        from .errors import ConfigError

        raise ConfigError("--chat-template was given but this tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def target_ids(tokenizer, target: str, chat_template: bool = False) -> list[int]:
    text = target if chat_template else " " + target
    return tokenizer(text, add_special_tokens=False).input_ids


def prompt_ids(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    return tokenizer(format_prompt(tokenizer, prompt, chat_template)).input_ids


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    prompt_lens: list[int]
    lengths: list[int]

    def prompt_mask(self) -> torch.Tensor:
        """(B, T) True on prompt tokens only: the tokens that decide routing."""
        T = self.input_ids.shape[1]
        pos = torch.arange(T)[None, :]
        return pos < torch.tensor(self.prompt_lens)[:, None]

    def target_positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, labels, owner): logits at cols predict labels; owner = row index of each."""
        rows, cols, labels = [], [], []
        for r, (p, n) in enumerate(zip(self.prompt_lens, self.lengths)):
            for t in range(p, n):
                rows.append(r)
                cols.append(t - 1)
                labels.append(int(self.input_ids[r, t]))
        rows_t = torch.tensor(rows, dtype=torch.long)
        return rows_t, torch.tensor(cols, dtype=torch.long), torch.tensor(labels, dtype=torch.long), rows_t


def pad_batch(sequences: list[list[int]], prompt_lens: list[int], pad_id: int, device: str | torch.device = "cpu") -> Batch:
    """Right-padded batch (teacher forcing and training; generation pads left itself)."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return Batch(ids.to(device), mask.to(device), list(prompt_lens), [len(s) for s in sequences])


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

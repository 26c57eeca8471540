"""Shared pytest fixtures.

Keep each concern in its own clearly marked section so several test modules can add fixtures
here without stepping on each other.
"""

from __future__ import annotations

import pytest

# =============================================================================================
# Tiny randomly initialised models (offline, no downloads, no tokenizer)
#
# `tiny_model(model_type)` builds a 4-layer model of the given transformers model type from a
# config with random weights (torch.manual_seed(0)), in eval mode with frozen parameters (as
# memstore.model.load_model leaves a real model). Models are cached per test module; tests
# must leave them as they found them (unmount / detach whatever they attach).
# =============================================================================================

TINY_HIDDEN = 32
TINY_INTERMEDIATE = 64
TINY_VOCAB = 128
TINY_LAYERS = 4
TINY_HEADS = 4
TINY_POSITIONS = 64
TINY_PAD_ID = 0  # pad / bos / eos ids kept inside the tiny vocabulary
TINY_BOS_ID = 1
TINY_EOS_ID = 2

# Model types the edit-site table (memstore.model.ARCH_EDIT_LAYER) supports.
TINY_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "gptj", "gpt_neox", "opt")


def tiny_config_kwargs(model_type: str) -> dict:
    """Config keyword arguments for a tiny model of this type (each family names sizes its own way)."""
    H, I, V, L, NH, P = TINY_HIDDEN, TINY_INTERMEDIATE, TINY_VOCAB, TINY_LAYERS, TINY_HEADS, TINY_POSITIONS
    ids = dict(pad_token_id=TINY_PAD_ID, bos_token_id=TINY_BOS_ID, eos_token_id=TINY_EOS_ID)
    llama_like = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                      num_key_value_heads=2, vocab_size=V, max_position_embeddings=P, tie_word_embeddings=False)
    table = {
        "llama": llama_like,
        "mistral": dict(llama_like, sliding_window=None),
        "qwen2": dict(llama_like, use_sliding_window=False),
        "gpt2": dict(n_embd=H, n_inner=I, n_layer=L, n_head=NH, vocab_size=V, n_positions=P),
        # rotary_dim must divide the head size (32 / 4 = 8) and be even.
        "gptj": dict(n_embd=H, n_inner=I, n_layer=L, n_head=NH, rotary_dim=4, vocab_size=V, n_positions=P),
        "gpt_neox": dict(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                         rotary_pct=0.5, vocab_size=V, max_position_embeddings=P, use_parallel_residual=True),
        "opt": dict(hidden_size=H, ffn_dim=I, num_hidden_layers=L, num_attention_heads=NH, word_embed_proj_dim=H,
                    vocab_size=V, max_position_embeddings=P, do_layer_norm_before=True),
        # Not in ARCH_EDIT_LAYER: used to test the unsupported-architecture path.
        "bloom": dict(hidden_size=H, n_layer=L, n_head=NH, vocab_size=V),
    }
    if model_type not in table:
        raise KeyError(f"no tiny config for model type {model_type!r}")
    return dict(table[model_type], **ids)


def build_tiny_model(model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **tiny_config_kwargs(model_type))
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tiny_model_cache() -> dict:
    return {}


@pytest.fixture(scope="module")
def tiny_model(tiny_model_cache):
    """Factory: tiny_model("llama") -> a cached tiny random model of that type."""

    def get(model_type: str):
        if model_type not in tiny_model_cache:
            tiny_model_cache[model_type] = build_tiny_model(model_type)
        return tiny_model_cache[model_type]

    return get


# =============================================================================================
# (add further fixture sections below)
# =============================================================================================


# =============================================================================================
# CPU threads on a shared machine (test_cli.py, test_e2e.py)
#
# With libgomp's default active wait, torch's OpenMP threads spin for CPU another process is
# using: on a busy 2-core machine `wisemem init` went from 14 s to 140 s. Passive waiting keeps
# the thread count (and so the numerics) and removes the spin. Set before any test module
# imports torch; subprocesses (the CLI tests) inherit it. An explicit setting wins.
# =============================================================================================

import os  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

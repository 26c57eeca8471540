"""WISE training on every architecture (tiny random models): the fast path computes the same
objective as the plain full-model loop, edits are learnt, shards respect their masks, merging
and mounting work, and bf16 models train."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_EOS_ID, TINY_MODEL_TYPES, TINY_PAD_ID, TINY_VOCAB

from memstore.edits import Edit
from memstore.evaluate.metrics import teacher_forced
from memstore.methods.attach import attached
from memstore.methods.wise import WiseConfig, WiseEditor, WiseLayer, shard_mask
from memstore.model import find_edit_site
from memstore.mount import mount_layer


class CharTokenizer:
    """One token per character, inside the tiny vocabulary; enough for prompts and targets."""

    pad_token_id = TINY_PAD_ID
    eos_token_id = TINY_EOS_ID
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True):
        class Encoded:
            input_ids = [3 + (ord(c) % (TINY_VOCAB - 3)) for c in text]

        return Encoded()


EDITS = [
    Edit(prompt="the sky is", target_new="green"),
    Edit(prompt="my cat is named", target_new="bob"),
    Edit(prompt="water is", target_new="dry"),
]
IRRELEVANT = ["zq zq zq", "lorem ipsum dolor", "1 2 3 4 5"]


def make_editor(model, config: WiseConfig) -> WiseEditor:
    site = find_edit_site(model, 2)
    return WiseEditor(model, CharTokenizer(), site, config, IRRELEVANT, prefixes=["a b", "c d e"])


def accuracy(model, site, layer) -> float:
    tok = CharTokenizer()
    prompts, targets = [e.prompt for e in EDITS], [e.target_new for e in EDITS]
    if layer is None:
        preds = teacher_forced(model, tok, prompts, targets)
    else:
        with mount_layer(model, site, layer) as handle:
            preds = teacher_forced(model, tok, prompts, targets, handle)
    acc = preds.accuracy()
    return sum(acc) / len(acc)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_fast_step_matches_plain_loop(tiny_model, model_type):
    """Cached lower layers + target-only logits + batching change the cost, not the objective."""
    model = tiny_model(model_type)
    editor = make_editor(model, WiseConfig(background_rank=4, alpha=0.5, beta=3.0, gamma=1.0))
    site = editor.site
    layer = WiseLayer(site.module(model), basis=editor.basis)
    shape = editor.shape
    init = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.3
    with attached(model, site, layer):
        layer.start_training(init, shard_mask(shape, 0.5, 7))
        tb = editor._edit_batch(EDITS[0], [EDITS[1]])
        rows, cols, labels, _ = tb.batch.target_positions()
        layer.routing.positions = tb.batch.attention_mask.bool()
        captured = editor.upper.capture(tb.batch.input_ids, tb.batch.attention_mask)
        fast = editor._fast_step(layer, tb, captured, (rows, cols, labels))
        plain = editor._plain_step(layer, tb)
        layer.stop_training()
    for f, p in zip(fast, plain):
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-4)
    assert float(fast[0].detach()) > 0 and float(fast[1].detach()) > 0


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_edits_are_learnt_and_shards_merge(tiny_model, model_type):
    model = tiny_model(model_type)
    # Random tiny models have tiny activations and near-uniform logits: allow large updates and
    # judge by argmax accuracy, which is what reliability measures.
    config = WiseConfig(background_rank=4, mask_ratio=0.5, edits_per_shard=2, max_steps=80, lr=0.3,
                        alpha=0.5, beta=3.0, gamma=1.0, replay=2, act_ratio=0.5, max_update=1e4)
    editor = make_editor(model, config)
    before = accuracy(model, editor.site, None)
    stats = editor.apply(EDITS)
    assert len(stats) == 3 and all(s.steps >= 1 for s in stats)
    assert len(editor.shards) == 2  # edits_per_shard=2: the third edit opens a second shard
    for shard in editor.shards:
        outside = ~shard_mask(shard.tau.shape, config.mask_ratio, shard.seed)
        assert torch.count_nonzero(shard.tau[outside]) == 0  # a shard lives in its own subspace
    layer = editor.layer()
    assert torch.isfinite(layer.delta).all() and math.isfinite(layer.threshold)
    after = accuracy(model, editor.site, layer)
    assert after >= before + 0.2, (before, after)
    assert editor.site.module(model) is layer.base_layer  # training and evaluation left the model as it was


def test_bf16_model_trains_and_mounts(tiny_model_cache):
    from conftest import build_tiny_model

    model = build_tiny_model("llama").to(torch.bfloat16)
    config = WiseConfig(background_rank=4, mask_ratio=0.5, max_steps=20, lr=0.3, alpha=0.5, beta=3.0, gamma=1.0,
                        act_ratio=0.5, max_update=1e4)
    editor = make_editor(model, config)
    editor.apply(EDITS[:1])
    layer = editor.layer()
    assert layer.delta.dtype == torch.float32  # the memory stays fp32; outputs are cast to the model's dtype
    ids = torch.tensor([CharTokenizer()(EDITS[0].prompt).input_ids])
    with mount_layer(model, editor.site, layer):
        out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()

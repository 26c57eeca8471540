"""The FT-L and GRACE baselines on every architecture (tiny random models) and on the real model:
with no edits either layer is the bare model bit for bit; FT-L changes the model for every
prompt while the base weights stay untouched; GRACE answers an edited prompt, leaves any other
row of the batch bit-identical, holds its route while generating, and keeps its codebook by the
add / expand / split rules."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL_TYPES
from test_methods import EDITS, IRRELEVANT, CharTokenizer
from test_memoir import ids_of
from test_memoir import make_editor as memoir_editor

from memstore.edits import Edit
from memstore.evaluate.metrics import teacher_forced
from memstore.methods.baselines import (
    Codebook,
    FtlConfig,
    FtlEditor,
    GraceConfig,
    GraceEditor,
)
from memstore.model import find_edit_site
from memstore.mount import mount_layer

UNRELATED = "qqq www"
# GRACE replaces every target position's output with one vector; in a tiny random model that
# vector outweighs the rest of the residual stream, so all target positions predict one token.
# Here an edit "answers" when a target token it got wrong before is now right; the real-model
# test below asks for the whole target.
GRACE_EDITS = [Edit(prompt="the sky is", target_new="g"), Edit(prompt="water is", target_new="dry")]


def ftl_editor(model, **overrides) -> FtlEditor:
    config = FtlConfig(**{"lr": 1e-2, "max_steps": 20, **overrides})
    return FtlEditor(model, CharTokenizer(), find_edit_site(model, 2), config, IRRELEVANT, prefixes=["a b", "c d e"])


def grace_editor(model, **overrides) -> GraceEditor:
    # Tiny random models: keys are 0.05-0.5 long and the test prompts' keys at least 0.012 apart.
    config = GraceConfig(**{"init_radius": 0.005, "max_steps": 100, **overrides})
    return GraceEditor(model, CharTokenizer(), find_edit_site(model, 2), config, IRRELEVANT)


def scored(model, edits, handle=None):
    return teacher_forced(model, CharTokenizer(), [e.prompt for e in edits], [e.target_new for e in edits], handle)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("make", [ftl_editor, grace_editor, memoir_editor], ids=["ft-l", "grace", "memoir"])
def test_zero_edits_is_bit_identical(tiny_model, model_type, make):
    model = tiny_model(model_type)
    editor = make(model)
    ids = ids_of(EDITS[0].prompt, "abcdefghij")
    bare = model(input_ids=ids).logits
    with mount_layer(model, editor.site, editor.layer()):
        mounted = model(input_ids=ids).logits
    assert torch.equal(bare, mounted)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_ftl_edit_changes_every_prompt_and_never_the_base_weights(tiny_model, model_type):
    model = tiny_model(model_type)
    editor = ftl_editor(model)
    weight = editor.site.module(model).weight.clone()
    prompt = EDITS[2].prompt  # "water is" -> "dry"
    ids = ids_of(prompt, UNRELATED.ljust(len(prompt), "q"))
    bare = model(input_ids=ids).logits
    before = scored(model, EDITS[2:]).accuracy()[0]
    stats = editor.apply(EDITS[2:])
    layer = editor.layer()
    with mount_layer(model, editor.site, layer) as handle:
        mounted = model(input_ids=ids).logits
        after = scored(model, EDITS[2:], handle).accuracy()[0]
    assert stats[0].steps >= 1 and after > before
    assert not torch.equal(mounted[1], bare[1])  # no router: the unrelated row moves too
    assert torch.equal(model(input_ids=ids).logits, bare)  # unmounted: the bare model again
    assert editor.site.module(model) is layer.base_layer
    assert torch.equal(layer.base_layer.weight, weight)


def test_ftl_edits_are_sequential_and_clamped_per_edit(tiny_model):
    model = tiny_model("llama")
    editor = ftl_editor(model, clamp=1e-3, lr=1e-2)
    w0 = editor.weight.clone()
    editor.apply(EDITS[:1])
    w1 = editor.weight.clone()
    editor.apply(EDITS[1:2])
    w2 = editor.weight.clone()
    assert (w1 - w0).abs().max() <= 1e-3 + 1e-7 and (w2 - w1).abs().max() <= 1e-3 + 1e-7
    assert (w2 - w0).abs().max() > 1e-3  # the second edit starts where the first one left W_ft
    assert len(editor.all_edits()) == 2


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_grace_answers_its_prompt_and_leaves_other_rows_exact(tiny_model, model_type):
    model = tiny_model(model_type)
    editor = grace_editor(model)
    weight = editor.site.module(model).weight.clone()
    before = scored(model, GRACE_EDITS)
    editor.apply(GRACE_EDITS)
    layer = editor.layer()
    assert len(layer.codebook) == 2

    # One batch: an edited prompt and an unrelated one of the same length; each row its own route.
    prompt = GRACE_EDITS[1].prompt
    ids = ids_of(prompt, UNRELATED.ljust(len(prompt), "q"))
    bare = model(input_ids=ids).logits
    with mount_layer(model, editor.site, layer) as handle:
        mounted = model(input_ids=ids).logits
        match = layer.last_match.tolist()
        after = scored(model, GRACE_EDITS, handle)  # right-padded rows of two lengths
    assert match == [1, -1]
    assert torch.equal(mounted[1], bare[1])  # unrelated row: exactly the bare model
    assert torch.equal(mounted[0, :-1], bare[0, :-1])  # before the key token: the bare model
    assert not torch.equal(mounted[0, -1], bare[0, -1])
    assert before.accuracy() == [0.0, 0.0] and min(after.accuracy()) > 0  # see GRACE_EDITS
    assert torch.equal(editor.site.module(model).weight, weight)


def test_grace_route_is_held_while_generating(tiny_model):
    model = tiny_model("llama")
    editor = grace_editor(model)
    editor.apply(GRACE_EDITS[1:])
    layer = editor.layer()
    prompt = GRACE_EDITS[1].prompt
    ids = ids_of(prompt, UNRELATED.ljust(len(prompt), "q"))
    generate = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    bare = model.generate(input_ids=ids, **generate)
    lookups = []
    lookup = layer.codebook.lookup
    layer.codebook.lookup = lambda keys: lookups.append(len(keys)) or lookup(keys)
    with mount_layer(model, editor.site, layer):
        edited = model.generate(input_ids=ids, **generate)
    assert lookups == [2]  # routed once, at prefill; the 5 cached steps reuse the decision
    assert layer.routing.held.tolist() == [0, -1]
    assert torch.equal(edited[1], bare[1]) and not torch.equal(edited[0], bare[0])


def test_codebook_adds_expands_and_splits():
    book = Codebook.empty(2, 3, init_radius=1.0)
    value = torch.ones(3)
    assert book.insert(torch.tensor([0.0, 0.0]), "a", value).kind == "add"
    assert book.insert(torch.tensor([5.0, 0.0]), "b", 2 * value).kind == "add"  # d = 5 >= 1 + 1: no overlap
    with pytest.raises(ValueError, match="needs its value"):
        book.insert(torch.tensor([9.0, 9.0]), "z")
    # Same target, overlapping balls (d = 1.5 < 1 + 1): entry 0 grows to cover the new key's ball.
    placed = book.insert(torch.tensor([0.0, 1.5]), "a")
    assert (placed.kind, placed.nearest) == ("expand", 0) and len(book) == 2
    assert book.radii[0].item() == pytest.approx(2.5)
    # Another target, overlapping (d = 1.2): both radii shrink to d / 2, the balls no longer overlap.
    placed = book.insert(torch.tensor([5.0, 1.2]), "c", 3 * value)
    assert (placed.kind, placed.nearest) == ("split", 1) and len(book) == 3
    assert book.radii.tolist() == pytest.approx([2.5, 0.6, 0.6])
    assert book.targets == ["a", "b", "c"]
    queries = torch.tensor([[0.0, 2.4], [0.0, 2.6], [5.0, 0.5], [5.0, 0.7], [5.0, 2.0], [10.0, 10.0]])
    assert book.lookup(queries).tolist() == [0, -1, 1, 2, -1, -1]
    assert torch.equal(book.values[2], 3 * value)
    # A split never grows a radius: an entry already smaller than d / 2 keeps its own.
    book.insert(torch.tensor([0.0, -3.0]), "d", value)  # d = 3 < 2.5 + 1: split with entry 0
    assert book.radii[0].item() == pytest.approx(1.5) and book.radii[3].item() == pytest.approx(1.0)
    assert Codebook.empty(2, 3, 1.0).lookup(queries).tolist() == [-1] * 6


@pytest.fixture(scope="module")
def real_model():
    from memstore.model import load_model

    return load_model(None)


def test_baseline_edits_take_on_the_real_model(real_model):
    """The embedded model: a GRACE edit and an FT-L edit each make the prompt answer the target;
    GRACE leaves an unrelated prompt's answer as it was, bit for bit."""
    model, tok = real_model
    edit = Edit(prompt="The capital of France is", target_new="Rome")
    prompts, targets = [edit.prompt, "The largest planet in the solar system is"], ["Rome", "Jupiter"]
    bare = teacher_forced(model, tok, prompts, targets)
    assert bare.accuracy()[0] < 1.0

    config = GraceConfig()
    site = find_edit_site(model, None, layer_fraction=config.layer_fraction)
    editor = GraceEditor(model, tok, site, config)
    editor.apply([edit])
    with mount_layer(model, site, editor.layer()) as handle:
        after = teacher_forced(model, tok, prompts, targets, handle)
        enc = tok(edit.prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
    assert after.accuracy()[0] == 1.0 and after.predicted[1] == bare.predicted[1]
    assert "Rome" in tok.decode(out[0, enc.input_ids.shape[1]:])

    config = FtlConfig(use_prefixes=False)  # one context: the test stays a few seconds long
    site = find_edit_site(model, None, layer_fraction=config.layer_fraction)
    editor = FtlEditor(model, tok, site, config)
    editor.apply([edit])
    with mount_layer(model, site, editor.layer()) as handle:
        assert teacher_forced(model, tok, prompts[:1], targets[:1], handle).accuracy()[0] == 1.0
    assert teacher_forced(model, tok, prompts, targets).predicted == bare.predicted  # unmounted: the bare model

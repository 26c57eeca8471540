"""WISE-Retrieve on tiny random models: no memory is the bare model, each row of a batch gets its
own memory (or none, then exactly the bare output), the prefill decision is held while generating,
and the margin's replay negatives come from other memories' edits."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from test_methods import EDITS, IRRELEVANT, CharTokenizer

from memstore.methods.wise import (
    WiseConfig,
    WiseEditor,
    WiseRetrieveEditor,
    WiseRetrieveLayer,
)
from memstore.methods.wise.method import TrainBatch, router_threshold, routing_inputs
from memstore.model import find_edit_site
from memstore.mount import mount_layer
from memstore.prompting import pad_batch

TOK = CharTokenizer()
# Large steps and small margins: a random tiny model has tiny activations (as in test_methods.py).
# prefilter_candidates 0: these tests are about the exhaustive route (the key pre-filter: the last test).
CONFIG = WiseConfig(background_rank=4, mask_ratio=0.5, edits_per_shard=1, max_steps=80, lr=0.3, alpha=0.5,
                    beta=6.0, gamma=3.0, replay=2, act_ratio=0.5, max_update=1e4, prefilter_candidates=0)


def make_editor(model, config: WiseConfig = CONFIG) -> WiseRetrieveEditor:
    return WiseRetrieveEditor(model, TOK, find_edit_site(model, 2), config, IRRELEVANT, prefixes=["a b", "c d e"])


def batch_of(prompts: list[str]):
    seqs = [TOK(p).input_ids for p in prompts]
    return pad_batch(seqs, [len(s) for s in seqs], TOK.pad_token_id)


def logits(model, batch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


@pytest.fixture(scope="module")
def two_memories(tiny_model):
    """llama and OPT (flattened MLP input) editors holding EDITS[0] in memory 0, EDITS[1] in memory 1."""
    out = {}
    for model_type in ("llama", "opt"):
        editor = make_editor(tiny_model(model_type))
        editor.apply(EDITS[:2])
        out[model_type] = (editor, editor.layer())
    return out


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_zero_memories_is_the_bare_model(tiny_model, model_type):
    model = tiny_model(model_type)
    editor = make_editor(model)
    layer = editor.layer()
    assert layer.n_memories == 0 and layer.threshold == math.inf
    batch = batch_of([EDITS[0].prompt, IRRELEVANT[1]])
    bare = logits(model, batch)
    with mount_layer(model, editor.site, layer):
        mounted = logits(model, batch)
    assert torch.equal(mounted, bare)


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_each_row_gets_its_own_memory(tiny_model, two_memories, model_type):
    model = tiny_model(model_type)
    editor, layer = two_memories[model_type]
    assert layer.n_memories == 2 and editor.edit_owners() == [0, 1]
    assert layer.threshold == float(layer.thresholds.min())
    batch = batch_of([EDITS[1].prompt, IRRELEVANT[1], EDITS[0].prompt])
    bare = logits(model, batch)
    with mount_layer(model, editor.site, layer):
        mounted = logits(model, batch)
    assert layer.last_choice.tolist() == [1, -1, 0]
    assert torch.equal(mounted[1], bare[1])  # routed nowhere: the bare model bit for bit
    assert not torch.allclose(mounted[0], bare[0]) and not torch.allclose(mounted[2], bare[2])
    # Each routed row got its own memory's output: swapping the memories changes the rows.
    swapped = WiseRetrieveLayer(layer.base_layer, layer.deltas.flip(0), layer.thresholds.flip(0), layer.reduce,
                                layer.basis)
    with mount_layer(model, editor.site, swapped):
        other = logits(model, batch)
    assert swapped.last_choice.tolist() == [0, -1, 1]
    torch.testing.assert_close(other, mounted, rtol=1e-5, atol=1e-5)
    # Scores are compared relative to each memory's own threshold: a memory on a 10x larger
    # scale (scores and threshold alike) wins no rows it did not win before.
    scale = torch.tensor([10.0, 1.0])  # row 0 clears both thresholds, memory 1's by more
    louder = WiseRetrieveLayer(layer.base_layer, layer.deltas * scale[:, None, None], layer.thresholds * scale,
                               layer.reduce, layer.basis)
    with mount_layer(model, editor.site, louder):
        logits(model, batch)
    assert louder.last_choice.tolist() == [1, -1, 0]


def test_decision_is_held_while_generating(tiny_model, two_memories):
    model = tiny_model("llama")
    editor, layer = two_memories["llama"]
    candidates = torch.tensor([[t] for t in sorted(set(TOK("the sky is my cat water 12345 zq").input_ids))])
    for prompt, held in ((EDITS[0].prompt, 0), (IRRELEVANT[0], -1)):
        ids = torch.tensor([TOK(prompt).input_ids])
        past = model(input_ids=ids, use_cache=True).past_key_values
        bare_steps = [step(model, token, past) for token in candidates]
        seen: dict[str, torch.Tensor] = {}
        with mount_layer(model, editor.site, layer):
            mounted_past = model(input_ids=ids, use_cache=True).past_key_values
            assert layer.last_choice.tolist() == [held]
            differs = 0
            hook = layer.register_forward_hook(lambda _m, args, _out: seen.update(x=args[0]))
            for token, bare in zip(candidates, bare_steps):  # one generated token each, on the prompt's cache
                out = step(model, token, mounted_past)
                assert layer.last_choice.tolist() == [held]
                # A held step scores nothing; the token's own scores say where it would have gone alone.
                ratio = layer.row_scores(seen["x"])[0] / layer.thresholds
                differs += (int(ratio.argmax()) if bool((ratio > 1).any()) else -1) != held
                if held == -1:  # a row routed nowhere generates exactly as the bare model
                    assert torch.equal(out, bare)
            hook.remove()
        assert differs > 0, "no candidate token would route differently on its own: the test proves nothing"
    # And through model.generate on a mixed batch (left padded), every step keeps the prefill routes.
    seqs = [TOK(EDITS[0].prompt).input_ids, TOK(IRRELEVANT[0]).input_ids]
    width = max(map(len, seqs))
    input_ids = torch.tensor([[TOK.pad_token_id] * (width - len(s)) + s for s in seqs])
    mask = (torch.arange(width)[None] >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": TOK.pad_token_id}
    bare = model.generate(input_ids, **kwargs)
    choices = []
    with mount_layer(model, editor.site, layer):
        hook = layer.register_forward_hook(lambda *_: choices.append(layer.last_choice.tolist()))
        try:
            edited = model.generate(input_ids, **kwargs)
        finally:
            hook.remove()
    assert len(choices) == 5 and all(c == [0, -1] for c in choices)
    assert torch.equal(edited[1], bare[1])


def step(model, token: torch.Tensor, past) -> torch.Tensor:
    """Logits of one cached generation step (on a copy of the cache, which the step extends)."""
    return model(input_ids=token[None], past_key_values=copy.deepcopy(past), use_cache=True).logits


def test_replay_negatives_come_from_other_memories(tiny_model):
    model = tiny_model("llama")
    config = CONFIG.replace(shards_per_memory=2, max_steps=3)  # memories: [edit 0, edit 1], [edit 2]
    runs = []
    for _ in range(2):
        editor = make_editor(model, config)
        built: list[TrainBatch] = []
        own_batch = editor._edit_batch

        def spy(edit, replay, own_batch=own_batch, built=built):
            built.append(own_batch(edit, replay))
            return built[-1]

        editor._edit_batch = spy
        editor.apply(EDITS)
        runs.append(built)
    assert editor.edit_owners() == [0, 0, 1]
    first, second, third = runs[0]

    def negatives(tb: TrainBatch) -> list[list[int]]:
        b = tb.batch
        return [b.input_ids[r, :b.lengths[r]].tolist() for r in range(tb.n_ctx + tb.n_replay, len(b.lengths))]

    irrelevant = [TOK(p).input_ids for p in IRRELEVANT]
    # Edits 0 and 1 share memory 0: no other memory yet, so only the irrelevant prompt.
    assert len(negatives(first)) == 1 and len(negatives(second)) == 1
    assert negatives(second)[0] in irrelevant  # edit 0, in the same memory, is not a negative
    # Edit 2 opens memory 1: half of its negatives are memory 0's edits.
    neg = negatives(third)
    assert len(neg) == 2 and neg[0] in irrelevant
    assert neg[1] in [TOK(e.prompt).input_ids for e in EDITS[:2]]
    assert third.span_mask[-1].sum() == len(neg[1])  # its whole prompt is scored
    # Deterministic: the seeded RNG draws the same negatives again.
    assert [negatives(tb) for tb in runs[1]] == [negatives(tb) for tb in runs[0]]
    # The replayed negative enters the margin: a high score there costs loss; with one
    # negative the objective is WISE's own.
    n = third.n_ctx + third.n_replay
    ce = torch.ones(n)
    quiet = torch.cat([torch.full((third.n_ctx,), 10.0), torch.zeros(third.n_replay), torch.tensor([0.0, 0.0])])
    loud = quiet.clone()
    loud[-1] = 9.0
    assert float(editor._objective(third, ce, loud)[2]) > float(editor._objective(third, ce, quiet)[2])
    n1 = first.n_ctx + first.n_replay
    scores = torch.rand(n1 + 1, generator=torch.Generator().manual_seed(0)) * 10
    for ours, wise in zip(editor._objective(first, torch.ones(n1), scores),
                          WiseEditor._objective(editor, first, torch.ones(n1), scores)):
        torch.testing.assert_close(ours, wise)



@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_eval_layer_serves_the_key_prefilter_by_default(two_memories, model_type):
    """`wisemem eval --method wise-retrieve`: the editor's layer carries a key index of its edits
    (ids memory << 32 | position), and with C=1 (the default) the prompt of a stored edit may use
    only its own memory; with C=0 there is no index and every memory is scored."""
    editor, exhaustive = two_memories[model_type]
    assert exhaustive.index is None and exhaustive.candidates == 0
    assert WiseConfig().prefilter_candidates == 1
    editor.config = dataclasses.replace(CONFIG, prefilter_candidates=WiseConfig().prefilter_candidates)
    try:
        layer = editor.layer()
    finally:
        editor.config = CONFIG
    assert layer.candidates == 1 and [int(i) for i in layer.index.ids] == [0, 1 << 32]
    for memory, edit in enumerate(EDITS[:2]):
        (a,) = routing_inputs(editor.model, TOK, editor.site, [edit.prompt], editor.basis)
        assert layer.candidate_mask(a[None])[0].tolist() == [m == memory for m in range(2)]


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_layer_reads_the_edit_prompts_once(tiny_model, model_type):
    """Serving layer set-up: every memory's threshold is act_ratio x the lowest score of its own
    edits under it (as `router_threshold` computes it alone), and the thresholds and the key index
    come from one pass of the lower model over the edit prompts, not one pass each."""
    model = tiny_model(model_type)
    config = dataclasses.replace(CONFIG, prefilter_candidates=1)
    editor = make_editor(model, config)
    editor.apply(EDITS[:3])
    calls = []
    hook = editor.site.module(model).register_forward_pre_hook(lambda _m, args: calls.append(1))
    try:
        layer = editor.layer()
    finally:
        hook.remove()
    assert len(calls) == 1 and layer.index is not None  # three prompts: one batch
    for memory, (delta, edit) in enumerate(zip(editor.memory_deltas(), EDITS[:3])):
        alone = router_threshold(model, TOK, editor.site, delta, [edit.prompt], config.act_ratio,
                                 config.router_reduce, editor.basis)
        assert float(layer.thresholds[memory]) == pytest.approx(alone, rel=1e-6)

"""MEMOIR on every architecture (tiny random models) and on the real model: a memory with no edits
is the bare model bit for bit, edits are learnt in their masks' columns only, each row of a batch
routes on its own prompt and keeps that route while generating, unrelated prompts get exactly the
bare output; the FAISS mask index agrees with the exhaustive scan."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_MODEL_TYPES
from test_methods import EDITS, IRRELEVANT, CharTokenizer

from memstore.edits import Edit
from memstore.evaluate.metrics import teacher_forced
from memstore.index import MaskIndex
from memstore.methods.memoir import MemoirConfig, MemoirEditor
from memstore.model import find_edit_site
from memstore.mount import mount_layer

UNRELATED = "qqq www"


def make_editor(model, **overrides) -> MemoirEditor:
    # Random tiny models: threshold 1.0 routes a prompt only to an edit with its exact mask.
    config = MemoirConfig(**{"threshold": 1.0, "top_k_ratio": 0.25, "max_steps": 60, "lr": 300.0, "grad_clip": 1e6,
                             "stop_loss": 0.01, **overrides})
    return MemoirEditor(model, CharTokenizer(), find_edit_site(model, 2), config, IRRELEVANT, prefixes=["a b", "c d e"])


def ids_of(*texts: str) -> torch.Tensor:
    rows = [CharTokenizer()(t).input_ids for t in texts]
    assert len({len(r) for r in rows}) == 1, "test prompts of one batch must have equal lengths"
    return torch.tensor(rows)


def accuracy(model, site, layer=None) -> float:
    tok, prompts, targets = CharTokenizer(), [e.prompt for e in EDITS], [e.target_new for e in EDITS]
    if layer is None:
        acc = teacher_forced(model, tok, prompts, targets).accuracy()
    else:
        with mount_layer(model, site, layer) as handle:
            acc = teacher_forced(model, tok, prompts, targets, handle).accuracy()
    return sum(acc) / len(acc)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_memoir_learns_edits_in_their_columns_and_routes_per_row(tiny_model, model_type):
    model = tiny_model(model_type)
    editor = make_editor(model)
    before = accuracy(model, editor.site)
    stats = editor.apply(EDITS)
    assert len(stats) == 3 and len(editor.state.masks) == 3
    assert int(editor.state.masks[0].sum()) == editor.k
    touched = editor.state.memory.abs().sum(0) > 0  # (d_in,) columns W_m uses
    assert torch.equal(touched & ~editor.state.masks.any(0), torch.zeros_like(touched))  # only masked columns
    layer = editor.layer()
    assert accuracy(model, editor.site, layer) >= before + 0.2

    # One batch: an edit prompt and an unrelated one of the same length; each row its own route.
    prompt = EDITS[2].prompt  # "water is"
    other = UNRELATED.ljust(len(prompt), "q")
    ids = ids_of(prompt, other)
    bare = model(input_ids=ids).logits
    with mount_layer(model, editor.site, layer):
        mounted = model(input_ids=ids).logits
    assert layer.last_match.tolist() == [2, -1]
    assert torch.equal(mounted[1], bare[1])  # unrelated row: exactly the bare model
    assert not torch.equal(mounted[0], bare[0])
    assert editor.site.module(model) is layer.base_layer


def test_memoir_route_is_held_while_generating(tiny_model):
    model = tiny_model("llama")
    editor = make_editor(model)
    editor.apply(EDITS[:1])
    layer = editor.layer()
    prompt = EDITS[0].prompt
    ids = ids_of(prompt, UNRELATED.ljust(len(prompt), "q"))
    searches = []
    search = layer.index.search
    layer.index.search = lambda q: searches.append(len(q)) or search(q)
    with mount_layer(model, editor.site, layer):
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                       pad_token_id=0)
    assert searches == [2]  # routed once, at prefill; the 5 cached steps reuse the decision
    assert layer.routing.held.tolist() == [0, -1]


def test_mask_index_matches_exhaustive_scan():
    gen = torch.Generator().manual_seed(0)
    d, k, n = 256, 64, 500
    def random_masks(m: int) -> torch.Tensor:
        idx = torch.rand(m, d, generator=gen).topk(k, dim=1).indices
        return torch.zeros(m, d, dtype=torch.bool).scatter_(1, idx, True)
    stored, queries = random_masks(n), random_masks(50)
    queries[:10] = stored[100:110]  # exact hits must come back with overlap k and their own id
    for kind in ("flat", "hnsw"):
        index = MaskIndex(d, kind)
        index.add(stored)
        common, ids = index.search(queries)
        exact_common, exact_ids = index.exhaustive(queries)
        assert ids[:10].tolist() == list(range(100, 110)) and common[:10].tolist() == [k] * 10
        if kind == "flat":
            assert torch.equal(common, exact_common) and torch.equal(ids, exact_ids)
        else:
            assert float((common == exact_common).float().mean()) >= 0.9
        assert torch.equal(index.masks(ids[:10]), stored[100:110])
    empty = MaskIndex(d)
    assert empty.search(queries[:2])[1].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="multiple of 8"):
        MaskIndex(100)


@pytest.fixture(scope="module")
def real_model():
    from memstore.model import load_model

    return load_model(None)


def test_memoir_edit_changes_the_real_model_answer(real_model):
    """The embedded model: an edit takes, an unrelated prompt keeps its answer bit for bit."""
    from memstore.methods.memoir import default_config
    from memstore.porcelain import background_prompts

    model, tok = real_model
    config = default_config("llama")
    site = find_edit_site(model, None, layer_fraction=config.layer_fraction)
    editor = MemoirEditor(model, tok, site, config, background_prompts())
    edit = Edit(prompt="The capital of France is", target_new="Rome")
    unrelated = ["The largest planet in the solar system is"]
    bare = teacher_forced(model, tok, [edit.prompt] + unrelated, ["Rome", "Jupiter"])
    editor.apply([edit])
    layer = editor.layer()
    with mount_layer(model, site, layer) as handle:
        after = teacher_forced(model, tok, [edit.prompt] + unrelated, ["Rome", "Jupiter"], handle)
        enc = tok(edit.prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
    assert bare.accuracy()[0] < 1.0 and after.accuracy()[0] == 1.0
    assert after.predicted[1] == bare.predicted[1]
    assert "Rome" in tok.decode(out[0, enc.input_ids.shape[1]:])


def test_protected_rows_see_the_served_memory(tiny_model):
    """While an edit trains, a protected earlier edit's row computes what serving computes for it:
    its own mask over W_m (the trained slice included), so keeping its loss low keeps it served right."""
    model = tiny_model("llama")
    editor = make_editor(model, protect=2)
    editor.apply(EDITS[:2])
    serving = editor.layer()
    ids = ids_of(EDITS[0].prompt)
    with mount_layer(model, editor.site, serving):
        served = model(input_ids=ids).logits
    assert serving.last_match.tolist() == [0]
    new_mask = editor.edit_masks([EDITS[2].prompt])[0]
    cols = new_mask.nonzero().squeeze(1)
    training = editor.layer(with_memory=False)
    training.start_training(cols, editor.state.memory[:, cols])
    fixed = editor.state.memory.clone()
    fixed[:, cols] = 0
    training.read_per_row(editor.state.masks[:1], fixed)
    with mount_layer(model, editor.site, training):
        trained_view = model(input_ids=ids).logits
    training.stop_training()
    torch.testing.assert_close(trained_view, served, rtol=1e-5, atol=1e-5)
    assert editor._most_overlapping(new_mask[None]) and len(editor._most_overlapping(new_mask[None])) <= 2
    stats = editor.apply(EDITS[2:])
    assert accuracy(model, editor.site, editor.layer()) >= 0.5 and stats[0].steps >= 1


def test_edits_trained_together_keep_their_own_masks(tiny_model):
    """edit_batch_size > 1 trains a group of edits in one optimisation, each row through its own
    edit's mask (the per-row path test_protected_rows_see_the_served_memory checks): the masks are
    stored in edit order, only their columns change, and the edits are learnt."""
    model = tiny_model("llama")
    before = accuracy(model, find_edit_site(model, 2))
    one_by_one = make_editor(model)
    one_by_one.apply(EDITS)
    together = make_editor(model, edit_batch_size=3)
    stats = together.apply(EDITS)
    assert len(stats) == 3 and len({s.steps for s in stats}) == 1  # one optimisation for the group
    assert [e.prompt for e in together.edits] == [e.prompt for e in EDITS]
    assert torch.equal(together.state.masks, one_by_one.state.masks)
    touched = together.state.memory.abs().sum(0) > 0
    assert torch.equal(touched & ~together.state.masks.any(0), torch.zeros_like(touched))
    assert accuracy(model, together.site, together.layer()) >= before + 0.2


def test_edit_batch_size_must_be_positive():
    from memstore.errors import ConfigError

    with pytest.raises(ConfigError, match="edit_batch_size"):
        MemoirConfig(edit_batch_size=0)


def test_preconditioned_steps_avoid_earlier_edits_keys(tiny_model):
    """precondition > 0 multiplies each step by lambda (C + lambda I)^-1, C the earlier edits' keys:
    a new edit's update barely moves what the memory returns on those keys, and it is still learnt;
    an editor continuing a stored memory rebuilds the same C from its edits' prompts."""
    model = tiny_model("llama")
    before = accuracy(model, find_edit_site(model, 2))
    moved = {}
    for precondition in (0.0, 1e-4):
        editor = make_editor(model, precondition=precondition, protect=0)
        editor.apply(EDITS[:2])
        earlier = editor.state.memory.clone()
        keys = editor._masks_and_keys([e.prompt for e in EDITS[:2]])[1]  # (2, d_in)
        editor.apply(EDITS[2:])
        moved[precondition] = float(((editor.state.memory - earlier) @ keys.t()).norm())
        assert accuracy(model, editor.site, editor.layer()) >= before + 0.2
    assert moved[0.0] > 0 and moved[1e-4] < 0.05 * moved[0.0]

    continued = MemoirEditor(model, CharTokenizer(), editor.site, editor.config, (), prefixes=editor.prefixes,
                             state=editor.state)
    continued.edits = list(editor.edits)
    continued._preconditioner(editor.state.masks[0].nonzero().squeeze(1))
    assert continued.key_cov_edits == editor.key_cov_edits == len(EDITS)
    torch.testing.assert_close(continued.key_cov, editor.key_cov)


def test_precondition_must_not_be_negative():
    from memstore.errors import ConfigError

    with pytest.raises(ConfigError, match="precondition"):
        MemoirConfig(precondition=-1.0)

"""Edit site, mounting, routing, generation and upper-stack replay across supported architectures.

Every model is a tiny random transformers model built offline (tests/conftest.py, "Tiny
randomly initialised models"); no tokenizer is needed: inputs are random token ids.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import TINY_HIDDEN, TINY_INTERMEDIATE, TINY_LAYERS, TINY_MODEL_TYPES, TINY_PAD_ID, TINY_VOCAB
from memstore.errors import ConfigError, UnsupportedArchitecture
from memstore.methods.attach import attached
from memstore.methods.upper import UpperStack
from memstore.methods.wise.layer import WiseLayer
from memstore.model import ARCH_EDIT_LAYER, find_edit_site, weight_matrix
from memstore.mount import mount_layer

LAYER = 2  # edited layer: mid-depth of 4, with layers above it to replay
LENGTHS = (7, 5, 3)  # real tokens per row of the padded test batch

archs = pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)

# OPT flattens (B, T, d) to (B*T, d) around its MLP: the layer must restore the token grid.
routing_archs = pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def padded_batch(lengths=LENGTHS, side: str = "right", seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (never the pad id) padded to the longest row, and the attention mask."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), TINY_PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(lengths), T), dtype=torch.long)
    for r, n in enumerate(lengths):
        row = torch.randint(3, TINY_VOCAB, (n,), generator=gen)
        if side == "right":
            ids[r, :n], mask[r, :n] = row, 1
        else:
            ids[r, T - n:], mask[r, T - n:] = row, 1
    return ids, mask


def random_delta(site, model, seed: int = 2, scale: float = 0.5) -> torch.Tensor:
    shape = weight_matrix(site.module(model)).shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen) * scale


@torch.no_grad()
def logits(model, ids, mask) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@torch.no_grad()
def edited_module_input(model, site, ids, mask) -> torch.Tensor:
    """Input activations a (B, T, d_ff) of the edited projection on a plain forward."""
    grabbed = []
    h = model.get_submodule(site.module_path).register_forward_pre_hook(lambda m, a: grabbed.append(a[0].detach()))
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        h.remove()
    acts = grabbed[0]
    # OPT flattens (B, T, d) to (B*T, d) around its MLP; restore the token grid.
    return acts.view(ids.shape[0], ids.shape[1], -1) if acts.dim() == 2 else acts


def row_scores(acts: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WISE activation score per row: mean over masked tokens of ||delta a||_2."""
    per_token = (acts @ delta.t()).norm(dim=-1)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum(-1) / m.sum(-1)


def split_threshold(scores: torch.Tensor) -> float:
    """A threshold in the widest gap between distinct row scores: some rows above, some below."""
    s = sorted(scores.tolist())
    gaps = [(s[i + 1] - s[i], i) for i in range(len(s) - 1)]
    gap, i = max(gaps)
    assert gap > 1e-3 * max(abs(s[-1]), 1.0), f"row scores too close to split: {s}"
    return (s[i] + s[i + 1]) / 2


# ----------------------------------------------------------------------------------------------
# 1. edit site
# ----------------------------------------------------------------------------------------------

@archs
def test_edit_site_is_down_projection(tiny_model, model_type):
    model = tiny_model(model_type)
    site = find_edit_site(model, LAYER)
    module = site.module(model)
    assert site.model_type == model_type and site.layer == LAYER and site.n_layers == TINY_LAYERS
    assert site.module_path == f"{ARCH_EDIT_LAYER[model_type][0]}.{LAYER}.{ARCH_EDIT_LAYER[model_type][1]}"
    if model_type == "gpt2":
        assert type(module).__name__ == "Conv1D" and site.transposed
        assert module.weight.shape == (TINY_INTERMEDIATE, TINY_HIDDEN)  # Conv1D stores W^T
    else:
        assert isinstance(module, nn.Linear) and not site.transposed
    assert weight_matrix(module).shape == (TINY_HIDDEN, TINY_INTERMEDIATE)
    # W maps the module's input a to its output: y == W a (+ bias).
    a = torch.randn(2, 3, TINY_INTERMEDIATE)
    bias = module.bias if module.bias is not None else 0
    torch.testing.assert_close(module(a), a @ weight_matrix(module).t() + bias)
    # The final norm exists and is a distinct submodule (not the model root).
    assert site.final_norm(model) is not model and site.final_norm_path
    # Default layer: mid-to-late depth, in range.
    assert 0 <= find_edit_site(model).layer < TINY_LAYERS


# ----------------------------------------------------------------------------------------------
# 2. zero edits: mounting is exactly transparent, unmount restores the exact module
# ----------------------------------------------------------------------------------------------

@archs
def test_mount_without_edits_is_identity(tiny_model, model_type):
    model = tiny_model(model_type)
    site = find_edit_site(model, LAYER)
    ids, mask = padded_batch()
    bare = logits(model, ids, mask)
    original = site.module(model)

    handle = mount_layer(model, site, WiseLayer(original))
    try:
        assert isinstance(site.module(model), WiseLayer)
        assert site.module(model).base_layer is original
        assert torch.equal(logits(model, ids, mask), bare)
    finally:
        handle.unmount()
    assert site.module(model) is original
    assert torch.equal(logits(model, ids, mask), bare)
    # No hook left behind: a second mount/unmount cycle works the same.
    with mount_layer(model, site, WiseLayer(original)):
        assert torch.equal(logits(model, ids, mask), bare)
    assert site.module(model) is original


# ----------------------------------------------------------------------------------------------
# 3. routing per row: rows below the threshold are bit-identical to the bare model
# ----------------------------------------------------------------------------------------------

@routing_archs
def test_routing_mixes_rows_by_score(tiny_model, model_type):
    model = tiny_model(model_type)
    site = find_edit_site(model, LAYER)
    ids, mask = padded_batch(seed=3)
    bare = logits(model, ids, mask)
    delta = random_delta(site, model)
    scores = row_scores(edited_module_input(model, site, ids, mask), delta, mask)
    threshold = split_threshold(scores)
    expect = scores > threshold
    assert expect.any() and not expect.all()

    layer = WiseLayer(site.module(model), delta=delta, threshold=threshold)
    with mount_layer(model, site, layer):
        out = logits(model, ids, mask)
    assert torch.equal(layer.last_route, expect)
    for r in range(ids.shape[0]):
        n = LENGTHS[r]
        if expect[r]:
            assert not torch.allclose(out[r, :n], bare[r, :n]), f"row {r} routed but logits unchanged"
        else:
            assert torch.equal(out[r], bare[r]), f"row {r} not routed but logits changed"
    assert site.module(model) is layer.base_layer


@routing_archs
def test_route_on_mask_decides_rows(tiny_model, model_type):
    model = tiny_model(model_type)
    site = find_edit_site(model, LAYER)
    ids, mask = padded_batch(seed=4)
    bare = logits(model, ids, mask)
    layer = WiseLayer(site.module(model), delta=random_delta(site, model), threshold=0.0)
    route_mask = mask.bool().clone()
    route_mask[1] = False  # row 1: no deciding positions -> score 0 -> not routed (0 > 0 is false)
    handle = mount_layer(model, site, layer)
    try:
        with handle.route_on(route_mask):
            out = logits(model, ids, mask)
        assert layer.routing.override is None  # route_on restores
        assert layer.last_route.tolist() == [True, False, True]
        assert torch.equal(out[1], bare[1])
        for r in (0, 2):
            assert not torch.allclose(out[r, :LENGTHS[r]], bare[r, :LENGTHS[r]])
        # Without the override every row routes; threshold = inf routes none.
        all_rows = logits(model, ids, mask)
        assert layer.last_route.all()
        assert torch.equal(all_rows[0], out[0]) and torch.equal(all_rows[2], out[2])
        layer.set_memory(layer.delta, math.inf)
        assert torch.equal(logits(model, ids, mask), bare)
        assert not layer.last_route.any()
    finally:
        handle.unmount()


# ----------------------------------------------------------------------------------------------
# 4. routing decided on the prompt and held during cached generation
# ----------------------------------------------------------------------------------------------

def _generate(model, ids, mask):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                          pad_token_id=TINY_PAD_ID, output_scores=True, return_dict_in_generate=True)


@routing_archs
def test_generation_holds_prefill_route(tiny_model, model_type):
    model = tiny_model(model_type)
    site = find_edit_site(model, LAYER)
    ids, mask = padded_batch(side="left", seed=5)
    base = site.module(model)
    delta = random_delta(site, model)
    with torch.no_grad():
        bare = _generate(model, ids, mask)

    layer = WiseLayer(base, delta=delta, threshold=math.inf)
    calls: list[dict] = []
    prefill_x: list[torch.Tensor] = []

    def grid(x: torch.Tensor) -> torch.Tensor:  # OPT hands its MLP (B*T, d)
        return x.view(ids.shape[0], -1, x.shape[-1]) if x.dim() == 2 else x

    def pre(mod, args):
        if not prefill_x:
            prefill_x.append(grid(args[0]).detach())

    def post(mod, args, out):
        r = mod.routing
        calls.append(dict(prefill=r.prefill, T=grid(args[0]).shape[1],
                          held=None if r.held is None else r.held.clone(), route=mod.last_route.clone()))

    hooks = [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    handle = mount_layer(model, site, layer)
    try:
        with torch.no_grad():
            # threshold = inf: nothing routes, generation is bit-identical to the bare model.
            none = _generate(model, ids, mask)
            assert torch.equal(none.sequences, bare.sequences)
            assert all(torch.equal(a, b) for a, b in zip(none.scores, bare.scores))
            assert not any(c["route"].any() for c in calls)

            # Threshold between the rows' prompt scores (computed from the prefill input).
            scores = row_scores(prefill_x[0], delta, mask)
            threshold = split_threshold(scores)
            expect = scores > threshold
            assert expect.any() and not expect.all()

            layer.set_memory(delta, -1.0)  # every row routes
            forced = _generate(model, ids, mask)

            layer.set_memory(delta, threshold)
            calls.clear()
            mixed = _generate(model, ids, mask)
    finally:
        handle.unmount()
        for h in hooks:
            h.remove()
    assert site.module(model) is base

    # One prefill over the whole prompt, then one cached step per new token, all holding its route.
    assert calls[0]["prefill"] and calls[0]["T"] == ids.shape[1]
    assert calls[0]["held"] is not None and torch.equal(calls[0]["held"], expect)
    assert torch.equal(calls[0]["route"], expect)
    decode = calls[1:]
    assert len(decode) == 4 and all(not c["prefill"] and c["T"] == 1 for c in decode)
    for c in decode:
        assert torch.equal(c["route"], expect) and torch.equal(c["held"], expect)

    for r in range(ids.shape[0]):
        ref = forced if expect[r] else bare
        assert torch.equal(mixed.sequences[r], ref.sequences[r]), f"row {r} (route={bool(expect[r])})"
        for step, (got, want) in enumerate(zip(mixed.scores, ref.scores)):
            assert torch.equal(got[r], want[r]), f"row {r} step {step}"
    # The routed rows really used the side memory.
    routed = int(expect.nonzero()[0, 0])
    assert not torch.allclose(forced.scores[0][routed], bare.scores[0][routed])


# ----------------------------------------------------------------------------------------------
# 5. upper-stack replay == full forward; gradients reach the trained shard
# ----------------------------------------------------------------------------------------------

@archs
def test_upper_stack_replay_matches_full_forward(tiny_model, model_type):
    model = tiny_model(model_type)
    site = find_edit_site(model, LAYER)
    ids, mask = padded_batch(seed=6)
    base = site.module(model)
    shape = weight_matrix(base).shape
    norm = site.final_norm(model)

    normed = []
    h = norm.register_forward_hook(lambda m, a, o: normed.append(o.detach()))
    try:
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    finally:
        h.remove()
    # transformers 5: the last hidden state is the final norm's output for every arch here.
    torch.testing.assert_close(full.hidden_states[-1], normed[0], rtol=0, atol=1e-6)

    layer = WiseLayer(base)
    param = layer.start_training(init=torch.zeros(shape), mask=torch.ones(shape, dtype=torch.bool))
    rows = torch.tensor([0, 0, 1, 2, 2])
    cols = torch.tensor([0, 6, 4, 1, 2])
    labels = torch.tensor([5, 9, 17, 33, 64])
    upper = UpperStack(model, site)
    with attached(model, site, layer):
        assert site.module(model) is layer
        captured = upper.capture(ids, mask)
        assert len(captured.calls) == TINY_LAYERS - LAYER
        assert captured.hidden.shape == (ids.shape[0], ids.shape[1], TINY_HIDDEN)
        with torch.no_grad():
            hidden = upper.hidden_out(captured)
            torch.testing.assert_close(hidden, normed[0], rtol=0, atol=1e-5)
            at = upper.logits_at(captured, rows, cols)
            torch.testing.assert_close(at, full.logits[rows, cols], rtol=0, atol=1e-5)

        # Gradient through the replay equals the gradient through the full model.
        loss = F.cross_entropy(upper.logits_at(captured, rows, cols), labels)
        (g_replay,) = torch.autograd.grad(loss, param)
        full_loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols],
                                    labels)
        full_loss.backward()
    assert site.module(model) is base
    assert param.grad is not None and param.grad.abs().sum() > 0
    assert g_replay.abs().sum() > 0
    torch.testing.assert_close(g_replay, param.grad, rtol=1e-4, atol=1e-6)
    # Only the trained shard gets gradients: the base model stays frozen.
    assert all(p.grad is None for p in model.parameters())

    # A non-zero shard changes the replayed logits exactly as it changes the full forward.
    with torch.no_grad():
        param.copy_(random_delta(site, model, scale=0.1))
    with attached(model, site, layer), torch.no_grad():
        at = upper.logits_at(captured, rows, cols)
        want = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows, cols]
    torch.testing.assert_close(at, want, rtol=0, atol=1e-5)
    assert not torch.allclose(at, full.logits[rows, cols])
    layer.stop_training()


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_training_scores_on_token_grid(tiny_model, model_type):
    """WiseMethod._losses reads layer.last_scores as (B, T) after an upper-stack replay."""
    model = tiny_model(model_type)
    site = find_edit_site(model, LAYER)
    ids, mask = padded_batch(seed=9)
    shape = weight_matrix(site.module(model)).shape
    layer = WiseLayer(site.module(model))
    layer.start_training(init=random_delta(site, model), mask=torch.ones(shape, dtype=torch.bool))
    layer.routing.positions = mask.bool()  # the editor sets this: OPT needs the token grid
    upper = UpperStack(model, site)
    with attached(model, site, layer), torch.no_grad():
        upper.logits_at(upper.capture(ids, mask), torch.tensor([0]), torch.tensor([0]))
        acts = edited_module_input(model, site, ids, mask)
    layer.stop_training()
    assert layer.last_scores.shape == ids.shape
    torch.testing.assert_close(layer.last_scores, (acts @ random_delta(site, model).t()).norm(dim=-1))


# ----------------------------------------------------------------------------------------------
# module_inputs: per-prompt activations of the edited module over real tokens
# ----------------------------------------------------------------------------------------------

class _IdTokenizer:
    """Minimal tokenizer stand-in: a prompt is a space-separated list of token ids."""

    pad_token_id = TINY_PAD_ID
    eos_token_id = 2

    def __call__(self, text: str):
        class _Enc:
            input_ids = [int(t) for t in text.split()]

        return _Enc()


@archs
def test_module_inputs_per_prompt(tiny_model, model_type):
    from memstore.methods.upper import module_inputs

    model = tiny_model(model_type)
    site = find_edit_site(model, LAYER)
    ids, mask = padded_batch(seed=8)
    prompts = [" ".join(str(int(t)) for t in ids[r, :n]) for r, n in enumerate(LENGTHS)]
    want = edited_module_input(model, site, ids, mask)
    got = list(module_inputs(model, _IdTokenizer(), site, prompts, batch_size=2))
    assert [tuple(a.shape) for a in got] == [(n, TINY_INTERMEDIATE) for n in LENGTHS]
    for r, n in enumerate(LENGTHS):
        # Same batch composition only for the first chunk; later chunks are padded differently,
        # which must not change a row's real-token activations beyond float noise.
        torch.testing.assert_close(got[r], want[r, :n], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 6. errors: unknown architecture, layer out of range
# ----------------------------------------------------------------------------------------------

def test_unknown_architecture_names_the_overrides(tiny_model):
    model = tiny_model("bloom")
    assert model.config.model_type not in ARCH_EDIT_LAYER
    with pytest.raises(UnsupportedArchitecture) as info:
        find_edit_site(model, 1)
    msg = str(info.value)
    assert "--module" in msg and "--layer" in msg and "bloom" in msg
    # The override finds the module by hand, and mounting it is transparent.
    site = find_edit_site(model, 1, module="transformer.h.{L}.mlp.dense_4h_to_h")
    assert site.module_path == "transformer.h.1.mlp.dense_4h_to_h"
    assert weight_matrix(site.module(model)).shape == (TINY_HIDDEN, 4 * TINY_HIDDEN)
    ids, mask = padded_batch(seed=7)
    bare = logits(model, ids, mask)
    with mount_layer(model, site, WiseLayer(site.module(model))):
        assert torch.equal(logits(model, ids, mask), bare)
    # The stack above it replays from the override too: the final norm is found by its usual name.
    assert site.final_norm_path == "transformer.ln_f"
    upper = UpperStack(model, site)
    captured = upper.capture(ids, mask)
    rows, cols = torch.tensor([0, 1, 2]), torch.tensor([6, 4, 2])
    with torch.no_grad():
        torch.testing.assert_close(upper.logits_at(captured, rows, cols), bare[rows, cols], rtol=0, atol=1e-5)
    # With no final norm known, the replay refuses clearly instead of crashing mid-capture.
    with pytest.raises(UnsupportedArchitecture, match="final norm"):
        UpperStack(model, dataclasses.replace(site, final_norm_path=""))
    with pytest.raises(ConfigError, match=r"\{L\}"):
        find_edit_site(model, 1, module="transformer.h.1.mlp.dense_4h_to_h")
    with pytest.raises(UnsupportedArchitecture, match="--module"):
        find_edit_site(model, 1, module="transformer.h.{L}.mlp.no_such_proj")


@archs
def test_layer_out_of_range(tiny_model, model_type):
    model = tiny_model(model_type)
    for bad in (99, TINY_LAYERS, -TINY_LAYERS - 1):
        with pytest.raises(ConfigError) as info:
            find_edit_site(model, layer=bad)
        msg = str(info.value)
        assert f"0..{TINY_LAYERS - 1}" in msg and f"{TINY_LAYERS} layers" in msg
    assert find_edit_site(model, layer=-1).layer == TINY_LAYERS - 1

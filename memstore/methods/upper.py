"""Run only the stack above the edited layer, from cached inputs.

An edit trains one projection at layer L, so everything below layer L gives the same output at
every optimisation step (WISE §3.1: "everything below layer L can be computed once per edit").
`UpperStack.capture` runs the model once, recording each decoder layer's call from L upward
(hidden states, masks, position embeddings); `UpperStack.forward` then replays layers L..N-1,
the final norm and the LM head on only the positions that need logits. This works for any
architecture in model.ARCH_EDIT_LAYER because it replays the model's own calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedArchitecture
from ..model import EditSite


class _StopForward(Exception):
    pass


@dataclass
class LayerCall:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_in_kwargs: bool


@dataclass
class Captured:
    hidden: torch.Tensor  # (B, T, D) input of layer L
    calls: list[LayerCall]  # one per layer L..N-1, hidden state removed


class UpperStack:
    def __init__(self, model: nn.Module, site: EditSite) -> None:
        if not site.final_norm_path:
            raise UnsupportedArchitecture(
                f"cannot find the final norm of this '{site.model_type}' model, needed to replay the layers above "
                "the edited one; add the model type to memstore.model.ARCH_EDIT_LAYER"
            )
        self.model, self.site = model, site
        self.layers = site.layers(model)
        self.norm = site.final_norm(model)
        self.head = model.get_output_embeddings()

    @torch.no_grad()
    def capture(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Captured:
        calls: list[LayerCall] = []
        hidden: list[torch.Tensor] = []
        handles = []

        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if "hidden_states" in kwargs:
                h, kw, in_kw = kwargs["hidden_states"], {k: v for k, v in kwargs.items() if k != "hidden_states"}, True
                rest = args
            else:
                h, rest, kw, in_kw = args[0], args[1:], dict(kwargs), False
            if not hidden:
                hidden.append(h.detach())
            calls.append(LayerCall(rest, kw, in_kw))

        def stop(module: nn.Module, args: tuple) -> None:
            raise _StopForward

        for layer in list(self.layers)[self.site.layer:]:
            handles.append(layer.register_forward_pre_hook(record, with_kwargs=True))
        handles.append(self.norm.register_forward_pre_hook(stop))
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return Captured(hidden[0], calls)

    def hidden_out(self, captured: Captured) -> torch.Tensor:
        """Final normalised hidden states (B, T, D) from the cached layer-L input."""
        h = captured.hidden
        layers = list(self.layers)[self.site.layer:]
        for layer, call in zip(layers, captured.calls):
            out = layer(*call.args, hidden_states=h, **call.kwargs) if call.hidden_in_kwargs else layer(h, *call.args, **call.kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return self.norm(h)

    def logits_at(self, captured: Captured, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Logits (P, V) at the given (row, position) pairs only: the LM head is the costliest matmul."""
        h = self.hidden_out(captured)
        return self.head(h[rows, cols])


@torch.no_grad()
def module_inputs(model: nn.Module, tokenizer, site: EditSite, prompts, batch_size: int = 32):
    """Yield, per prompt, the edited module's input activations (T, d_in) over its real tokens.

    Runs the model only up to the edited module."""
    from ..prompting import pad_batch, pad_id

    device = next(model.parameters()).device
    module = model.get_submodule(site.module_path)
    grabbed: list[torch.Tensor] = []

    def grab(mod: nn.Module, args: tuple) -> None:
        grabbed.append(args[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(grab)
    try:
        for i in range(0, len(prompts), batch_size):
            chunk = [tokenizer(p).input_ids for p in prompts[i:i + batch_size]]
            batch = pad_batch(chunk, [len(c) for c in chunk], pad_id(tokenizer), device)
            grabbed.clear()
            try:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            except _StopForward:
                pass
            acts = grabbed[0]
            if acts.dim() == 2:  # OPT flattens (B, T, d) to (B*T, d) around its MLP
                acts = acts.view(*batch.input_ids.shape, -1)
            for r, n in enumerate(batch.lengths):
                yield acts[r, :n]
    finally:
        handle.remove()

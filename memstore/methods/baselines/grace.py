"""GRACE: a codebook of (key, replacement output, deferral radius) at one layer.

GRACE (Hartvigsen et al., "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors", NeurIPS 2023, arXiv 2211.11031), ALGORITHMS.md §3. The edited module is the FFN
down projection y = W a. A key is its input `a` at the last prompt token; a value is a trained
replacement for its output y (d_model); each entry has a deferral radius epsilon.
Serving, per row: the key at the row's last prompt token (the route is decided on the prompt and
held for every generated token, as the other layers do); if the nearest stored key lies within
its radius, the module's output from that token onward (teacher forcing: the target positions;
generation: every new token) is the entry's value, else the output is exactly the bare output.
Editing (the paper's codebook maintenance), for a new key at distance d from the nearest entry i:
- no overlap (d >= eps_i + eps_init): add an entry with radius eps_init;
- overlap, same target: expand eps_i to cover the new key's ball, no new entry (the value already
  produces that target);
- overlap, other target: split, shrinking eps_i and the new entry's radius to at most d / 2, so the
  two balls no longer overlap.
A new value starts from the module's output at the key token and is trained with Adam on the
target cross-entropy; only the layers above run per step (upper.py).
Radius units: Euclidean distance between keys. Measured on SmolLM2-135M, layer 24, ZsRE eval
records 0-299: keys have norm ~16 (median); a question and its rephrase are 6.4 apart (median;
1% quantile 2.3), a question and the nearest question about another subject 6.1 (1%: 1.4, 5%:
4.1), a locality (NQ) prompt and the nearest question at least 13.8. The default radius 2 sits
below almost all of these: replaying the codebook rules on the keys of records 0-999 (T=1000)
gives 905 adds, 83 splits, 12 expands; 99.5% of questions still fall in an entry with their
target, 1.8% of rephrases do, and no locality prompt falls in any. Radius 3 lets 5% of rephrases
in at the cost of 2.5% of the questions (splits); radii 4-6 add under 2% more rephrases and
mostly splits.
Run: `wisemem eval DATA -T 10 --method grace`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ...edits import Edit
from ...errors import ConfigError
from ...model import EditSite, weight_matrix
from ...prompting import format_prompt
from ..base import ContextConfig, MemoryLayer, hyperparameter
from ..upper import module_inputs
from ..wise.method import EditStats
from .common import BaselineEditor


@dataclass
class GraceConfig(ContextConfig):
    # Layer 24 of 30 on SmolLM2: there a rephrase's nearest question key is its own for 79% of
    # ZsRE records (57% at layer 17), and unrelated prompts lie farther from every question.
    layer_fraction: ClassVar[float] = 0.83

    init_radius: float = hyperparameter(2.0, "eps_init: deferral radius of a new codebook entry (Euclidean distance between keys)")
    lr: float = hyperparameter(1.0, "Adam learning rate on a new entry's value")
    max_steps: int = hyperparameter(100, "optimisation steps per edit at most")
    stop_loss: float = hyperparameter(0.05, "early stop once the edit loss is below this")
    distance: str = hyperparameter("euclidean", "distance between keys (euclidean)")
    replace: str = hyperparameter("all_after", "where a matched row's output is replaced: all_after (the last prompt token "
                                    "and every later one) or last (the last prompt token; each generated token)")
    use_prefixes: bool = hyperparameter(False, "also train values on the prompt in 10 context prefixes (GRACE: the bare prompt)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_radius <= 0:
            raise ConfigError(f"init_radius must be > 0, got {self.init_radius}")
        if self.max_steps < 1 or self.lr <= 0:
            raise ConfigError("max_steps must be >= 1 and lr > 0")
        if self.distance != "euclidean":
            raise ConfigError(f"distance must be euclidean, got '{self.distance}'")
        if self.replace not in ("all_after", "last"):
            raise ConfigError(f"replace must be all_after or last, got '{self.replace}'")


class Placement(NamedTuple):
    kind: str  # "add", "expand" or "split"
    nearest: int  # the nearest entry (-1: empty codebook)
    distance: float


@dataclass
class Codebook:
    """GRACE's discrete key-value store with one deferral radius per entry."""

    keys: torch.Tensor  # (N, d_in) float32
    values: torch.Tensor  # (N, d_out) float32
    radii: torch.Tensor  # (N,) float32
    targets: list[str]
    init_radius: float

    @classmethod
    def empty(cls, d_in: int, d_out: int, init_radius: float, device: str | torch.device = "cpu") -> Codebook:
        return cls(torch.zeros(0, d_in, device=device), torch.zeros(0, d_out, device=device),
                   torch.zeros(0, device=device), [], float(init_radius))

    def __len__(self) -> int:
        return len(self.targets)

    def nearest(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to and index of the nearest stored key, per query (B, d_in) -> (B,), (B,)."""
        # Exact differences, not the |a|^2 + |b|^2 - 2ab shortcut: that loses ~1e-3 at key norms ~16.
        d = torch.cdist(keys.float().to(self.keys.device), self.keys, compute_mode="donot_use_mm_for_euclid_dist")
        return d.min(1)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """(B,) the entry each query key falls into, -1 where none covers it."""
        if len(self) == 0:
            return torch.full((keys.shape[0],), -1, dtype=torch.long, device=self.keys.device)
        dist, idx = self.nearest(keys)
        return torch.where(dist <= self.radii[idx], idx, torch.full_like(idx, -1))

    def place(self, key: torch.Tensor, target: str) -> Placement:
        """Which maintenance rule a new (key, target) triggers; changes nothing."""
        if len(self) == 0:
            return Placement("add", -1, math.inf)
        dist, idx = self.nearest(key[None])
        d, i = float(dist[0]), int(idx[0])
        if d >= float(self.radii[i]) + self.init_radius:
            return Placement("add", i, d)
        return Placement("expand" if self.targets[i] == target else "split", i, d)

    def insert(self, key: torch.Tensor, target: str, value: torch.Tensor | None = None) -> Placement:
        """Apply the rule `place` picks; `value` is required unless the rule is expand."""
        p = self.place(key, target)
        if p.kind == "expand":
            self.radii[p.nearest] = max(float(self.radii[p.nearest]), p.distance + self.init_radius)
            return p
        if value is None:
            raise ValueError(f"a new codebook entry ({p.kind}) needs its value")
        radius = self.init_radius
        if p.kind == "split":
            self.radii[p.nearest] = min(float(self.radii[p.nearest]), p.distance / 2)
            radius = min(radius, p.distance / 2)
        dev = self.keys.device
        self.keys = torch.cat([self.keys, key.detach().float().to(dev)[None]])
        self.values = torch.cat([self.values, value.detach().float().to(dev)[None]])
        self.radii = torch.cat([self.radii, torch.tensor([radius], device=dev)])
        self.targets.append(target)
        return p

    def copy(self) -> Codebook:
        return Codebook(self.keys.clone(), self.values.clone(), self.radii.clone(), list(self.targets),
                        self.init_radius)


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last True of each row of a (B, T) mask (the last prompt token)."""
    return mask.shape[1] - 1 - mask.flip(1).to(torch.int).argmax(1)


class GraceLayer(MemoryLayer):
    def __init__(self, base_layer: nn.Module, codebook: Codebook | None, replace: str = "all_after") -> None:
        super().__init__(base_layer)
        self.codebook, self.replace = codebook, replace
        self.threshold = math.nan  # one radius per entry, no global threshold
        # Training state: one value replacing the output from each row's key position on.
        self.train_value: nn.Parameter | None = None
        self.train_start: torch.Tensor | None = None  # (B,) key position per row
        self.last_match: torch.Tensor | None = None  # (B,) entry of the last routing (-1: bare model)

    def start_training(self, init: torch.Tensor, start: torch.Tensor) -> nn.Parameter:
        self.train_value = nn.Parameter(init.detach().float().clone())  # (d_out,)
        self.train_start = start
        return self.train_value

    def stop_training(self) -> torch.Tensor:
        assert self.train_value is not None
        out = self.train_value.detach().clone()
        self.train_value, self.train_start = None, None
        return out

    def _replaced(self, start: torch.Tensor, T: int) -> torch.Tensor:
        """(B, T) positions whose output is replaced, given each row's key position."""
        pos = torch.arange(T, device=start.device)[None, :]
        return pos >= start[:, None] if self.replace == "all_after" else pos == start[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.unflatten(x)
        if flat is not None:
            return self.forward(flat).reshape(x.shape[0], -1)
        base = self.base_layer(x)  # (B, T, d_out)
        if self.train_value is not None:
            where = self._replaced(self.train_start.to(x.device), x.shape[1])  # (B, T)
            return torch.where(where[..., None], self.train_value.to(base.dtype), base)
        if not self.enabled or self.codebook is None or len(self.codebook) == 0:
            return base
        match, start = self._route(x)
        routed = match >= 0
        if not bool(routed.any()):
            return base
        where = self._replaced(start, x.shape[1]) & routed[:, None]  # (B, T)
        values = self.codebook.values[match.clamp_min(0)].to(base.device, base.dtype)  # (B, d_out)
        return torch.where(where[..., None], values[:, None, :], base)

    @torch.no_grad()
    def _route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) matched entry and (B,) key position of each row."""
        held = self.routing.held
        if not self.routing.prefill and held is not None and held.shape[0] == x.shape[0]:
            # A cached generation step: its tokens come after the prompt, so all are replaced.
            return held.to(x.device), torch.zeros_like(held, device=x.device)
        start = last_positions(self.route_positions(x[..., 0])).to(x.device)  # (B,)
        keys = x[torch.arange(x.shape[0], device=x.device), start]  # (B, d_in)
        match = self.codebook.lookup(keys).to(x.device)
        self.last_match = match
        if self.routing.prefill:
            self.routing.held = match
        return match, start


class GraceEditor(BaselineEditor):
    """Sequential GRACE editing on one model; `layer()` serves the codebook."""

    def __init__(self, model: nn.Module, tokenizer, site: EditSite, config: GraceConfig,
                 irrelevant: Sequence[str] = (), prefixes: Sequence[str] | None = None) -> None:
        super().__init__(model, tokenizer, site, config, irrelevant, prefixes)
        d_out, d_in = weight_matrix(self.base).shape
        self.codebook = Codebook.empty(d_in, d_out, config.init_radius, self.device)

    @torch.no_grad()
    def key_of(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's key (d_in,) and the bare module's output there (d_out,)."""
        text = format_prompt(self.tokenizer, prompt, self.config.chat_template)
        key = next(module_inputs(self.model, self.tokenizer, self.site, [text]))[-1]
        return key.float(), self.base(key[None])[0].float()

    def train_value(self, layer: GraceLayer, edit: Edit, init: torch.Tensor) -> tuple[torch.Tensor, int, float]:
        batch = self.batch(edit)
        value = layer.start_training(init, torch.tensor(batch.prompt_lens, device=self.device) - 1)
        layer.routing.positions = batch.attention_mask.bool()  # OPT's flattened MLP input needs the (B, T) grid
        step, loss_v = self.minimize(batch, torch.optim.Adam([value], lr=self.config.lr))
        return layer.stop_training(), step, loss_v

    def train_edit(self, layer: GraceLayer, edit: Edit) -> EditStats:
        start = time.perf_counter()
        key, out = self.key_of(edit.prompt)
        value, steps, loss = None, 0, math.nan
        if self.codebook.place(key, edit.target_new).kind != "expand":
            value, steps, loss = self.train_value(layer, edit, out)
        self.codebook.insert(key, edit.target_new, value)
        self.edits.append(edit)
        return EditStats(steps, loss, loss, time.perf_counter() - start)

    def training_layer(self) -> GraceLayer:
        return GraceLayer(self.base, None, self.config.replace)

    def layer(self) -> GraceLayer:
        """The serving layer, over a snapshot of the codebook (later edits do not change it)."""
        return GraceLayer(self.base, self.codebook.copy(), self.config.replace)

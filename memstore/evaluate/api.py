"""`wisemem eval`: load the model and data, run the sequential protocol, return a JSON-able dict."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..edits import Edit, read_edits
from ..errors import ConfigError, EditFileError
from ..model import EMBEDDED_MODEL, find_edit_site, load_model
from .datasets import resolve_family
from .runner import run_eval

# --method -> the registered method whose config it takes
METHODS = {"wise-merge": "wise", "wise-retrieve": "wise", "memoir": "memoir", "ft-l": "ft-l", "grace": "grace"}


def irrelevant_prompts(path: str | os.PathLike) -> list[str]:
    """Irrelevant prompts for the router margin: a benchmark/edits file (its loc prompts) or plain lines."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if text.lstrip().startswith(("[", "{")):
        try:
            edits, _ = read_edits(p, skip_invalid=True)
        except EditFileError:
            edits = []
        prompts = [e.locality_prompt for e in edits if e.locality_prompt]
        if prompts:
            return prompts
        raise ConfigError(f"{path}: no locality prompts (loc / locality_prompt) found to use as irrelevant prompts")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_eval_edits(data: str | os.PathLike | Sequence[str | os.PathLike], needed: int,
                    cycle: bool = False, one_per_subject: bool = False) -> tuple[list[Edit], dict[str, Any]]:
    """The first `needed` edits of the data files, in order; with `cycle`, the records repeat
    from the start when the files hold fewer (and the returned facts say how often).
    `one_per_subject` keeps the first record of each subject: ZsRE's eval split holds several
    paraphrases of one question with different targets, i.e. edits that contradict each other."""
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    edits: list[Edit] = []
    skipped = 0
    for path in paths:
        more, bad = read_edits(path, skip_invalid=True)
        edits += more
        skipped += bad
    if one_per_subject:
        subjects: set[str] = set()
        edits = [e for e in edits if e.subject is None or not (e.subject in subjects or subjects.add(e.subject))]
    facts: dict[str, Any] = {"data": [str(p) for p in paths] if len(paths) > 1 else str(paths[0]),
                             "one_per_subject": one_per_subject, "skipped_records": skipped, "distinct_edits": min(len(edits), needed), "cycled": 0}
    if needed > len(edits):
        if not cycle or not edits:
            raise ConfigError(f"{needed} edits are needed; the data has {len(edits)} usable "
                              "(give more files, or --cycle to repeat the records)")
        facts["cycled"] = -(-needed // len(edits))  # passes over the records
        edits = (edits * facts["cycled"])
    return edits[:needed], facts


def evaluate(data: str | os.PathLike | Sequence[str | os.PathLike], *, n_edits: int, chunks: int = 1,
             method: str = "wise-merge", cycle: bool = False, one_per_subject: bool = False,
             model_id: str | None = None, layer: int | None = None, irrelevant_file: str | os.PathLike | None = None,
             generation: bool = True, plain: bool = False, overrides: dict[str, Any] | None = None,
             device: str = "cpu", dtype: str = "fp32", store: str | None = None, family: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """`wisemem eval`. `family` (zsre, counterfact, hallucination, temporal, edits) picks the
    metrics (evaluate/datasets.py); by default it is detected from the data files' records."""
    from ..porcelain import background_prompts, make_config, store_path
    from ..store import Store

    if method not in METHODS:
        raise ConfigError(f"unknown --method '{method}'; available: {', '.join(METHODS)}")
    if n_edits < 1 or chunks < 1:
        raise ConfigError("-T and --chunks must be at least 1")
    paths = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    protocol = resolve_family(paths, family)
    edits, facts = load_eval_edits(data, n_edits * chunks, cycle, one_per_subject)
    hyper = dict(overrides or {})
    if model_id is None and Store.exists_at(store_path(store)):  # catalog.sqlite or catalog.url
        with Store.open(store_path(store)) as s:  # evaluate on the store's own model and layer
            model_id, layer = s.binding["model_id"], layer if layer is not None else s.binding["layer"]
    model, tokenizer = load_model(model_id, device=device, dtype=dtype)
    config = make_config(getattr(model.config, "model_type", None), hyper, method=METHODS[method])
    site = find_edit_site(model, layer, layer_fraction=config.layer_fraction)
    irrelevant = irrelevant_prompts(irrelevant_file) if irrelevant_file else background_prompts()
    start = time.perf_counter()
    result = run_eval(model, tokenizer, site, edits, config, irrelevant, n_edits=n_edits, chunks=chunks,
                      method=method, generation=generation, plain=plain, family=protocol, progress=progress)
    out = result.to_dict()
    out.update({
        **facts, "model": model_id or EMBEDDED_MODEL, "layer": site.layer,
        "module": site.module_path, "plain": plain, "wall_seconds": time.perf_counter() - start,
        "irrelevant": str(irrelevant_file) if irrelevant_file else "built-in background prompts",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": device, "dtype": dtype},
    })
    return json.loads(json.dumps(out, default=str))

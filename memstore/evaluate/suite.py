"""Named benchmark suites: methods x datasets x T, one JSON result per run.

`wisemem bench SUITE` runs every run of a suite through the same `evaluate` as `wisemem eval`
and writes `<out>/<suite>/<run id>.json` (the run's spec, the eval output with model, config,
machine and seconds, the wisemem version and the git commit of the checkout). A run whose
result file exists with the same spec is skipped, so an interrupted suite resumes where it
stopped. `benchmarks/render_suite.py` turns the results into docs/BENCHMARKS.md tables and plots.
Data paths are relative to a data directory (`--data-dir`, default `../shared/data`).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..model import EMBEDDED_MODEL

# dataset name -> (edit records, irrelevant prompts for the router margin / background), under the data dir
DATASETS: dict[str, tuple[str, str]] = {
    "zsre": ("zsre/zsre_mend_eval.0-999.json", "zsre/zsre_mend_train-1k.json"),
    "counterfact": ("counterfact/counterfact-edit.0-999.json", "zsre/zsre_mend_train-1k.json"),
    "hallucination": ("hallucination/hallucination-edit.shared.json", "hallucination/hallucination-train.shared.json"),
    "temporal": ("temporal/temporal-edit.0-49.json", "temporal/temporal-train.json"),
}
ALL_METHODS = ("wise-merge", "wise-retrieve", "memoir", "ft-l", "grace")
# T of each dataset at most: the shared files hold 998 usable ZsRE records, 303 hallucination, 50 temporal.
MAX_T = {"zsre": 1000, "counterfact": 1000, "hallucination": 300, "temporal": 50}


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    method: str
    T: int
    chunks: int = 1
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in self.overrides)
        return f"{self.dataset}-{self.method}-T{self.T}x{self.chunks}{extra}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = dict(self.overrides)
        return d


def _grid(datasets: Sequence[str], methods: Sequence[str], Ts: Sequence[int], chunks: int = 1) -> list[RunSpec]:
    return [RunSpec(d, m, t, chunks) for t in Ts for d in datasets for m in methods if t * chunks <= MAX_T[d]]


SUITES: dict[str, tuple[str, Callable[[], list[RunSpec]]]] = {
    "smoke": ("every method on 2 ZsRE edits: checks the machinery (minutes)",
              lambda: _grid(["zsre"], ALL_METHODS, [2])),
    "t10": ("every method x every dataset at T=10", lambda: _grid(list(DATASETS), ALL_METHODS, [10])),
    "t100": ("every method on ZsRE, CounterFact and hallucination at T=100",
             lambda: _grid(["zsre", "counterfact", "hallucination"], ALL_METHODS, [100])),
    "t1000": ("every method on ZsRE and CounterFact at T=1000 (hours per method on a CPU)",
              lambda: _grid(["zsre", "counterfact"], ALL_METHODS, [1000])),
}


def suite_runs(name: str, methods: Sequence[str] | None = None, datasets: Sequence[str] | None = None) -> list[RunSpec]:
    if name not in SUITES:
        raise ConfigError(f"unknown suite '{name}'; available: {', '.join(SUITES)}")
    for given, known, what in ((methods, ALL_METHODS, "method"), (datasets, DATASETS, "dataset")):
        bad = sorted(set(given or ()) - set(known))
        if bad:
            raise ConfigError(f"unknown {what}(s) {bad}; available: {', '.join(known)}")
    return [r for r in SUITES[name][1]() if (not methods or r.method in methods) and (not datasets or r.dataset in datasets)]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return out.stdout.strip() or None


@dataclass
class SuiteRun:
    spec: RunSpec
    path: Path
    status: str  # "done" (ran now), "skipped" (result already there), "failed"
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def run_suite(name: str, out_dir: str | os.PathLike, *, data_dir: str | os.PathLike = "../shared/data",
              methods: Sequence[str] | None = None, datasets: Sequence[str] | None = None, force: bool = False,
              overrides: dict[str, Any] | None = None, model_id: str | None = None, device: str = "cpu", dtype: str = "fp32",
              progress: Callable[[str, int, int], None] | None = None) -> Iterator[SuiteRun]:
    """Run (or skip, when already recorded) every run of the suite, yielding each as it ends.
    `overrides` (hyperparameters, e.g. {"max_steps": 5}) apply to every run and are part of its spec."""
    from .. import __version__
    from .api import evaluate

    data_root = Path(data_dir)
    runs = suite_runs(name, methods, datasets)
    if overrides:
        runs = [replace(r, overrides=tuple(sorted(overrides.items()))) for r in runs]
    missing = sorted({str(data_root / DATASETS[r.dataset][0]) for r in runs if not (data_root / DATASETS[r.dataset][0]).exists()})
    if missing:
        raise ConfigError(f"benchmark data not found: {', '.join(missing)} (set --data-dir)")
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    for spec in runs:
        path = folder / f"{spec.id}.json"
        recorded = json.loads(path.read_text()) if path.exists() and not force else {}
        if recorded.get("spec") == spec.to_dict():
            yield SuiteRun(spec, path, "skipped", result=recorded["result"])
            continue
        records, irrelevant = DATASETS[spec.dataset]
        start = time.perf_counter()
        try:
            # cycle: ZsRE's 1000 records hold 998 usable ones; the output counts the repeats
            result = evaluate(data_root / records, n_edits=spec.T, chunks=spec.chunks, method=spec.method, cycle=True,
                              irrelevant_file=data_root / irrelevant, overrides=dict(spec.overrides),
                              model_id=model_id or EMBEDDED_MODEL, device=device, dtype=dtype,
                              progress=(lambda done, total, s=spec: progress(s.id, done, total)) if progress else None)
        except ConfigError as exc:  # e.g. a method that cannot run this data: record it, go on
            yield SuiteRun(spec, path, "failed", time.perf_counter() - start, error=str(exc))
            continue
        seconds = time.perf_counter() - start
        record = {"suite": name, "id": spec.id, "spec": spec.to_dict(), "version": __version__, "git_commit": commit,
                  "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds)),
                  "seconds": seconds, "result": result}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)  # a result file is whole or absent
        yield SuiteRun(spec, path, "done", seconds, result)

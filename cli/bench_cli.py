"""`wisemem bench`: run a named benchmark suite (memstore/evaluate/suite.py), one JSON result per run."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memstore import porcelain
from memstore.evaluate import suite as suites

from . import render
from .app import JsonOpt, SetOpt, app


@app.command()
def bench(
    name: Optional[str] = typer.Argument(None, help="suite to run (see --list)"),
    list_: bool = typer.Option(False, "--list", help="list the suites and their runs, run nothing"),
    method: list[str] = typer.Option([], "--method", help="only these methods (repeatable)"),
    dataset: list[str] = typer.Option([], "--dataset", help="only these datasets (repeatable)"),
    out: Path = typer.Option(Path("benchmarks/results/suite"), "--out", help="results directory"),
    data_dir: Path = typer.Option(Path("../shared/data"), "--data-dir", envvar="WISEMEM_DATA",
                                  help="directory holding zsre/, counterfact/, hallucination/, temporal/"),
    force: bool = typer.Option(False, "--force", help="re-run runs whose result file exists"),
    set_: list[str] = SetOpt,
    model: Optional[str] = typer.Option(None, "--model", help="model id/path (default: embedded)"),
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("fp32", "--dtype"),
    json_out: bool = JsonOpt,
) -> None:
    """Run a benchmark suite: methods x datasets x T through `eval`, a JSON file per run (resumable)."""
    if list_ or name is None:
        listing = {n: {"about": about, "runs": [r.id for r in suites.suite_runs(n, method, dataset)]}
                   for n, (about, _) in suites.SUITES.items() if name in (None, n)}
        if json_out:
            return render.emit_json(listing)
        for n, info in listing.items():
            render.out.print(f"{n}: {info['about']} — {len(info['runs'])} run(s)", markup=False)
            for rid in info["runs"] if name else []:
                render.out.print(f"  {rid}", markup=False)
        return
    overrides = porcelain.parse_overrides(set_)
    done = []
    with render.progress(f"bench {name}") as update:
        for run in suites.run_suite(name, out, data_dir=data_dir, methods=method, datasets=dataset, force=force,
                                    overrides=overrides, model_id=model, device=device, dtype=dtype,
                                    progress=lambda _id, d, t: update(d, t)):
            done.append(run)
            if not json_out:
                r = run.result
                line = (f"{run.status:<7} {run.spec.id:<40} " + (f"Rel {r['reliability']:.3f} Gen {_f(r['generalization'])} "
                        f"Loc {_f(r['locality'])} {run.seconds:.0f} s" if r else run.error or ""))
                render.err.print(line, markup=False)
    if json_out:
        return render.emit_json([{"id": r.spec.id, "status": r.status, "path": str(r.path), "seconds": r.seconds,
                                  "error": r.error} for r in done])
    render.out.print(f"{sum(r.status == 'done' for r in done)} run(s) done, {sum(r.status == 'skipped' for r in done)} "
                     f"skipped, {sum(r.status == 'failed' for r in done)} failed; results in {out / name}")


def _f(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, float) and value == value else "n/a"  # NaN: not measured

"""Render `wisemem bench` results into docs/BENCHMARKS.md (the table between the suite markers) and
PNG plots: quality vs T per method, seconds per edit vs T, inference overhead vs stored edits.

Run: `.venv/bin/python benchmarks/render_suite.py` (reads benchmarks/results/suite/*/*.json and
benchmarks/results/routing.json; needs matplotlib, installed with the dev extra).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
METHOD_ORDER = ("wise-merge", "wise-retrieve", "memoir", "ft-l", "grace")
DATASET_ORDER = ("zsre", "counterfact", "hallucination", "temporal")
# The quality plot's second panel per dataset: hallucination records have no rephrases, so the
# corrected passage's perplexity stands in for generalisation.
SECOND_MEASURE = {"hallucination": ("perplexity", "perplexity (lower is better)")}


def load(results: Path) -> list[dict]:
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("*/*.json"))]
    latest: dict[str, dict] = {}
    for r in runs:  # the same run in several suites: the newest result
        key = r["id"]
        if key not in latest or r["started_at"] > latest[key]["started_at"]:
            latest[key] = r
    return sorted(latest.values(), key=lambda r: (DATASET_ORDER.index(r["spec"]["dataset"]), r["spec"]["T"],
                                                   METHOD_ORDER.index(r["spec"]["method"])))


def label(spec: dict) -> str:
    """The method, with any hyperparameter the run overrode."""
    extra = ", ".join(f"{k}={v}" for k, v in sorted(spec.get("overrides", {}).items()))
    return f"{spec['method']} ({extra})" if extra else spec["method"]


def set_value(value) -> str:
    """A hyperparameter as `--set` parses it back (JSON unless a plain string)."""
    return value if isinstance(value, str) else json.dumps(value)


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(runs: list[dict]) -> str:
    head = ("| dataset | T × chunks | method | Rel | Gen | Loc | dataset metric | gen EM prompt / rephrase | "
            "gen token F1 prompt / rephrase | median s/edit | command |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in runs:
        s, x = r["spec"], r["result"]
        metric = "—"
        if x.get("perplexity") is not None:
            metric = f"PPL {fmt(x['perplexity'], 1)} (bare {fmt(x.get('perplexity_before'), 1)})"
        elif x.get("ood_generalization") is not None:
            metric = f"OOD gen {fmt(x['ood_generalization'])} (bare {fmt(x.get('ood_generalization_before'))})"
        sets = "".join(f" --set {shlex.quote(f'{k}={set_value(v)}')}" for k, v in sorted(s.get("overrides", {}).items()))
        cmd = f"`wisemem bench {r['suite']} --method {s['method']} --dataset {s['dataset']}{sets}`"
        if "imported_from" in r:
            cmd += f" (imported: `{r['imported_from'].split(' ')[0]}`)"
        lines.append(f"| {s['dataset']} | {s['T']} × {s['chunks']} | {label(s)} | {fmt(x['reliability'])} | "
                     f"{fmt(x.get('generalization'))} | {fmt(x['locality'])} | {metric} | "
                     f"{fmt(x.get('generation_exact_match'), 2)} / {fmt(x.get('rephrase_exact_match'), 2)} | "
                     f"{fmt(x.get('generation_token_f1'), 2)} / {fmt(x.get('rephrase_token_f1'), 2)} | "
                     f"{fmt(x.get('seconds_per_edit'), 2)} | {cmd} |")
    return "\n".join(lines)


def plot_quality(runs: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One row per dataset run at more than one T (quality against T needs a line), one colour per method.
    datasets = [d for d in DATASET_ORDER if len({r["spec"]["T"] for r in runs if r["spec"]["dataset"] == d}) > 1]
    methods = sorted({label(r["spec"]) for r in runs if r["spec"]["dataset"] in datasets},
                     key=lambda m: (METHOD_ORDER.index(m.split(" ")[0]), m))
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, grid = plt.subplots(len(datasets), 4, figsize=(16, 4.2 * len(datasets) + 1.0), squeeze=False)
    for axes, dataset in zip(grid, datasets):
        second = SECOND_MEASURE.get(dataset, ("generalization", "Generalization"))
        keys = ("reliability", second[0], "locality", "seconds_per_edit")
        titles = ("Reliability", second[1], "Locality", "median seconds per edit")
        for ax, key, title in zip(axes, keys, titles):
            by_method = defaultdict(list)
            for r in runs:
                if r["spec"]["dataset"] == dataset:
                    by_method[label(r["spec"])].append((r["spec"]["T"], r["result"].get(key)))
            for method in methods:
                points = sorted((t, v) for t, v in by_method.get(method, []) if v is not None and not math.isnan(v))
                if points:
                    ax.plot([t for t, _ in points], [v for _, v in points], marker="o", label=method,
                            color=colour[method])
            ax.set_xscale("log")
            ax.set_xlabel("T (sequential edits)")
            ax.set_title(f"{dataset}: {title}")
            if key == "perplexity":
                ax.set_yscale("log")  # from ~1 (edit learnt) to hundreds (a collapsed model)
            elif key != "seconds_per_edit":
                ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
    # Below the panels: inside one it would hide points.
    shown = {}
    for ax in grid.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            shown.setdefault(name, handle)
    fig.legend(list(shown.values()), list(shown), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{', '.join(datasets)}: SmolLM2-135M-Instruct, teacher-forced (wisemem bench)")
    fig.tight_layout(rect=(0, 1.0 / (4.2 * len(datasets) + 1.0), 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_overhead(routing: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = json.loads(routing.read_text())["sizes"]
    n = sorted(int(k) for k in sizes)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(n, [100 * sizes[str(k)]["inference"]["overhead"] for k in n], marker="o", label="MEMOIR mounted vs bare")
    a.axhline(5, color="red", linestyle="--", linewidth=1, label="goal ≤ 5%")
    a.axhline(0, color="grey", linewidth=0.5)
    a.set_xscale("log")
    a.set_xlabel("stored edits")
    a.set_ylabel("inference overhead (%)")
    a.set_title("teacher-forced pass, 128 prompts")
    a.legend(fontsize=8)
    for kind, label in (("faiss_flat", "FAISS flat"), ("faiss_hnsw", "FAISS HNSW"), ("exhaustive_scan", "exhaustive scan")):
        b.plot(n, [1e6 * sizes[str(k)]["route_seconds_per_query"][kind] for k in n], marker="o", label=label)
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("stored edits")
    b.set_ylabel("µs per query")
    b.set_title("routing time per query")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "suite")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    args = ap.parse_args()
    runs = load(args.results)
    doc = args.doc.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{args.doc}: markers {BEGIN} / {END} not found")
    block = f"{BEGIN}\n{table(runs)}\n\n![quality vs T](suite_quality.png)\n\n![overhead](suite_overhead.png)\n{END}"
    args.doc.write_text(re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, doc, flags=re.S))
    plot_quality(runs, args.doc.parent / "suite_quality.png")
    routing = ROOT / "benchmarks" / "results" / "routing.json"
    if routing.exists():
        plot_overhead(routing, args.doc.parent / "suite_overhead.png")
    print(f"{len(runs)} run(s) rendered into {args.doc}")


if __name__ == "__main__":
    main()

"""Quickstart: commit example edits to the embedded model and show answers before and after.

Run: make demo   (or: .venv/bin/python examples/quickstart.py [--store DIR])
Creates a store (a temporary one unless --store is given), commits examples/edits.jsonl with
WISE, mounts HEAD, and prints each edited prompt's answer, its rephrase's answer, and an
unrelated prompt's answer, with the bare model and with the memory.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memstore import porcelain

HERE = Path(__file__).parent
UNRELATED = "The capital of Germany is"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", help="store directory (default: a temporary one)")
    parser.add_argument("--edits", default=str(HERE / "edits.jsonl"))
    args = parser.parse_args()
    console = Console()
    store = args.store or str(Path(tempfile.mkdtemp(prefix="wisemem-")) / ".wisemem")

    start = time.perf_counter()
    with console.status("wisemem init (embedded SmolLM2-135M-Instruct)"):
        info = porcelain.init(store)
    console.print(f"store {info.path}: {info.model_id}, edited module {info.module_path}")
    edits = [json.loads(line) for line in Path(args.edits).read_text().splitlines() if line.strip()]
    prompts = [e["prompt"] for e in edits] + [e["rephrase_prompt"] for e in edits if e.get("rephrase_prompt")] + [UNRELATED]

    session = porcelain.open_session(store)
    try:
        before = porcelain.generate(store, prompts, max_new_tokens=8, memory=False, session=session)
        with console.status(f"wisemem commit {args.edits} ({len(edits)} edits)"):
            result = porcelain.commit(store, args.edits, message="quickstart edits", session=session)
        console.print(f"commit {result.commit_id[:12]}: {result.n_edits} edits, "
                      f"{sum(result.seconds_per_edit) / len(edits):.1f} s per edit")
        porcelain.mount(store, "HEAD")
        after = porcelain.generate(store, prompts, max_new_tokens=8, session=session)
    finally:
        session.close()

    table = Table(title="answers before and after `wisemem commit` (greedy, 8 tokens)")
    for col in ("prompt", "kind", "bare model", "with memory", "routed"):
        table.add_column(col)
    kinds = ["edit"] * len(edits) + ["rephrase"] * (len(prompts) - len(edits) - 1) + ["unrelated"]
    for p, kind, b, a in zip(prompts, kinds, before, after):
        table.add_row(p, kind, b.text.strip(), a.text.strip(), "yes" if a.routed else "no")
    console.print(table)
    for e, a in zip(edits, after):
        ok = a.text.strip().startswith(e["target_new"])
        console.print(f"{'OK ' if ok else 'MISS'} {e['prompt']!r} -> {e['target_new']!r}")
    unchanged = before[-1].text == after[-1].text
    console.print(f"{'OK ' if unchanged else 'CHANGED'} unrelated prompt {UNRELATED!r} -> {after[-1].text.strip()!r}")
    console.print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()

"""The `wisemem` command: each command parses, calls one porcelain verb, renders the result."""

from __future__ import annotations

import os

# libgomp's default busy-wait makes torch ~10x slower when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
from pathlib import Path
from typing import Optional

import typer

from memstore import porcelain
from memstore.errors import ConfigError, WisememError

from . import render
from .errors import exit_code

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="A versioned knowledge-memory store for LLMs: commit edits, mount, generate.")


class State:
    store: Optional[str] = None


state = State()

StoreOpt = typer.Option(None, "--store", help="store directory (default: $WISEMEM_DIR or ./.wisemem)")
JsonOpt = typer.Option(False, "--json", help="print machine-readable JSON on stdout")
SetOpt = typer.Option([], "--set", help="hyperparameter override key=value (repeatable)")
ConfigOpt = typer.Option(None, "--config", help="YAML or JSON file of hyperparameters")


@app.callback()
def main_options(store: Optional[str] = StoreOpt) -> None:
    state.store = store


def _store(local: Optional[str]) -> Optional[str]:
    return local or state.store


def _overrides(config: Optional[Path], pairs: list[str]) -> dict:
    """Hyperparameters from --config, then --set on top."""
    out = porcelain.load_config_file(config)
    out.update(porcelain.parse_overrides(pairs))
    return out


@app.command()
def init(
    model: Optional[str] = typer.Option(None, "--model", help="Hugging Face id or local path (default: embedded SmolLM2-135M-Instruct)"),
    layer: Optional[int] = typer.Option(None, "--layer", help="index of the edited layer (default: 60% of depth for "
                                        "wise, 83% for memoir)"),
    module: Optional[str] = typer.Option(None, "--module", help="edited module path with {L}, for unknown architectures"),
    method: str = typer.Option("wise", "--method", help="wise (WISE-Merge: one side memory merged from shards), "
                               "wise-retrieve (one side memory per shard group, top-1 routing through a FAISS key "
                               "index) or memoir (residual memory + TopHash masks); fixed for the store's life"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:1, mps ..."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16"),
    chat_template: bool = typer.Option(False, "--chat-template", help="edit through the tokenizer's chat template"),
    catalog: Optional[str] = typer.Option(None, "--catalog", envvar="WISEMEM_CATALOG",
                                          help="SQLAlchemy URL of the catalog (default: SQLite file in the store)"),
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Create a store bound to a base model."""
    overrides = porcelain.parse_overrides(set_)
    if chat_template:
        overrides["chat_template"] = True
    with render.err.status("loading model and creating store"):
        result = porcelain.init(_store(store), model_id=model, layer=layer, module=module, device=device, dtype=dtype,
                                config_file=str(config) if config else None, overrides=overrides, catalog=catalog,
                                method=method)
    if json_out:
        return render.emit_json(result)
    render.out.print(f"Initialized wisemem store in {result.path}")
    render.out.print(f"  model  {result.model_id}\n  module {result.module_path} (layer {result.layer})")


LockOpt = typer.Option(30.0, "--lock-timeout", help="seconds to wait for another writer")


@app.command()
def train(
    edits_file: Path = typer.Argument(..., help="JSONL file, one edit per line (schemas/edit.schema.json)"),
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    lock_timeout: float = LockOpt,
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Train edits into a new memory state and stage it (HEAD does not move; `commit` records it)."""
    overrides = _overrides(config, set_)
    with render.progress("editing") as update:
        result = porcelain.train(_store(store), edits_file, overrides=overrides, lock_timeout=lock_timeout,
                                 progress=update)
    if json_out:
        return render.emit_json(result)
    render.out.print(f"staged {result.n_edits} edit(s); {result.total_edits} live edit(s) in {result.shards} shard(s)")
    for key, value in result.metrics.items():
        if isinstance(value, float):
            render.out.print(f"  {key:<15} {value:.3f}  (on these edits)")
    render.out.print("`wisemem commit -m MSG` records it; `wisemem unstage` drops it")


@app.command()
def unstage(lock_timeout: float = LockOpt, store: Optional[str] = StoreOpt, json_out: bool = JsonOpt) -> None:
    """Drop what `train` staged."""
    n = porcelain.unstage(_store(store), lock_timeout=lock_timeout)
    if json_out:
        return render.emit_json({"dropped_edits": n})
    render.out.print(f"unstaged {n} edit(s)")


@app.command()
def commit(
    edits_file: Optional[Path] = typer.Argument(None, help="JSONL edits to train and commit (default: what is staged)"),
    message: Optional[str] = typer.Option(None, "-m", "--message", help="commit message"),
    gate: Optional[str] = typer.Option(None, "--gate", help="refuse the commit (exit 1, nothing recorded) unless its "
                                       "own evaluation meets e.g. \"reliability>=0.9,locality>=0.98\""),
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    lock_timeout: float = LockOpt,
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Record a commit: the staged state, or the edits of FILE trained and committed in one step."""
    overrides = _overrides(config, set_)
    with render.progress("editing", enabled=edits_file is not None) as update:
        result = porcelain.commit(_store(store), edits_file, message=message, overrides=overrides, gate=gate,
                                  lock_timeout=lock_timeout, progress=update)
    if json_out:
        return render.emit_json(result)
    threshold = f"{result.threshold:.3f}" if result.threshold is not None else "none"
    render.out.print(f"[{result.commit_id[:12]}] {result.n_edits} edit(s) committed; {result.total_edits} live edit(s) "
                     f"in {result.shards} shard(s); router threshold {threshold}", markup=False)
    if gate:
        render.out.print("gate passed: " + render.metrics_line(result.metrics), markup=False)


@app.command()
def log(
    ref: str = typer.Argument("HEAD"),
    oneline: bool = typer.Option(False, "--oneline", help="one line per commit"),
    max_count: Optional[int] = typer.Option(None, "-n", "--max-count", min=1, help="show at most N commits"),
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show the commit history (first parents), with evaluations recorded on each commit."""
    commits = porcelain.log(_store(store), ref, max_count)
    if json_out:
        return render.emit_json([dict(render.to_data(c), parent_id=c.parent_id) for c in commits])
    if not commits:
        render.out.print("no commits yet")
    for c in commits:
        if oneline:
            render.out.print(f"{c.id[:12]} {c.message}", markup=False)
            continue
        merge = f"Merge:  {' '.join(p[:12] for p in c.parents)}\n" if len(c.parents) > 1 else ""
        change = f"+{c.n_edits}" + (f" -{c.n_removed}" if c.n_removed else "")
        render.out.print(f"[yellow]commit {c.id}[/yellow]")
        render.out.print(f"{merge}Author: {c.author}\nDate:   {c.created_at}\nEdits:  {change} ({c.method}, "
                         f"{c.memories} memor{'y' if c.memories == 1 else 'ies'})", markup=False)
        for ev in c.evaluations:
            render.out.print("Eval:   " + render.metrics_line(ev["metrics"]) + f" ({ev['source']})", markup=False)
        render.out.print(f"\n    {c.message}\n", markup=False)


@app.command()
def mount(
    ref: str = typer.Argument("HEAD", help="ref to pin; HEAD follows new commits"),
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Select the memory state that generate and the Python API use."""
    result = porcelain.mount(_store(store), ref)
    if json_out:
        return render.emit_json(result)
    where = result.commit_id[:12] if result.commit_id else "no commits yet"
    render.out.print(f"mounted {result.ref} ({where})" + (" — follows new commits" if result.ref == "HEAD" else ""))


@app.command()
def unmount(store: Optional[str] = StoreOpt, json_out: bool = JsonOpt) -> None:
    """Answer with the bare base model until the next mount."""
    result = porcelain.unmount(_store(store))
    if json_out:
        return render.emit_json(result)
    render.out.print("unmounted: generate uses the bare model")


@app.command()
def generate(
    prompts: list[str] = typer.Argument(..., help="one or more prompts"),
    max_new_tokens: int = typer.Option(20, "--max-new-tokens", "-n", min=1),
    no_memory: bool = typer.Option(False, "--no-memory", help="answer with the bare model"),
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Greedy continuation of each prompt with the mounted memory."""
    results = porcelain.generate(_store(store), prompts, max_new_tokens=max_new_tokens, memory=not no_memory)
    if json_out:
        return render.emit_json(results)
    for i, g in enumerate(results):
        if len(results) > 1:  # several prompts: show each with its continuation, blank line between
            render.out.print(("\n" if i else "") + g.prompt + g.text, markup=False)
        else:
            render.out.print(g.text, markup=False)


@app.command("eval")
def eval_(
    data: Optional[list[Path]] = typer.Argument(None, help="edits files or benchmark JSON (ZsRE, CounterFact, ...), "
                                                "used in order"),
    ref: Optional[str] = typer.Option(None, "--ref", help="instead of DATA: measure the store's memory at REF on its own "
                                      "edits and record the result on that commit (`wisemem log` shows it)"),
    n_edits: int = typer.Option(10, "-T", help="edits applied sequentially before evaluating"),
    chunks: int = typer.Option(1, "--chunks", help="disjoint T-sized chunks, each on a fresh memory, averaged"),
    method: str = typer.Option("wise-merge", "--method", help="wise-merge, wise-retrieve, memoir, or the baselines "
                                "ft-l (fine-tune W) and grace (key-value codebook)"),
    cycle: bool = typer.Option(False, "--cycle", help="repeat the records when the files hold fewer than T x chunks"),
    one_per_subject: bool = typer.Option(False, "--one-per-subject", help="keep the first record of each subject "
                                         "(ZsRE repeats a question with different targets)"),
    model: Optional[str] = typer.Option(None, "--model", help="model id/path (default: the store's, else embedded)"),
    layer: Optional[int] = typer.Option(None, "--layer"),
    irrelevant: Optional[Path] = typer.Option(None, "--irrelevant", help="file of irrelevant prompts (records' loc/locality_prompt or lines)"),
    family: Optional[str] = typer.Option(None, "--family", help="zsre, counterfact, hallucination, temporal or edits: "
                                         "which metrics apply (default: detected from the records' fields)"),
    no_generation: bool = typer.Option(False, "--no-generation", help="skip generation exact match and token F1"),
    plain: bool = typer.Option(False, "--plain", help="train with the plain full-model loop (speed baseline)"),
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = SetOpt,
    device: str = typer.Option("cpu", "--device"),
    dtype: str = typer.Option("fp32", "--dtype"),
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Apply the first T edits of DATA sequentially to a fresh memory, then measure Rel/Gen/Loc
    (and perplexity for hallucination data, OOD generalisation for temporal data); or, with
    --ref, measure a commit of the store on its own edits and record it."""
    from memstore.evaluate.api import evaluate

    if ref is not None:
        return _eval_ref(ref, bool(data), not no_generation, _store(store), json_out)
    if not data:
        raise ConfigError("give DATA files to evaluate on, or --ref REF to evaluate a commit of the store")
    overrides = _overrides(config, set_)
    with render.progress(f"editing (T={n_edits}, chunks={chunks})", enabled=True) as update:
        result = evaluate(data, n_edits=n_edits, chunks=chunks, method=method, cycle=cycle,
                          one_per_subject=one_per_subject, model_id=model, layer=layer,
                          irrelevant_file=irrelevant, generation=not no_generation, plain=plain, overrides=overrides,
                          device=device, dtype=dtype, store=_store(store), family=family, progress=update)
    if json_out:
        return render.emit_json(result)
    render.out.print(f"{result['method']}  T={result['n_edits']} x {result['chunks']} chunk(s)  on {result['data']} "
                     f"({result['family']})", markup=False)
    if result["cycled"]:
        render.out.print(f"  records cycled: {result['distinct_edits']} distinct edits, {result['cycled']} passes")
    own = ("perplexity", "perplexity_before", "ood_generalization", "ood_generalization_before")
    for key in ("reliability", "generalization", "locality", *(k for k in own if k in result), "generation_exact_match",
                "rephrase_exact_match", "generation_token_f1", "rephrase_token_f1", "seconds_per_edit"):
        value = result.get(key)
        render.out.print(f"  {key:<24} {value:.4f}" if isinstance(value, float) else f"  {key:<24} {value}")


def _eval_ref(ref: str, has_data: bool, generation: bool, store: Optional[str], json_out: bool) -> None:
    from memstore import history

    if has_data:
        raise ConfigError("--ref evaluates the store's own edits: give DATA or --ref, not both")
    with render.err.status(f"evaluating {ref} on its own edits"):
        result = history.evaluate_ref(store, ref, generation=generation)
    if json_out:
        return render.emit_json(result)
    render.out.print(f"{result.commit_id[:12]}  {render.metrics_line(result.metrics)}  (recorded)", markup=False)


from . import history_cli  # noqa: E402,F401  (registers the history verbs on `app`)
from . import bench_cli  # noqa: E402,F401  (registers `bench`)


def _check_utf8(args: list[str]) -> None:
    """Undecodable argv bytes arrive as lone surrogates (PEP 383) and would fail deep inside
    SQLite or the tokenizer with a traceback, after any training: refuse them up front."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            shown = arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")[:80]
            msg = f"argument '{shown}' is not valid UTF-8; pass messages, refs and prompts as UTF-8 text"
            raise ConfigError(msg) from None


def main() -> None:
    try:
        _check_utf8(sys.argv[1:])
        app(standalone_mode=False)
    except WisememError as exc:
        render.err.print(f"wisemem: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(exit_code(exc))
    except KeyboardInterrupt:
        render.err.print("wisemem: interrupted; the store is unchanged unless a commit was reported")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        if isinstance(exc, _click_types("ClickException")):
            exc.show()
            sys.exit(2)
        if isinstance(exc, _click_types("Abort")):
            sys.exit(130)
        raise


def _click_types(name: str) -> tuple[type, ...]:
    """click's exception class `name` and typer's bundled copy of it (typer >= 0.2x vendors click
    as typer._click, whose exceptions are not click's)."""
    import importlib

    kinds = []
    for module in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            kind = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(kind, type) and issubclass(kind, BaseException):
            kinds.append(kind)
    return tuple(kinds)


if __name__ == "__main__":
    main()

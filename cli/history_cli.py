"""History commands: show, status, diff, merge, revert, checkout, reset, branch, tag, fsck, gc.
Each parses, calls one verb of memstore.history / memstore.maintenance, and renders it."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from memstore import history, maintenance
from memstore.errors import ConfigError

from . import render
from .app import JsonOpt, LockOpt, StoreOpt, _store, app
from .errors import CHECK_FAILED


def _short(cid: Optional[str]) -> str:
    return cid[:12] if cid else "(none)"


@app.command()
def show(ref: str = typer.Argument("HEAD"), store: Optional[str] = StoreOpt, json_out: bool = JsonOpt) -> None:
    """Show a commit: message, edits it added or removed, the shards of its memory."""
    r = history.show(_store(store), ref)
    if json_out:
        return render.emit_json(r)
    c = r.commit
    render.out.print(f"commit {c.id}\nParents: {' '.join(_short(p) for p in c.parents) or '(root)'}\n"
                     f"Author:  {c.author}\nDate:    {c.created_at}\n\n    {c.message}\n", markup=False)
    for e in r.added:
        render.out.print(f"+ [{e.get('id', '')}] {e['prompt']} -> {e['target_new']}", markup=False)
    for eid in r.removed:
        render.out.print(f"- [{eid}]", markup=False)
    threshold = f"{r.threshold:.3f}" if r.threshold is not None else "none"
    render.out.print(f"\n{c.method} store: {c.memories} memor{'y' if c.memories == 1 else 'ies'}, {r.live_edits} live "
                     f"edit(s), router threshold {threshold}" + (" (the loosest memory's)" if c.memories > 1 else ""))
    for s in r.shards:
        own = f" threshold {s.threshold:.3f}" if c.method == "wise-retrieve" and s.threshold is not None else ""
        render.out.print(f"  {s.object_id[:12]} {s.kind:<11} {s.n_edits:>5} edit(s) {s.bytes:>10,} bytes{own}",
                         markup=False)
    for ev in c.evaluations:
        render.out.print(f"eval ({ev['source']}): " + render.metrics_line(ev["metrics"]), markup=False)


@app.command()
def status(store: Optional[str] = StoreOpt, json_out: bool = JsonOpt) -> None:
    """HEAD, the mounted ref, and what is staged."""
    r = history.status(_store(store))
    if json_out:
        return render.emit_json(r)
    where = f"on branch {r.branch}" if r.branch else "HEAD detached"
    render.out.print(f"{where} at {_short(r.head)}: {r.live_edits} live edit(s) in {r.shards} shard(s)"
                     + (f", {r.memories} memories" if r.method == "wise-retrieve" else "") + f" ({r.method} store)")
    render.out.print(f"mounted: {r.mounted}" + (f" ({_short(r.mounted_commit)})" if r.mounted != "none" else ""))
    if r.staged is None:
        render.out.print("nothing staged")
    else:
        s = r.staged
        stale = " (stale: HEAD moved since; unstage and train again)" if s["stale"] else ""
        render.out.print(f"staged: {s['n_edits']} edit(s) on {_short(s['parent_id'])}{stale}; "
                         + render.metrics_line(s["metrics"]), markup=False)


@app.command()
def diff(
    a: str = typer.Argument("HEAD~1"),
    b: str = typer.Argument("HEAD"),
    exit_code: bool = typer.Option(False, "--exit-code", help="exit 1 if there are differences"),
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Edits added/removed/changed from A to B, per-shard parameter changes, router threshold."""
    r = history.diff(_store(store), a, b)
    if json_out:
        render.emit_json(dict(render.to_data(r), has_changes=r.has_changes))
    else:
        for e in r.added:
            render.out.print(f"+ [{e.get('id', '')}] {e['prompt']} -> {e['target_new']}", markup=False)
        for e in r.removed:
            render.out.print(f"- [{e.get('id', '')}] {e['prompt']} -> {e['target_new']}", markup=False)
        for ch in r.changed:
            render.out.print(f"~ [{ch['edit_id']}] {ch['a']['target_new']} -> {ch['b']['target_new']}", markup=False)
        for s in r.shards:
            render.out.print(f"shard {s.status:<8} {s.kind:<11} {_short(s.a)} -> {_short(s.b)}: {s.changed_entries:,} "
                             f"entries changed, |delta| {s.delta_norm:.3f}, mask overlap {s.mask_overlap:.3f}", markup=False)
        if r.threshold_a != r.threshold_b:
            render.out.print(f"router threshold {r.threshold_a} -> {r.threshold_b}")
        if not r.has_changes:
            render.out.print("no differences")
    if exit_code and r.has_changes:
        sys.exit(CHECK_FAILED)


@app.command()
def merge(
    a: str = typer.Argument(..., help="the current branch tip (HEAD or its name); in a wise-retrieve store, or a "
                            "memory of HEAD (shard id from `wisemem show`)"),
    b: str = typer.Argument(..., help="the ref whose memory is merged in; or the second memory"),
    method: str = typer.Option("ties", "--method", help="ties, dare_ties, task_arithmetic, linear"),
    density: Optional[float] = typer.Option(None, "--density", help="fraction of each shard's entries kept"),
    weight: list[float] = typer.Option([], "--weight", help="weight of A's shards, then of B's (give twice)"),
    message: Optional[str] = typer.Option(None, "-m", "--message"),
    lock_timeout: float = LockOpt,
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Merge B's knowledge shards into A's memory (one merged shard; a commit with two parents), or,
    in a wise-retrieve store, two memories of HEAD into one."""
    with render.err.status("merging"):
        r = history.merge(_store(store), a, b, method=method, density=density, weights=weight, message=message,
                          lock_timeout=lock_timeout)
    if json_out:
        return render.emit_json(r)
    render.out.print(f"[{r.commit_id[:12]}] merged {b} into {a} ({method}): {r.live_edits} live edit(s) in "
                     f"{r.shards} shard(s); merged shard {_short(r.object_id)}", markup=False)


@app.command()
def revert(
    ref: Optional[str] = typer.Argument(None, help="commit whose edits to take out"),
    edit: Optional[str] = typer.Option(None, "--edit", help="take out one edit by its id instead"),
    message: Optional[str] = typer.Option(None, "-m", "--message"),
    lock_timeout: float = LockOpt,
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Record a new commit whose memory no longer holds a commit's edits (or one edit)."""
    with render.err.status("reverting (retraining the shards that held the edits)"):
        r = history.revert(_store(store), ref, edit_id=edit, message=message, lock_timeout=lock_timeout)
    if json_out:
        return render.emit_json(r)
    render.out.print(f"[{r.commit_id[:12]}] reverted {len(r.removed)} edit(s): {', '.join(r.removed)}; "
                     f"{r.live_edits} live edit(s) remain", markup=False)


@app.command()
def checkout(ref: str = typer.Argument(...), lock_timeout: float = LockOpt, store: Optional[str] = StoreOpt,
             json_out: bool = JsonOpt) -> None:
    """Point HEAD at a branch, or detach it at any revision."""
    r = history.checkout(_store(store), ref, lock_timeout=lock_timeout)
    if json_out:
        return render.emit_json(r)
    what = f"switched to branch {r.ref}" if r.ref != "HEAD" else "HEAD detached"
    render.out.print(f"{what} at {_short(r.new)}")


@app.command()
def reset(
    ref: str = typer.Argument(...),
    yes: bool = typer.Option(False, "--yes", "-y", help="do not ask before discarding commits from the branch"),
    lock_timeout: float = LockOpt,
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Move the current branch to REF (commits that leave it stay reachable by id)."""
    plan = history.reset(_store(store), ref, dry_run=True, lock_timeout=lock_timeout)
    if plan.discarded and not yes:
        if not sys.stdin.isatty():
            raise ConfigError(f"reset would take {len(plan.discarded)} commit(s) off {plan.ref}; pass --yes")
        if not typer.confirm(f"take {len(plan.discarded)} commit(s) off {plan.ref}?", err=True):
            raise typer.Abort()
    r = history.reset(_store(store), ref, lock_timeout=lock_timeout)
    if json_out:
        return render.emit_json(r)
    render.out.print(f"{r.ref} now at {_short(r.new)} (was {_short(r.old)}; {len(r.discarded)} commit(s) off the branch)")


def _ref_command(verb, kind: str):
    def command(
        name: Optional[str] = typer.Argument(None, help=f"{kind} to create (none: list)"),
        start: str = typer.Argument("HEAD", help="revision it points at"),
        delete: bool = typer.Option(False, "-d", "--delete", help=f"delete the {kind}"),
        lock_timeout: float = LockOpt,
        store: Optional[str] = StoreOpt,
        json_out: bool = JsonOpt,
    ) -> None:
        refs = verb(_store(store), name, start, delete=delete, lock_timeout=lock_timeout)
        if json_out:
            return render.emit_json(refs)
        for r in refs:
            if name is not None:
                render.out.print(f"{'deleted' if delete else 'created'} {kind} {r.name}" +
                                 ("" if delete else f" at {_short(r.commit_id)}"), markup=False)
            else:
                render.out.print(f"{'*' if r.current else ' '} {r.name:<20} {_short(r.commit_id)}", markup=False)

    command.__doc__ = f"List, create or delete {kind}es." if kind == "branch" else f"List, create or delete {kind}s."
    return command


app.command("branch")(_ref_command(history.branch, "branch"))
app.command("tag")(_ref_command(history.tag, "tag"))


@app.command()
def fsck(store: Optional[str] = StoreOpt, json_out: bool = JsonOpt) -> None:
    """Verify the store: objects re-hash, commits, refs, shards and edit records agree (exit 1 if not)."""
    r = maintenance.fsck(_store(store))
    if json_out:
        render.emit_json(dict(render.to_data(r), ok=r.ok))
    else:
        for p in r.problems:
            render.out.print(f"error: {p}", markup=False)
        for oid in r.dangling:
            render.out.print(f"dangling object {oid}", markup=False)
        for f in r.temp_files:
            render.out.print(f"temp file {f} (interrupted write)", markup=False)
        render.out.print(f"checked {r.objects} object(s), {r.commits} commit(s): "
                         + ("ok" if r.ok else f"{len(r.problems)} problem(s)"))
    if not r.ok:
        sys.exit(CHECK_FAILED)


@app.command()
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="list what would be deleted"),
    lock_timeout: float = LockOpt,
    store: Optional[str] = StoreOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Delete objects nothing refers to and temp files of interrupted writes."""
    r = maintenance.gc(_store(store), dry_run=dry_run, lock_timeout=lock_timeout)
    if json_out:
        return render.emit_json(r)
    verb = "would delete" if dry_run else "deleted"
    render.out.print(f"{verb} {len(r.removed)} object(s) and {len(r.temp_files)} temp file(s), {r.bytes_freed:,} bytes")


index_app = typer.Typer(help="The router index (derived data, rebuilt from the stored masks or routing keys).",
                        no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("rebuild")
def index_rebuild(lock_timeout: float = LockOpt, store: Optional[str] = StoreOpt, json_out: bool = JsonOpt) -> None:
    """Rewrite the FAISS router index: every MEMOIR memory's from its masks; a wise-retrieve store's
    (HEAD's memories) from the shards' routing keys."""
    written = maintenance.rebuild_index(_store(store), lock_timeout=lock_timeout)
    if json_out:
        return render.emit_json({"rebuilt": written})
    render.out.print(f"rebuilt {len(written)} router index file(s)")

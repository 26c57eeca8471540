"""Output: JSON on stdout for scripts (--json), rich text for people; progress goes to stderr."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, highlight=False)


def to_data(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_data(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {k: to_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_data(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(to_data(obj), indent=2, sort_keys=True) + "\n")


@contextmanager
def progress(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr when it is a terminal, else a plain line at most once a minute
    (long benchmark runs are usually logged to a file); yields update(done, total)."""
    if not enabled:
        yield lambda done, total: None
        return
    if not err.is_terminal:  # rich would leave a blank line in a log or pipe
        yield _log_lines(description)
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _log_lines(description: str, every: float = 60.0) -> Callable[[int, int], None]:
    start = last = time.monotonic()

    def update(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last < every if done < total else now - start < every:  # a short run stays silent
            return
        last = now
        left = (now - start) / done * (total - done) if done else float("nan")
        sys.stderr.write(f"{description}: {done}/{total} ({done / max(total, 1):.0%}), "
                         f"{_clock(now - start)} elapsed, ~{_clock(left)} left\n")
        sys.stderr.flush()

    return update


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing done yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{secs:02d}s"


def metrics_line(metrics: dict[str, Any]) -> str:
    return "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(metrics.items()))

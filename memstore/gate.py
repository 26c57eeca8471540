"""Commit gates: `wisemem commit --gate "reliability>=0.9,locality>=0.98"` refuses a commit whose
own evaluation misses any condition (exit 1, nothing recorded)."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import ConfigError, GateFailed

# Metrics a gate may name: what `commit_metrics` measures on a commit's own edits.
GATE_METRICS = ("reliability", "generalization", "locality", "generation_exact_match", "rephrase_exact_match")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_CONDITION = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|>|<)\s*([0-9]*\.?[0-9]+)\s*$")


@dataclass(frozen=True)
class GateCondition:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def holds(self, measured: float) -> bool:
        return not math.isnan(measured) and _OPS[self.op](measured, self.value)


def parse_gate(spec: str) -> list[GateCondition]:
    """'reliability>=0.9,locality>=0.98' -> conditions; a malformed spec is a ConfigError."""
    conditions = []
    for part in spec.split(","):
        m = _CONDITION.match(part)
        if m is None:
            raise ConfigError(f"bad --gate condition '{part.strip()}': expected METRIC>=VALUE (or >, <=, <), "
                              f"e.g. reliability>=0.9")
        metric, op, value = m.group(1), m.group(2), float(m.group(3))
        if metric not in GATE_METRICS:
            raise ConfigError(f"--gate: unknown metric '{metric}'; known: {', '.join(GATE_METRICS)}")
        conditions.append(GateCondition(metric, op, value))
    return conditions


def needs_generation(conditions: Sequence[GateCondition]) -> bool:
    return any(c.metric.endswith("exact_match") for c in conditions)


def check_gate(conditions: Sequence[GateCondition], metrics: Mapping[str, float]) -> None:
    """Raise GateFailed naming every condition that does not hold (an unmeasured metric fails)."""
    failed = []
    for c in conditions:
        measured = metrics.get(c.metric, math.nan)
        if not c.holds(measured):
            got = "not measured" if math.isnan(measured) else f"{measured:.3f}"
            failed.append(f"{c.metric} {got} (needs {c.op}{c.value:g})")
    if failed:
        raise GateFailed("gate failed: " + "; ".join(failed) + "; nothing was committed")

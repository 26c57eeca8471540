"""Benchmark families and the metrics each one is scored with (ALGORITHMS.md §4).

A data file's family is read from its record fields (`detect_family`); `wisemem eval --family`
overrides it. Every family gets teacher-forced Rel and Loc and the generation metrics; on top:

- zsre (src/alt/rephrase/loc/loc_ans) and counterfact (case_id, prompt/target_new/rephrase_prompt/
  locality_prompt/locality_ground_truth): Gen on the rephrase. Nothing else.
- hallucination (WISE's SelfCheckGPT edits: prompt/target_new/locality_*, no rephrase): the
  perplexity of the corrected sentence given the prompt, before and after editing (lower is better).
- temporal (WISE's emerging entities: ood_rephrase): OOD generalisation, the fraction of the
  out-of-distribution passage's tokens the model gives probability > 0.8. The OOD passage is a
  different description of the entity, not a rephrased question, so teacher-forced Gen and the
  rephrase generation metrics do not apply (they are null).
- edits (a native edits file): as zsre.

Run: `wisemem eval ../shared/data/temporal/temporal-edit.0-49.json -T 10 --json` (family: temporal).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..edits import _records
from ..errors import ConfigError


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    perplexity: bool = False  # report `perplexity` / `perplexity_before` of target_new given the prompt
    ood: bool = False  # rephrase_prompt holds an OOD passage: report `ood_generalization(_before)`, no Gen

    @property
    def rephrase_is_question(self) -> bool:
        """Whether rephrase_prompt asks for target_new (teacher-forced Gen and rephrase generation apply)."""
        return not self.ood

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """The family's own keys in `wisemem eval --json`, besides those every family has."""
        return (("perplexity", "perplexity_before") if self.perplexity else ()) + \
               (("ood_generalization", "ood_generalization_before") if self.ood else ())


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("zsre", "ZsRE question answering (MEND split): Rel / Gen / Loc"),
    Family("counterfact", "CounterFact counterfactual statements: Rel / Gen / Loc"),
    Family("hallucination", "WISE hallucination (SelfCheckGPT passages): perplexity of the correction, Loc",
           perplexity=True),
    Family("temporal", "WISE temporal (emerging entities): Rel, OOD generalisation, Loc", ood=True),
    Family("edits", "a native edits file: Rel / Gen / Loc"),
)}

HALLUCINATION_FIELDS = {"prompt", "target_new", "subject", "locality_prompt", "locality_ground_truth"}
LONG_TARGET_WORDS = 8  # hallucination targets are sentences (~20 words); ZsRE/CounterFact answers are 1-3


def family_of_records(records: Sequence[dict], name: str = "") -> str:
    """The family of these records, from their fields (and, for hallucination, the file name or long targets)."""
    keys: set[str] = set()
    for r in records:
        if isinstance(r, dict):
            keys |= set(r)
    if "ood_rephrase" in keys:
        return "temporal"
    if keys & {"src", "alt", "loc", "loc_ans"}:
        return "zsre"
    if "case_id" in keys or {"rephrase_prompt", "locality_prompt"} <= keys:
        return "counterfact"
    if "locality_prompt" in keys and keys <= HALLUCINATION_FIELDS:
        targets = [r.get("target_new") for r in records if isinstance(r, dict) and isinstance(r.get("target_new"), str)]
        words = sum(len(t.split()) for t in targets) / max(len(targets), 1)
        if "hallucination" in name.lower() or words >= LONG_TARGET_WORDS:
            return "hallucination"
    return "edits"


def detect_family(path: str | os.PathLike) -> str:
    """The family of one data file (JSON array or JSONL)."""
    return family_of_records([rec for _, rec in _records(Path(path))], Path(path).name)


def resolve_family(paths: Sequence[str | os.PathLike], family: str | None = None) -> Family:
    """`family` if given, else the one family all the files share."""
    if family is not None:
        if family not in FAMILIES:
            raise ConfigError(f"unknown --family '{family}'; available: {', '.join(FAMILIES)}")
        return FAMILIES[family]
    found = {str(p): detect_family(p) for p in paths}
    names = sorted(set(found.values()))
    if len(names) > 1:
        listing = ", ".join(f"{p}: {f}" for p, f in found.items())
        raise ConfigError(f"the data files are of different families ({listing}); pick one with --family")
    return FAMILIES[names[0]]

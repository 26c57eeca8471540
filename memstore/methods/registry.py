"""Registry of editing methods: each method package calls `register_method` once on import."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError
from .base import MethodConfig

_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: type[MethodConfig]
    method_cls: type


METHODS: dict[str, MethodEntry] = {}


def register_method(*, name: str, config_cls: type[MethodConfig], method_cls: type) -> None:
    if not _NAME.match(name):
        raise ValueError(f"malformed method name '{name}'")
    if name in METHODS:
        raise ValueError(f"method '{name}' is already registered")
    METHODS[name] = MethodEntry(name, config_cls, method_cls)


def get_method(name: str) -> MethodEntry:
    _load_builtin()
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def _load_builtin() -> None:
    from . import baselines, memoir, wise  # noqa: F401  (register themselves)

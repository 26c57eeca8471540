"""Typed errors under one root. The CLI maps each type to an exit code (cli/errors.py).

Each subclass also inherits the builtin it behaves like, so library users can catch
either `WisememError` or, say, `KeyError`.
"""

from __future__ import annotations


class WisememError(Exception):
    """Root of every error wisemem raises on purpose."""


class ConfigError(WisememError, ValueError):
    """A hyperparameter, option or config file is invalid."""


class EditFileError(WisememError, ValueError):
    """An edits file cannot be read; carries the line number and field at fault."""

    def __init__(self, path: str, line: int | None, message: str, field: str | None = None):
        self.path, self.line, self.field = path, line, field
        where = f"{path}:{line}" if line is not None else path
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


class UnsupportedArchitecture(WisememError, ValueError):
    """No known edited module for this model type."""


class ModelLoadError(WisememError, OSError):
    """A base model could not be loaded."""


class StoreNotFound(WisememError, FileNotFoundError):
    """No wisemem store at the given place."""


class StoreExists(WisememError, FileExistsError):
    """`init` found a store already there."""


class UnknownRef(WisememError, KeyError):
    """A ref or commit id that names nothing."""

    def __init__(self, spec: str):
        self.spec = spec
        super().__init__(spec)

    def __str__(self) -> str:
        return f"unknown revision '{self.spec}' (see `wisemem log` for valid refs)"


class UnknownEdit(WisememError, KeyError):
    """An edit id that is not in the memory."""

    def __init__(self, edit_id: str):
        self.edit_id = edit_id
        super().__init__(edit_id)

    def __str__(self) -> str:
        return f"no edit '{self.edit_id}' in the memory at HEAD (see `wisemem show` for edit ids)"


class AmbiguousRef(WisememError, KeyError):
    """A hex prefix that matches more than one commit."""

    def __init__(self, prefix: str, candidates: list[str]):
        self.prefix, self.candidates = prefix, candidates
        super().__init__(prefix)

    def __str__(self) -> str:
        shown = ", ".join(c[:12] for c in self.candidates[:8])
        return f"ambiguous revision '{self.prefix}': matches {shown}; give more characters"


class LockTimeout(WisememError, TimeoutError):
    """Another process holds the store's write lock."""


class IntegrityError(WisememError):
    """An object is missing or does not hash to its id."""


class ChecksumMismatch(IntegrityError):
    def __init__(self, oid: str, expected: str, got: str):
        self.oid, self.expected, self.got = oid, expected, got
        super().__init__(f"object {oid} is corrupt: expected sha256 {expected}, got {got}; run `wisemem fsck`")


class ModelMismatch(WisememError):
    """The store is bound to a different base model than the one offered."""


class NothingToCommit(WisememError, ValueError):
    """A commit with no edits."""


class GateFailed(WisememError):
    """A commit's own evaluation missed a `--gate` condition: nothing was recorded."""


class ConcurrentUpdate(WisememError):
    """A ref moved between read and write: the compare-and-swap failed, nothing was written."""


class SchemaVersionMismatch(WisememError):
    """The store's catalog was written by an incompatible version of wisemem."""

"""Exit codes by error type: the only place errors become exit codes (README "Exit codes")."""

from __future__ import annotations

from memstore import errors as E

OK = 0
CHECK_FAILED = 1
USAGE = 2
UNKNOWN_REF = 3
LOCK_TIMEOUT = 4
INTEGRITY = 5
MODEL_MISMATCH = 6

# First match wins, so subclasses come before their bases.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (E.UnknownRef, UNKNOWN_REF),
    (E.AmbiguousRef, UNKNOWN_REF),
    (E.UnknownEdit, UNKNOWN_REF),
    (E.LockTimeout, LOCK_TIMEOUT),
    (E.ConcurrentUpdate, LOCK_TIMEOUT),
    (E.IntegrityError, INTEGRITY),
    (E.ModelMismatch, MODEL_MISMATCH),
    (E.GateFailed, CHECK_FAILED),
    (E.WisememError, USAGE),
]


def exit_code(exc: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return USAGE

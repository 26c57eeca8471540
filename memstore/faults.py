"""Crash points for the crash-safety tests: `WISEMEM_FAULT=<name>` makes the process SIGKILL
itself when it reaches the point of that name, so a test can stop a real `wisemem commit`
during training, during an object write or inside the catalog transaction.

Points: "during-training", "during-object-write", "before-catalog-write", "during-catalog-write".
"""

from __future__ import annotations

import os
import signal


def fault_point(name: str) -> None:
    if os.environ.get("WISEMEM_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)

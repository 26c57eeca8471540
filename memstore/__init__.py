"""wisemem: a versioned knowledge-memory store for LLMs (WISE side memories, Git-like history).

Python API: `Repo.init(path)`, `Repo.open(path).commit("edits.jsonl")`, `Repo.open(path).mount(model)`
on a stock transformers model; `porcelain` has every verb; `load_model()` loads a base model.
"""

from .edits import Edit, load_edits
from .errors import WisememError
from .model import EMBEDDED_MODEL, find_edit_site, load_model
from .mount import MountHandle, mount_layer
from .repo import Repo

__all__ = [
    "EMBEDDED_MODEL",
    "Edit",
    "MountHandle",
    "Repo",
    "WisememError",
    "find_edit_site",
    "load_edits",
    "load_model",
    "mount_layer",
]
__version__ = "0.1.0"

"""The Python API: a store as an object with the CLI's verbs.

    repo = Repo.init("mem", model_id="gpt2")            # or Repo.open(".wisemem")
    repo.commit("edits.jsonl", "fix CEOs")
    handle = repo.mount(model)                          # a stock transformers model
    ...; handle.unmount()

Each method calls the porcelain verb of the same name and returns its dataclass.
"""

from __future__ import annotations

import os
from typing import Any

from . import history, maintenance, porcelain
from .errors import StoreNotFound
from .mount import MountHandle, mount_layer
from .store import Store


class Repo:
    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = porcelain.store_path(path)
        if not Store.exists_at(self.path):
            raise StoreNotFound(f"no wisemem store at {self.path}; create one with `wisemem init`")

    @classmethod
    def open(cls, path: str | os.PathLike | None = None) -> Repo:
        return cls(path)

    @classmethod
    def init(cls, path: str | os.PathLike | None = None, **kwargs: Any) -> Repo:
        porcelain.init(path, **kwargs)
        return cls(path)

    # -- writing history ------------------------------------------------------------------------
    def train(self, edits_file: str | os.PathLike, **kwargs: Any) -> porcelain.TrainResult:
        return porcelain.train(self.path, edits_file, **kwargs)

    def commit(self, edits_file: str | os.PathLike | None = None, message: str | None = None,
               **kwargs: Any) -> porcelain.CommitResult:
        return porcelain.commit(self.path, edits_file, message=message, **kwargs)

    def merge(self, a: str, b: str, **kwargs: Any) -> history.HistoryCommit:
        return history.merge(self.path, a, b, **kwargs)

    def revert(self, ref: str | None = None, *, edit_id: str | None = None, **kwargs: Any) -> history.HistoryCommit:
        return history.revert(self.path, ref, edit_id=edit_id, **kwargs)

    def checkout(self, ref: str) -> history.RefMove:
        return history.checkout(self.path, ref)

    def reset(self, ref: str, **kwargs: Any) -> history.RefMove:
        return history.reset(self.path, ref, **kwargs)

    def branch(self, name: str | None = None, start: str = "HEAD", **kwargs: Any) -> list[history.RefInfo]:
        return history.branch(self.path, name, start, **kwargs)

    def tag(self, name: str | None = None, start: str = "HEAD", **kwargs: Any) -> list[history.RefInfo]:
        return history.tag(self.path, name, start, **kwargs)

    # -- reading history --------------------------------------------------------------------------
    def log(self, ref: str = "HEAD") -> list[porcelain.CommitInfo]:
        return porcelain.log(self.path, ref)

    def show(self, ref: str = "HEAD") -> history.ShowResult:
        return history.show(self.path, ref)

    def status(self) -> history.StatusResult:
        return history.status(self.path)

    def diff(self, a: str, b: str) -> history.DiffResult:
        return history.diff(self.path, a, b)

    def evaluate(self, ref: str = "HEAD", **kwargs: Any) -> history.RefEvaluation:
        """Measure the memory at `ref` on its own edits and record it on the commit (`eval --ref`)."""
        return history.evaluate_ref(self.path, ref, **kwargs)

    def fsck(self) -> maintenance.FsckReport:
        return maintenance.fsck(self.path)

    def rebuild_index(self) -> list[str]:
        return maintenance.rebuild_index(self.path)

    def gc(self, dry_run: bool = False) -> maintenance.GcResult:
        return maintenance.gc(self.path, dry_run=dry_run)

    # -- serving ----------------------------------------------------------------------------------
    def mount(self, model: Any, ref: str | None = None, tokenizer: Any = None) -> MountHandle:
        """Attach the memory at `ref` (default: what `wisemem mount` selected) to `model`.
        The model must be the store's base model; returns a handle whose `unmount()` restores it."""
        session = porcelain.open_session(self.path, model=model, tokenizer=tokenizer)
        try:
            cid = porcelain.mounted_commit(session.store)[1] if ref is None else session.store.resolve(ref)
            return mount_layer(model, session.site, porcelain.memory_layer(session, cid))
        finally:
            session.close()

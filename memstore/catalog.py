"""The SQL catalog of a store (SQLAlchemy Core): the truth about commits, refs, shards and edits.

Portable SQL only (SQLite by default, PostgreSQL by URL); SQLite gets WAL, a busy timeout and
foreign keys. Tables:

    meta            schema_version, checked on open
    binding         the base model (id, revision, edited module, hash of its weights), one row
    commits         immutable: id = sha256 of the canonical row; state_json = the memory state
    commit_parents  every parent of a commit in order (two for a merge)
    edits           every record a commit adds (op "add") or reverts (op "remove"), stable edit ids
    shards          one row per shard object (kind, mask seed, layer, edits, own threshold, router signature)
    commit_shards   which shard objects make up the memory at each commit
    refs            HEAD (symbolic "ref: refs/heads/main" or a commit id), branches, tags
    settings        what is mounted
    staging         a trained, not yet committed memory state (`wisemem train`), one row
    evaluations     metrics measured on a commit (`train`, `eval --ref`)
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from .errors import SchemaVersionMismatch

SCHEMA_VERSION = "2"


class Catalog:
    def __init__(self, url: str):
        self.url = url
        self.engine = sa.create_engine(url)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        md = self.metadata = sa.MetaData()
        T, Int, NN = sa.Text, sa.Integer, {"nullable": False}
        self.meta = sa.Table("meta", md, sa.Column("key", T, primary_key=True), sa.Column("value", T, **NN))
        self.binding = sa.Table(  # exactly one row, id = 1
            "binding", md, sa.Column("id", Int, primary_key=True),
            sa.Column("model_id", T, **NN), sa.Column("revision", T), sa.Column("module_path", T, **NN),
            sa.Column("layer", Int, **NN), sa.Column("weight_hash", T), sa.Column("config_json", T),
            sa.Column("created_at", T, **NN),
        )  # fmt: skip
        self.commits = sa.Table(  # immutable: insert only
            "commits", md, sa.Column("id", T, primary_key=True),
            sa.Column("parent_id", T, sa.ForeignKey("commits.id"), nullable=True),
            sa.Column("message", T, **NN), sa.Column("author", T, **NN), sa.Column("created_at", T, **NN),
            sa.Column("method", T, **NN), sa.Column("config_json", T, **NN), sa.Column("state_json", T, **NN),
        )  # fmt: skip
        self.commit_parents = sa.Table(
            "commit_parents", md, sa.Column("commit_id", T, sa.ForeignKey("commits.id"), primary_key=True),
            sa.Column("position", Int, primary_key=True),
            sa.Column("parent_id", T, sa.ForeignKey("commits.id"), **NN),
        )  # fmt: skip
        self.edits = sa.Table(
            "edits", md, sa.Column("commit_id", T, sa.ForeignKey("commits.id"), primary_key=True),
            sa.Column("position", Int, primary_key=True), sa.Column("edit_id", T, **NN, index=True),
            sa.Column("op", T, **NN), sa.Column("record_json", T, **NN),
        )  # fmt: skip
        self.shards = sa.Table(
            "shards", md, sa.Column("object_id", T, primary_key=True), sa.Column("kind", T, **NN),
            sa.Column("seed", sa.BigInteger), sa.Column("layer", Int, **NN), sa.Column("n_edits", Int, **NN),
            sa.Column("meta_json", T, **NN),
            # Routing of this shard alone: act_ratio x the lowest score of its own edits under it, and
            # the object holding its edits' routing keys (edited layer input, mean over the prompt).
            sa.Column("threshold", sa.Float), sa.Column("signature", T),
        )  # fmt: skip
        self.commit_shards = sa.Table(
            "commit_shards", md, sa.Column("commit_id", T, sa.ForeignKey("commits.id"), primary_key=True),
            sa.Column("position", Int, primary_key=True),
            sa.Column("object_id", T, sa.ForeignKey("shards.object_id"), **NN),
        )  # fmt: skip
        self.refs = sa.Table("refs", md, sa.Column("name", T, primary_key=True), sa.Column("target", T, **NN))
        self.settings = sa.Table("settings", md, sa.Column("key", T, primary_key=True), sa.Column("value", T, **NN))
        self.staging = sa.Table(  # at most one row, id = 1
            "staging", md, sa.Column("id", Int, primary_key=True), sa.Column("parent_id", T),
            sa.Column("state_json", T, **NN), sa.Column("config_json", T, **NN), sa.Column("edits_json", T, **NN),
            sa.Column("metrics_json", T, **NN), sa.Column("created_at", T, **NN),
        )  # fmt: skip
        self.evaluations = sa.Table(
            "evaluations", md, sa.Column("id", Int, primary_key=True, autoincrement=True),
            sa.Column("commit_id", T, sa.ForeignKey("commits.id"), **NN, index=True),
            sa.Column("created_at", T, **NN), sa.Column("source", T, **NN), sa.Column("metrics_json", T, **NN),
        )  # fmt: skip

    def exists(self) -> bool:
        return sa.inspect(self.engine).has_table("meta")

    def create(self, rows: dict[sa.Table, list[dict[str, Any]]]) -> None:
        """Create every table and insert the first `rows` in one transaction: an interrupted
        init leaves no tables, never a half-made catalog."""
        with self.engine.begin() as conn:
            self.metadata.create_all(conn)
            conn.execute(sa.insert(self.meta).values(key="schema_version", value=SCHEMA_VERSION))
            for table, values in rows.items():
                conn.execute(sa.insert(table), values)

    def check_schema(self) -> None:
        """Refuse a catalog written with another schema version."""
        found: str | None = None
        if self.exists():
            with self.engine.connect() as conn:
                found = conn.execute(
                    sa.select(self.meta.c.value).where(self.meta.c.key == "schema_version")
                ).scalar_one_or_none()
        if found != SCHEMA_VERSION:
            raise SchemaVersionMismatch(
                f"store catalog {self.url} has schema version {found or 'none'}, but this wisemem reads "
                f"version {SCHEMA_VERSION}; use a matching wisemem version or re-create the store"
            )

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in ("journal_mode=WAL", "busy_timeout=30000", "foreign_keys=ON"):
        cur.execute(f"PRAGMA {pragma}")
    cur.close()

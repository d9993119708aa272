"""The cluster's config version: which mapping files every instance sharing one database runs.

Two small tables, created on first use (``CREATE TABLE IF NOT EXISTS`` semantics):

* ``config_version``: one row per published version of the mapping files, newest last: ``seq``,
  the ``digest`` (SHA-256 over the files' relative paths and contents), the files' texts (JSON,
  relative path -> text), when and by which instance it was published. The newest row is what the
  deployment runs; an instance that loads its own files (at start, or a reload of changed files)
  publishes them, the others load the texts from here (docs/scale-out.md). The newest
  :data:`KEEP_VERSIONS` are kept.
* ``config_instance``: one row per instance: the version it runs now, when it loaded it, and
  whether its last attempt was ``ok`` or ``refused`` (the texts failed the check; the instance
  keeps its last good mappings) with the first line of why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
from sqlalchemy import BigInteger, Column, DateTime, Integer, MetaData, String, Table, Text, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError

from hms_ach.store.db import Store
from hms_ach.store.port import Tx

_META = MetaData()

VERSIONS = Table(
    "config_version",
    _META,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("digest", String(64), nullable=False),
    Column("files", Text, nullable=False),
    Column("published_at", DateTime(timezone=True), nullable=False),
    Column("instance", String(200), nullable=False),
)

INSTANCES = Table(
    "config_instance",
    _META,
    Column("instance", String(200), primary_key=True),
    Column("seq", BigInteger, nullable=True),
    Column("digest", String(64), nullable=False),
    Column("loaded_at", DateTime(timezone=True), nullable=False),
    Column("status", String(16), nullable=False),
    Column("detail", Text, nullable=True),
)

#: How much of a refusal's text is kept in ``config_instance.detail``.
MAX_DETAIL_CHARS = 2000
#: Versions kept (the newest ones); older rows are deleted when a version is published.
KEEP_VERSIONS = 100


@dataclass(frozen=True)
class Version:
    """A published version (without its texts)."""

    seq: int
    digest: str
    published_at: datetime
    instance: str


@dataclass(frozen=True)
class InstanceState:
    """What one instance runs, as it last recorded."""

    instance: str
    seq: int | None
    digest: str
    loaded_at: datetime
    status: str  # ok | refused
    detail: str | None


def ensure_tables(store: Store) -> None:
    """Create the two tables if they are missing (two instances starting at once: the loser of the
    race finds them made)."""
    try:
        _META.create_all(store.writer, checkfirst=True)
    except DBAPIError:
        _META.create_all(store.writer, checkfirst=True)  # the other instance made them meanwhile


def latest(tx: Tx) -> Version | None:
    """The newest published version, or None before the first."""
    c = VERSIONS.c
    row = tx.execute(
        select(c.seq, c.digest, c.published_at, c.instance).order_by(c.seq.desc()).limit(1)
    ).first()
    return None if row is None else Version(int(row.seq), row.digest, row.published_at, row.instance)


def files_of(tx: Tx, seq: int) -> dict[str, str]:
    """The texts of version ``seq`` (relative path -> text); KeyError if there is no such version."""
    text = tx.execute(select(VERSIONS.c.files).where(VERSIONS.c.seq == seq)).scalar()
    if text is None:
        raise KeyError(f"no config version {seq}")
    files = orjson.loads(text)
    return {str(k): str(v) for k, v in files.items()}


def publish(tx: Tx, digest: str, files: dict[str, str], instance: str) -> int:
    """Publish ``files`` (whose digest is ``digest``) as the newest version; its ``seq``. When the
    newest version has this digest already, nothing is added and its ``seq`` is returned."""
    newest = latest(tx)
    if newest is not None and newest.digest == digest:
        return newest.seq
    seq = tx.execute(
        VERSIONS.insert()
        .values(
            digest=digest,
            files=orjson.dumps(files).decode(),
            published_at=datetime.now(UTC),
            instance=instance,
        )
        .returning(VERSIONS.c.seq)
    ).scalar_one()
    tx.execute(VERSIONS.delete().where(VERSIONS.c.seq <= int(seq) - KEEP_VERSIONS))
    return int(seq)


def record_running(
    tx: Tx, instance: str, seq: int | None, digest: str, status: str, detail: str | None = None
) -> None:
    """Record what ``instance`` runs (``ok``) or refused to run (``refused``, with ``detail``)."""
    values = {
        "instance": instance,
        "seq": seq,
        "digest": digest,
        "loaded_at": datetime.now(UTC),
        "status": status,
        "detail": None if detail is None else detail[:MAX_DETAIL_CHARS],
    }
    insert = pg_insert if tx.dialect.name == "postgresql" else sqlite_insert
    stmt = insert(INSTANCES).values(**values)
    tx.execute(
        stmt.on_conflict_do_update(
            index_elements=["instance"], set_={k: v for k, v in values.items() if k != "instance"}
        )
    )


def instances(tx: Tx) -> list[InstanceState]:
    """Every instance's last record, by name."""
    rows = tx.execute(select(INSTANCES).order_by(INSTANCES.c.instance)).all()
    return [
        InstanceState(
            r.instance, None if r.seq is None else int(r.seq), r.digest, r.loaded_at, r.status, r.detail
        )
        for r in rows
    ]

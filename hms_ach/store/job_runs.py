"""The job runs table (``job_run``): per scheduled job, its last start, outcome and run count,
which ``hms-ach jobs`` shows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hms_ach.store.models import JobRun
from hms_ach.store.port import Tx

RUNS = JobRun.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class LastRun:
    """A job's last run as recorded."""

    name: str
    started_at: datetime | None
    finished_at: datetime | None
    status: str  # running | ok | error ("" before the first start is recorded)
    detail: str | None
    runs: int


def record_start(tx: Tx, name: str) -> None:
    """The job ``name`` starts: status running, one run more."""
    insert = pg_insert if tx.dialect.name == "postgresql" else sqlite_insert
    tx.execute(
        insert(RUNS).values(name=name, status="", runs=0).on_conflict_do_nothing(index_elements=["name"])
    )
    tx.execute(
        update(RUNS)
        .where(RUNS.c.name == name)
        .values(started_at=datetime.now(UTC), status="running", runs=RUNS.c.runs + 1)
    )


def record_end(tx: Tx, name: str, status: str, detail: str) -> None:
    """The job ``name`` finished with ``status`` (ok | error) and a one-line ``detail``."""
    tx.execute(
        update(RUNS)
        .where(RUNS.c.name == name)
        .values(finished_at=datetime.now(UTC), status=status, detail=detail)
    )


def last_runs(tx: Tx) -> dict[str, LastRun]:
    """Every job's last run, by name."""
    return {
        r.name: LastRun(r.name, r.started_at, r.finished_at, r.status, r.detail, r.runs)
        for r in tx.execute(select(RUNS)).all()
    }

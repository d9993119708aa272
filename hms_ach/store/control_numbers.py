"""Persisted counters (table ``control_number``): the 837's ISA13/GS06 and ST02.

A value is handed out in the caller's transaction with the counter's row locked, so no two files
share a control number, across restarts and instances.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from hms_ach.store.models import ControlNumber
from hms_ach.store.port import Tx

COUNTERS = ControlNumber.__table__  # type: ignore[attr-defined]


def next_number(tx: Tx, name: str) -> int:
    """Hand out the next value of a persisted counter (1, 2, ...) in the caller's transaction."""
    ins = pg_insert if tx.dialect.name == "postgresql" else sqlite_insert
    tx.execute(ins(COUNTERS).values(name=name, value=0).on_conflict_do_nothing(index_elements=["name"]))
    current = tx.execute(
        select(COUNTERS.c.value).where(COUNTERS.c.name == name).with_for_update()
    ).scalar_one()
    tx.execute(update(COUNTERS).where(COUNTERS.c.name == name).values(value=current + 1))
    return int(current) + 1

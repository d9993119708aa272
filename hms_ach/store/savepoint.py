"""SAVEPOINTs: a part of a transaction that can fail alone.

``with savepoint(tx):`` runs its block in a SAVEPOINT of the caller's transaction: if the block
raises, only what it wrote is rolled back (and the exception goes on); the rest of the
transaction stays. A unique constraint that refuses a write inside it is raised as the domain
error :class:`~hms_ach.store.errors.UniqueViolation` (a FHIR write answers 409 to it). Jobs that
handle many items (the claim job, a batch Bundle, the records of one message) use it so that one
bad item does not cost the others.

The group-commit writer runs its batches *optimistically* (:func:`optimistic`): without a
SAVEPOINT per job, and a part that would only need its own SAVEPOINT to undo a failure (the
records of one message) runs without one too and raises :class:`SavepointNeeded` instead of
rolling back. The writer then rolls the whole transaction back and runs the batch again with a
SAVEPOINT per job, outside optimistic mode, where the part takes its SAVEPOINT as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.exc import IntegrityError

from hms_ach.store.errors import UniqueViolation
from hms_ach.store.port import Tx


@contextmanager
def savepoint(tx: Tx) -> Iterator[None]:
    """A SAVEPOINT around the block: released when it succeeds, rolled back when it raises."""
    nested = tx.begin_nested()
    try:
        yield
    except IntegrityError as exc:
        nested.rollback()
        raise UniqueViolation(type(exc.orig).__name__) from exc
    except BaseException:
        nested.rollback()
        raise
    nested.commit()


_OPTIMISTIC = "hms_ach.savepoint.optimistic"


class SavepointNeeded(Exception):  # noqa: N818 - a signal to the writer, not an error of the job
    """A part of a job failed where it would have rolled back to its own SAVEPOINT; raised only in
    optimistic mode, for the writer to run the batch again with SAVEPOINTs."""


@contextmanager
def optimistic(tx: Any) -> Iterator[None]:
    """The writer's batch runs on ``tx`` without SAVEPOINTs (see the module's description)."""
    tx.info[_OPTIMISTIC] = True
    try:
        yield
    finally:
        try:
            tx.info.pop(_OPTIMISTIC, None)
        except Exception:  # noqa: BLE001 - invalidated (the server ended it): its info went with it
            pass


def is_optimistic(tx: Tx) -> bool:
    """Whether ``tx`` runs a writer batch optimistically: a failure that would roll back to a
    SAVEPOINT raises :class:`SavepointNeeded` instead."""
    info = getattr(tx, "info", None)
    return bool(info and info.get(_OPTIMISTIC))

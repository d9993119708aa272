"""SAVEPOINTs: a part of a transaction that can fail alone.

``with savepoint(tx):`` runs its block in a SAVEPOINT of the caller's transaction: if the block
raises, only what it wrote is rolled back (and the exception goes on); the rest of the
transaction stays. A unique constraint that refuses a write inside it is raised as the domain
error :class:`~hms_ach.store.errors.UniqueViolation` (a FHIR write answers 409 to it). Jobs that
handle many items (the claim job, a batch Bundle, the records of one message) use it so that one
bad item does not cost the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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

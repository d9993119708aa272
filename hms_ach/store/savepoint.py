"""SAVEPOINTs: a part of a transaction that can fail alone.

``with savepoint(tx):`` runs its block in a SAVEPOINT of the caller's transaction: if the block
raises, only what it wrote is rolled back (and the exception goes on); the rest of the
transaction stays. A job that handles many items (the claim job, one encounter each) uses it so
that one bad item does not cost the others.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from hms_ach.store.port import Tx


@contextmanager
def savepoint(tx: Tx) -> Iterator[None]:
    nested = tx.begin_nested()
    try:
        yield
    except BaseException:
        nested.rollback()
        raise
    nested.commit()

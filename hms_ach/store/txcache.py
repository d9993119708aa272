"""Values cached for the length of one write transaction (the audit chain's last hash, ...).

:func:`cache` is a dict attached to the connection. It is emptied whenever the transaction
begins, commits or rolls back, and whenever a SAVEPOINT is rolled back, so a value read or
written inside work that was undone is never reused. Code that writes a value it caches must
write it after the statement that makes it true succeeded.

The listeners are attached to every SQLAlchemy engine once, by :func:`install` (called by
:func:`hms_ach.store.db.make_engine`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine

_KEY = "hms_ach.txcache"
_installed = False


def cache(conn: Connection) -> dict[str, Any]:
    """The transaction-scoped cache of ``conn`` (empty at the start of every transaction)."""
    found = conn.info.get(_KEY)
    if found is None:
        found = conn.info[_KEY] = {}
    return found


def _forget(conn: Connection, *_args: Any) -> None:
    if conn.invalidated or conn.closed:  # no DBAPI connection to reach; the next "begin" empties it
        return
    conn.info.pop(_KEY, None)


def install() -> None:
    """Attach the listeners that empty the cache (idempotent)."""
    global _installed
    if _installed:
        return
    for name in ("begin", "commit", "rollback", "rollback_savepoint"):
        event.listen(Engine, name, _forget)
    _installed = True

"""Values cached for the length of one write transaction (the audit chain's last hash, ...).

:func:`cache` is a dict attached to the connection. It is emptied whenever the transaction
begins, commits or rolls back, and whenever a SAVEPOINT is rolled back, so a value read or
written inside work that was undone is never reused. Code that writes a value it caches must
write it after the statement that makes it true succeeded.

The listeners are attached to every SQLAlchemy engine once, by :func:`install` (called by
:func:`hms_ach.store.db.make_engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, event
from sqlalchemy.engine import Engine

_KEY = "hms_ach.txcache"
_KEPT = "hms_ach.txcache.kept"
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


@dataclass
class _Kept:
    """Rows a transaction keeps to write at its end, in order; ``marks``: how many there were when
    each open SAVEPOINT was made, innermost last (SAVEPOINTs end in the reverse order they began;
    SQLAlchemy names an automatic one only after its event), so that rolling one back drops the
    rows kept since it was made."""

    rows: list[Any] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)


def keep(conn: Connection) -> None:
    """From now to the end of ``conn``'s transaction, rows may be kept to write at its end
    (:func:`kept`, :func:`take_kept`): a SAVEPOINT rolled back drops the rows kept since it was
    made, a rollback drops them all, and a COMMIT with rows still kept fails (they would be lost)."""
    conn.info[_KEPT] = _Kept()


def kept(conn: Connection) -> list[Any] | None:
    """The list to append kept rows to, or None when ``conn``'s transaction keeps none."""
    found: _Kept | None = conn.info.get(_KEPT)
    return None if found is None else found.rows


def take_kept(conn: Connection) -> list[Any]:
    """The rows kept so far, in order; none are kept from now on."""
    found: _Kept | None = conn.info.pop(_KEPT, None)
    return [] if found is None else found.rows


def _on_savepoint(conn: Connection, _name: str | None) -> None:
    found: _Kept | None = conn.info.get(_KEPT)
    if found is not None:
        found.marks.append(len(found.rows))


def _on_rollback_savepoint(conn: Connection, _name: str, _context: Any) -> None:
    found: _Kept | None = conn.info.get(_KEPT)
    if found is not None and found.marks:
        del found.rows[found.marks.pop() :]


def _on_release_savepoint(conn: Connection, _name: str, _context: Any) -> None:
    found: _Kept | None = conn.info.get(_KEPT)
    if found is not None and found.marks:
        found.marks.pop()


def _on_commit(conn: Connection) -> None:
    found: _Kept | None = conn.info.pop(_KEPT, None)
    if found is not None and found.rows:  # the writer's bug: the COMMIT fails, loudly
        raise RuntimeError(f"{len(found.rows)} rows kept for the end of the transaction were not written")


def _drop_kept(conn: Connection) -> None:
    if not (conn.invalidated or conn.closed):
        conn.info.pop(_KEPT, None)


def install() -> None:
    """Attach the listeners that empty the cache and keep the kept rows right (idempotent). They
    must be attached before an engine is made: one made before does not call them."""
    global _installed
    if _installed:
        return
    for name in ("begin", "commit", "rollback", "rollback_savepoint"):
        event.listen(Engine, name, _forget)
    event.listen(Engine, "savepoint", _on_savepoint)
    event.listen(Engine, "rollback_savepoint", _on_rollback_savepoint)
    event.listen(Engine, "release_savepoint", _on_release_savepoint)
    event.listen(Engine, "commit", _on_commit)
    event.listen(Engine, "rollback", _drop_kept)
    event.listen(Engine, "begin", _drop_kept)  # a transaction keeps nothing until keep() says
    _installed = True

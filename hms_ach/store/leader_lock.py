"""The deployment-wide leader lock: at most one instance holds it (the one that runs the scheduler).

On PostgreSQL it is ``pg_try_advisory_lock`` on a dedicated connection kept open while held (the
key is per schema, so separate deployments in one database do not block each other); when the
holder dies its session ends and the lock is free. SQLite is one process's store: the lock is
always granted.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from hms_ach.store.db import Store

_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtext(:key || current_schema()))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext(:key || current_schema()))"


class LeaderLock:
    """``try_take()`` the lock named ``key`` (non-blocking); ``release()`` it."""

    def __init__(self, store: Store, key: str):
        self.store = store
        self.key = key
        self._conn: Connection | None = None

    def try_take(self) -> bool:
        """True if this instance holds the lock now (taken now or before)."""
        if self.store.dialect != "postgresql":
            return True
        if self._conn is not None:
            return True
        conn = self.store.writer.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            got = bool(conn.execute(text(_LOCK_SQL), {"key": self.key}).scalar())
        except Exception:
            conn.close()
            raise
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def release(self) -> bool:
        """Let the lock go (if held). False: the unlock statement failed; the lock is freed all the
        same, as its session is closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return True
        try:
            conn.execute(text(_UNLOCK_SQL), {"key": self.key})
            return True
        except Exception:  # noqa: BLE001 - closing the session frees the lock anyway
            return False
        finally:
            conn.invalidate()  # never hand a session holding the lock back to the pool
            conn.close()

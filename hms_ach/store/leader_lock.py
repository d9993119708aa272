"""The deployment-wide leader lock: at most one instance holds it (the one that runs the scheduler).

On PostgreSQL it is ``pg_try_advisory_lock`` on a dedicated connection kept open while held (the
key is per schema, so separate deployments in one database do not block each other); when the
holder dies its session ends and the lock is free. The session can also end while the holder
lives on (a network break, ``pg_terminate_backend``, a server restart): :meth:`LeaderLock.still_held`
tells, and the holder must ask before it acts as the leader. SQLite is one process's store: the
lock is always granted.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from hms_ach.store.db import Store

_LOCK_SQL = "SELECT pg_try_advisory_lock(hashtext(:key || current_schema()))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext(:key || current_schema()))"
#: Whether this session holds an advisory lock (the lock's connection holds nothing else).
_HELD_SQL = (
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid())"
)


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

    def still_held(self) -> bool:
        """Whether this instance still holds the lock: its session is alive and has it. False also
        when the session cannot be reached (then :meth:`release` drops it, and ``try_take`` may
        take the lock again on a new session)."""
        if self.store.dialect != "postgresql":
            return True
        if self._conn is None:
            return False
        try:
            return bool(self._conn.execute(text(_HELD_SQL)).scalar())
        except Exception:  # noqa: BLE001 - a broken session holds no lock
            return False

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

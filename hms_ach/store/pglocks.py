"""PostgreSQL transaction-level advisory locks keyed per schema.

Each lock the store takes inside a write transaction (the audit chain's, the access chain's, the
event writers' shared one) uses the two-key form ``(class, hashtext(current_schema()))``: the class
names the lock, the second key the schema, so deployments (or test runs) that share one database
under different schemas never wait on each other's locks. :mod:`hms_ach.store.leader_lock` keys its
session-level lock by schema the same way.
"""

from __future__ import annotations

#: The second key of every lock here: the schema the session writes to.
SCHEMA_KEY = "hashtext(current_schema())"


def xact_lock(lock_class: int, *, shared: bool = False) -> str:
    """The SQL expression that takes lock ``lock_class`` for this schema until the transaction
    ends (shared or exclusive)."""
    if not 0 <= lock_class < 2**31:
        raise ValueError(f"advisory lock class {lock_class:#x} does not fit a 4-byte key")
    fn = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
    return f"{fn}({lock_class}, {SCHEMA_KEY})"


def held_where(lock_class: int, alias: str = "a") -> str:
    """A ``pg_locks`` condition (on ``alias``) that matches lock ``lock_class`` of this schema in
    this database, as :func:`xact_lock` takes it (``objsubid`` 2 marks the two-key form)."""
    return (
        f"{alias}.locktype = 'advisory' AND {alias}.objsubid = 2"
        f" AND {alias}.classid = CAST({lock_class} AS oid)"
        f" AND {alias}.objid = CAST({SCHEMA_KEY} AS oid)"
        f" AND {alias}.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )

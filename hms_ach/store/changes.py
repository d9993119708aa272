"""Change listeners: code that must run in the same transaction as every record change.

Each committed record version is announced once, inside the writing transaction, to every listener
named in :data:`LISTENERS` (the audit trail, the outbox of outbound events...). A listener that
raises rolls the change back with everything else in the transaction: nothing is half-recorded.

A new listener is one function ``listener(conn, change) -> None`` plus one line in LISTENERS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from hms_ach.core.registry import Registry


@dataclass(frozen=True)
class Change:
    """One new version of a record."""

    resource_type: str
    id: str
    version_id: int
    action: str  # create | update | delete
    before: dict[str, Any] | None  # the previous content (None for a create)
    after: dict[str, Any] | None  # the new content, with id and meta (None for a delete)
    message_id: int | None  # the inbound message or request that caused it

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


#: name -> "module:function". Order is the registry's sorted order.
LISTENERS = Registry(
    "change listener",
    {
        "audit": "hms_ach.store.audit:record",
        "outbox": "hms_ach.outbound.events:record",
    },
)


def notify(conn: Connection, change: Change) -> None:
    for name in LISTENERS.names():
        LISTENERS.load(name)(conn, change)

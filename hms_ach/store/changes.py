"""Change listeners: code that must run in the same transaction as every record change.

Each committed record version is announced once, inside the writing transaction, by
:func:`notify`: first to the audit trail (:func:`hms_ach.store.audit.record`, the store's own
listener, always on), then to every listener :func:`subscribe` added, in the order they were
added. A listener that raises rolls the change back with everything else in the transaction:
nothing is half-recorded.

The store knows no listener but its own. The composition root subscribes the others in one place
(:func:`hms_ach.app.wiring.wire_listeners`: the outbox of outbound events, then discharge -> Claim);
a process that writes without it (a script, a test that builds no engine) records the audit trail
only. A new listener is one function ``listener(tx, change) -> None`` plus one line there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from hms_ach.store import audit
from hms_ach.store.port import Tx


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


#: A change listener: runs in the change's own transaction; raising rolls the change back.
Listener: TypeAlias = Callable[[Tx, Change], None]

_listeners: list[Listener] = []


def subscribe(listener: Listener) -> None:
    """Announce every record change to ``listener`` from now on, after the audit trail and the
    listeners subscribed before it. Subscribing a listener that is already subscribed does nothing."""
    if listener not in _listeners:
        _listeners.append(listener)


def notify(tx: Tx, change: Change) -> None:
    """Announce ``change`` in its own transaction: the audit trail, then each subscribed listener."""
    audit.record(tx, change)
    for listener in _listeners:
        listener(tx, change)

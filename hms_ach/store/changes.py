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
#: The same listener for many changes at once, in their order (e.g. one INSERT for all their rows).
ManyListener: TypeAlias = Callable[[Tx, list[Change]], None]

_listeners: list[Listener] = []
_many: dict[Listener, ManyListener] = {}


def subscribe(listener: Listener, many: ManyListener | None = None) -> None:
    """Announce every record change to ``listener`` from now on, after the audit trail and the
    listeners subscribed before it. Subscribing a listener that is already subscribed does nothing.
    ``many``: what :func:`notify_many` calls instead of ``listener`` once per change."""
    if listener not in _listeners:
        _listeners.append(listener)
    if many is not None:
        _many[listener] = many


def notify(tx: Tx, change: Change) -> None:
    """Announce ``change`` in its own transaction: the audit trail, then each subscribed listener."""
    audit.record(tx, change)
    for listener in _listeners:
        listener(tx, change)


def notify_many(tx: Tx, changes: list[Change]) -> None:
    """Announce ``changes`` (in order) in their transaction: the audit trail for all of them, then
    each listener for all of them (its ``many`` variant when it has one). The same rows as
    :func:`notify` per change; only the order of rows *between* tables differs (a listener's
    writes come after the whole group's audit entries)."""
    if not changes:
        return
    audit.record_many(tx, changes)
    for listener in _listeners:
        many = _many.get(listener)
        if many is not None:
            many(tx, changes)
        else:
            for change in changes:
                listener(tx, change)

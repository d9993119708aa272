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

A listener may also say how to make its rows for a change without the store (:class:`Prepared`):
a transaction Bundle's planned entries then have them made before the writer
(:func:`prepare`, in a worker thread), and the writer only inserts them (:func:`notify_many`'s
``prepared``), so that the writer's one job for the whole Bundle is shorter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from hms_ach.store import audit
from hms_ach.store.audit_keys import planned_seal
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


@dataclass(frozen=True)
class Prepared:
    """A listener in two halves: ``make`` its rows for a change (pure: no store, any thread; each
    row a ``(name, text)`` pair), and ``write`` the rows of many changes, in their order."""

    make: Callable[[Change], list[tuple[str, str]]]
    write: Callable[[Tx, list[tuple[str, str]]], None]


#: Rows made ahead by :func:`prepare`: by listener, the rows of one change.
Ahead: TypeAlias = Mapping[Listener, list[tuple[str, str]]]

_listeners: list[Listener] = []
_many: dict[Listener, ManyListener] = {}
_prepared: dict[Listener, Prepared] = {}


def subscribe(listener: Listener, many: ManyListener | None = None, prepared: Prepared | None = None) -> None:
    """Announce every record change to ``listener`` from now on, after the audit trail and the
    listeners subscribed before it. Subscribing a listener that is already subscribed does nothing.
    ``many``: what :func:`notify_many` calls instead of ``listener`` once per change; ``prepared``:
    the same in two halves, so that its rows can be made before the writer (it is then used
    instead of ``many``, and must write the same rows)."""
    if listener not in _listeners:
        _listeners.append(listener)
    if many is not None:
        _many[listener] = many
    if prepared is not None:
        _prepared[listener] = prepared


def prepare(change: Change) -> dict[Listener, list[tuple[str, str]]]:
    """The rows of ``change`` of each listener that can make them ahead (:class:`Prepared`), made
    now (outside the writer). Texts that hold the change's time (a stamp) are fixed at write time."""
    return {listener: p.make(change) for listener, p in _prepared.items() if listener in _listeners}


def prepare_audit(change: Change) -> audit.MadeDiff | None:
    """The audit diff of ``change`` made now (outside the writer), under the seal the process's
    store uses; None when that is not known (the writer makes it then)."""
    seal = planned_seal()
    return None if seal is None else (seal, audit.diff_text(change, seal))


def notify(tx: Tx, change: Change) -> None:
    """Announce ``change`` in its own transaction: the audit trail, then each subscribed listener."""
    audit.record(tx, change)
    for listener in _listeners:
        listener(tx, change)


def notify_many(
    tx: Tx,
    changes: list[Change],
    prepared: Sequence[Ahead | None] | None = None,
    diffs: Sequence[audit.MadeDiff | None] | None = None,
) -> None:
    """Announce ``changes`` (in order) in their transaction: the audit trail for all of them, then
    each listener for all of them (its ``many`` variant when it has one). The same rows as
    :func:`notify` per change; only the order of rows *between* tables differs (a listener's
    writes come after the whole group's audit entries).

    ``prepared``: for each change, the rows :func:`prepare` made ahead (or None); a listener with
    :class:`Prepared` halves writes those, and makes now only the rows not made ahead. ``diffs``:
    for each change, its audit diff made ahead (:func:`prepare_audit`), or None."""
    if not changes:
        return
    audit.record_many(tx, changes, diffs)
    for listener in _listeners:
        halves = _prepared.get(listener)
        if halves is not None:
            rows: list[tuple[str, str]] = []
            for i, change in enumerate(changes):
                ahead = prepared[i] if prepared is not None else None
                made = ahead.get(listener) if ahead is not None else None
                rows.extend(made if made is not None else halves.make(change))
            halves.write(tx, rows)
            continue
        many = _many.get(listener)
        if many is not None:
            many(tx, changes)
        else:
            for change in changes:
                listener(tx, change)

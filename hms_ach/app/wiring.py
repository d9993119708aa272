"""Who hears every record change: the one place the change listeners are subscribed.

The store announces each new record version inside its transaction (:mod:`hms_ach.store.changes`)
to its own audit trail, always, and then to the listeners subscribed here, in this order:

1. :func:`hms_ach.outbound.events.on_change`: the change's events (``encounter.discharged``,
   ``record.changed``...) into the outbox;
2. :func:`hms_ach.billing.claims.on_change`: a discharged encounter gets its Claim (whose own
   change then announces ``claim.created``);
3. :func:`hms_ach.workforce.listeners.on_change`: offboarding (an inactive Practitioner's future
   shifts released) and ``overtime.threshold_reached``;
4. :func:`hms_ach.workforce.survivorship.on_change`: ``practitioner.conflict`` for a conflict the
   survivorship rules could not settle.

It also subscribes the CSV row check (:func:`hms_ach.ingest.csv_rows.use_row_check`): the workforce
rules over what each row wrote (:func:`hms_ach.workforce.record_rules.check_csv_writes`).

:class:`hms_ach.app.runtime.Engine` calls :func:`wire_listeners`; so does every other process that
writes records (``hms-ach replay``, the benchmarks, the tests' stores). A new listener is one
function ``listener(tx, change)`` plus one line in :data:`CHANGE_LISTENERS`.
"""

from __future__ import annotations

from hms_ach.billing import claims
from hms_ach.ingest import csv_rows
from hms_ach.outbound import events
from hms_ach.store import changes
from hms_ach.workforce import listeners, record_rules, survivorship

#: The change listeners after the audit trail, in the order they run.
CHANGE_LISTENERS: tuple[changes.Listener, ...] = (
    events.on_change,
    claims.on_change,
    listeners.on_change,
    survivorship.on_change,
)


#: The listeners that also take many changes at once (the bulk path of a transaction Bundle).
MANY_LISTENERS: dict[changes.Listener, changes.ManyListener] = {events.on_change: events.on_changes}

#: The listeners whose rows for a change can be made before the writer (a transaction Bundle's plan).
PREPARED_LISTENERS: dict[changes.Listener, changes.Prepared] = {
    events.on_change: changes.Prepared(events.prepare_change, events.write_prepared)
}


def wire_listeners() -> None:
    """Subscribe :data:`CHANGE_LISTENERS` to the store's record changes (again: no effect)."""
    for listener in CHANGE_LISTENERS:
        changes.subscribe(listener, MANY_LISTENERS.get(listener), PREPARED_LISTENERS.get(listener))
    csv_rows.use_row_check(record_rules.check_csv_writes)
    survivorship.install()  # Practitioner: merged by source, found by the match policy

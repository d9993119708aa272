"""The events derived from record changes, written to the outbox in the change's own transaction.

:func:`on_change` is a change listener (see :mod:`hms_ach.store.changes`; subscribed by
:func:`hms_ach.app.wiring.wire_listeners`). WHEN an event fires is
decided here, in code, from the record before and after the change (:func:`fired`). WHAT its payload
carries is declared as data, one ``kind: event`` mapping per event in ``mappings/events/`` (with
golden tests beside them), run by the engine the runtime hands over with :func:`use_engine` (and
again after every mapping reload). An event without a mapping carries the base payload
(``resource``, ``versionId``). Event names are stable and payloads are versioned (``"version": 1``);
they carry FHIR references (``Encounter/123``) and codes, never names, birth dates or identifiers:
a receiver that needs more reads the record through the API.

The events a job or a sink emits (not a record change) are declared the same way: the code that
knows the facts (a credential's expiry, a claim file's control numbers...) hands them to
:func:`payload_from`, which runs the event's mapping over them (and falls back to the facts as
they are without an engine or a mapping).

| event | when |
|---|---|
| encounter.admitted | an Encounter is created in-progress, or moves to in-progress from planned (or no status) |
| encounter.admission_pending | an Encounter is created planned, or moves to planned (A05, A14) |
| encounter.transferred | the current location (location[0]) of an in-progress Encounter changes |
| encounter.transfer_pending / encounter.transfer_pending_cancelled | a planned location appears / is withdrawn (A15 / A26) |
| encounter.class_changed | the class of an existing Encounter changes (A06, A07) |
| encounter.leave_started / encounter.leave_ended | the status becomes onleave / goes from onleave to in-progress (A21 / A22) |
| encounter.discharge_pending / encounter.discharge_pending_cancelled | the expected discharge is set / removed (A16 / A25) |
| encounter.discharged | an Encounter's status becomes finished |
| encounter.discharge_cancelled | a finished Encounter is in progress again (A13) |
| encounter.cancelled | an Encounter's status becomes entered-in-error or cancelled |
| bed.status_changed | a Location's operationalStatus code changes |
| practitioner.onboarded / practitioner.updated | a Practitioner is created / changed |
| shift.updated | a Shift is created or changed |
| timecard.recorded | a Timecard is created or changed |
| claim.created | a Claim is created (see :mod:`hms_ach.billing.claims`) |
| claim.file_written / claim.file_rejected / claim.error | the 837 sink's outcome for a claim (:mod:`hms_ach.billing.x12_837`) |
| credential.expiring / credential.expired / credential.escalated | emitted by the scheduler (:mod:`hms_ach.workforce.credentials`) |
| practitioner.offboarded / overtime.threshold_reached | emitted by the workforce rules (:mod:`hms_ach.workforce.listeners`) |
| practitioner.conflict | two sources disagree on a Practitioner element and no survivorship rule ranks them (:mod:`hms_ach.workforce.survivorship`) |
| case.created / case.assigned / case.unassigned | emitted by the review cases (:mod:`hms_ach.cases.api`): a case opened, given to a reviewer, or queued with nobody qualifying |
| case.status_changed / case.escalated / case.resolved | a case moved between workflow states (:mod:`hms_ach.cases.transitions`); escalated: into the workflow's escalation state; resolved: into a final state |
| complaint.logged / complaint.routed / complaint.acknowledged / complaint.resolved | emitted by the complaints (:mod:`hms_ach.cases.complaints`): a complaint logged, routed to its department (and officer, or queued), acknowledged to the complainant, resolved with the notice to the complainant |
| case.findings_submitted / case.signed | a case's findings were stored (with their policy violations counted by severity) / signed (a Provenance with a JWS) (:mod:`hms_ach.cases.findings`) |
| case.sla_breached / case.handed_back | emitted by the case_timers job: a case stayed past its state's SLA (:mod:`hms_ach.cases.sla`; once per entry into the state), a reviewer who left handed a case back (:mod:`hms_ach.cases.handback`) |
| case.commented | a comment (Communication) was added to a case (:mod:`hms_ach.cases.flow_api`); the payload carries references, never the text |
| record.changed | every new version of a FHIR resource record (the change feed of the fhir_push sink) |

``record.changed`` (payload: resource, versionId, action create|update|delete) is the change feed:
a sink pattern ``*`` does not match it (see :meth:`SinkSettings.wants`); a sink names it to get it.
It is written only while a running engine has such a sink (:func:`subscribe_change_feed`), so a
deployment without one pays nothing for it; record history keeps every version regardless.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from hms_ach.core.records import MIRRORED
from hms_ach.core.redact import error_kind
from hms_ach.store import outbox
from hms_ach.store.changes import Change
from hms_ach.store.port import Tx

if TYPE_CHECKING:
    from hms_ach.mapping.engine import MappingEngine

log = logging.getLogger("hms_ach.outbound.events")

EVENT_NAMES = (
    "encounter.admitted",
    "encounter.admission_pending",
    "encounter.transferred",
    "encounter.transfer_pending",
    "encounter.transfer_pending_cancelled",
    "encounter.class_changed",
    "encounter.leave_started",
    "encounter.leave_ended",
    "encounter.discharge_pending",
    "encounter.discharge_pending_cancelled",
    "encounter.discharged",
    "encounter.discharge_cancelled",
    "encounter.cancelled",
    "bed.status_changed",
    "practitioner.onboarded",
    "practitioner.updated",
    "credential.expiring",
    "credential.expired",
    "credential.escalated",
    "practitioner.offboarded",
    "practitioner.conflict",
    "overtime.threshold_reached",
    "shift.updated",
    "timecard.recorded",
    "claim.created",
    "claim.file_written",
    "claim.file_rejected",
    "claim.error",
    "record.changed",
    "case.created",
    "case.assigned",
    "case.unassigned",
    "case.status_changed",
    "case.escalated",
    "case.resolved",
    "complaint.logged",
    "complaint.routed",
    "complaint.acknowledged",
    "complaint.resolved",
    "case.findings_submitted",
    "case.signed",
    "case.sla_breached",
    "case.handed_back",
    "case.commented",
)

#: The record types whose every change is announced as ``record.changed``: those the fhir_push sink
#: may mirror (``mirrored`` in RECORD_TYPES).
CHANGE_FEED_TYPES = frozenset(MIRRORED)


_feed_subscribers = 0
_engine: MappingEngine | None = None


def subscribe_change_feed() -> None:
    """A sink that wants ``record.changed`` has started in this process: write the change feed."""
    global _feed_subscribers
    _feed_subscribers += 1


def unsubscribe_change_feed() -> None:
    global _feed_subscribers
    _feed_subscribers = max(0, _feed_subscribers - 1)


def use_engine(engine: MappingEngine | None) -> None:
    """Build payloads with this engine's event mappings (the runtime calls it at start and on every
    mapping reload). Without one, every event carries the base payload only."""
    global _engine
    _engine = engine


def current_engine() -> MappingEngine | None:
    """The engine :func:`use_engine` set (the mapping set a sink reads its transforms from)."""
    return _engine


def _ref(value: Any) -> str | None:
    if isinstance(value, dict):
        ref = value.get("reference")
        return ref if isinstance(ref, str) and ref else None
    return None


def _current_location(enc: dict[str, Any]) -> str | None:
    locations = enc.get("location") or []
    return _ref(locations[0].get("location")) if locations and isinstance(locations[0], dict) else None


def _code(value: Any) -> str | None:
    if isinstance(value, dict):
        if "code" in value:
            return str(value["code"])
        codings = value.get("coding") or []
        if codings and isinstance(codings[0], dict):
            return codings[0].get("code")
    return None


def _base(change: Change) -> dict[str, Any]:
    return {"resource": change.reference, "versionId": change.version_id}


def payload_from(event: str, context: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The payload of ``event`` as its mapping (mappings/events/) declares it, from ``context``: the
    facts the emitting code knows, the sources of the mapping's rules (``resource``, the record the
    event is about, and whatever else the code hands over).

    No engine, no mapping for the event, or a mapping that fails on these facts: ``base``, so that
    the event is still written. Safe to call from any thread (the engine is the one :func:`use_engine`
    set for the process).
    """
    engine = _engine
    if engine is None:
        return base
    try:
        built = engine.map_event(event, context)
    except Exception as exc:  # noqa: BLE001 - a payload rule must never cost the event (or roll back its cause)
        log.error(
            "events.payload_failed",
            extra={
                "event": event,
                "resource": context.get("resource"),
                "error": error_kind(exc),
            },
        )
        return base
    return base if built is None else built


def payload(event: str, change: Change) -> dict[str, Any]:
    """The payload of ``event`` as its mapping (mappings/events/) declares it, from ``change``.

    No mapping for the event, no engine, or a mapping that fails on this record: the base payload
    (resource, versionId), so that the change and its event are still written.
    """
    if _engine is None:  # the write path of every record change: build no context for nothing
        return _base(change)
    context: dict[str, Any] = {
        "resource": change.reference,
        "versionId": change.version_id,
        "action": change.action,
    }
    if change.after is not None:
        context["after"] = change.after
    if change.before is not None:
        context["before"] = change.before
    return payload_from(event, context, _base(change))


#: the extension an A16 pending discharge sets (mappings/resources/encounter.yaml)
EXPECTED_DISCHARGE = "urn:hms-ach:extension:expected-discharge"


def _planned_locations(enc: dict[str, Any]) -> set[str]:
    return {
        ref
        for item in enc.get("location") or []
        if isinstance(item, dict) and item.get("status") == "planned"
        for ref in [_ref(item.get("location"))]
        if ref
    }


def _expects_discharge(enc: dict[str, Any]) -> bool:
    return any(isinstance(e, dict) and e.get("url") == EXPECTED_DISCHARGE for e in enc.get("extension") or [])


def encounter_events(change: Change) -> list[str]:
    after = change.after
    if after is None:
        return []
    before = change.before or {}
    status, old_status = after.get("status"), before.get("status") if change.before is not None else None
    out: list[str] = []
    if status == "planned" and old_status != "planned":
        out.append("encounter.admission_pending")
    if status == "in-progress" and old_status == "finished":
        out.append("encounter.discharge_cancelled")
    elif status == "in-progress" and old_status == "onleave":
        out.append("encounter.leave_ended")
    elif status == "in-progress" and old_status != "in-progress":
        out.append("encounter.admitted")
    elif (
        status == "in-progress"
        and change.before is not None
        and _current_location(before)
        and _current_location(after) != _current_location(before)
    ):
        out.append("encounter.transferred")
    if status == "onleave" and old_status != "onleave":
        out.append("encounter.leave_started")
    if change.before is not None:
        if _code(after.get("class")) != _code(before.get("class")) and _code(before.get("class")):
            out.append("encounter.class_changed")
        planned, was_planned = _planned_locations(after), _planned_locations(before)
        if planned - was_planned:
            out.append("encounter.transfer_pending")
        current = _current_location(after)
        if any(ref != current for ref in was_planned - planned):
            out.append("encounter.transfer_pending_cancelled")
        if _expects_discharge(after) and not _expects_discharge(before):
            out.append("encounter.discharge_pending")
        elif _expects_discharge(before) and not _expects_discharge(after) and status != "finished":
            out.append("encounter.discharge_pending_cancelled")
    if status == "finished" and old_status != "finished":
        out.append("encounter.discharged")
    if status in ("entered-in-error", "cancelled") and old_status != status:
        out.append("encounter.cancelled")
    return out


def location_events(change: Change) -> list[str]:
    if change.after is None:
        return []
    if _code(change.after.get("operationalStatus")) == _code((change.before or {}).get("operationalStatus")):
        return []
    return ["bed.status_changed"]


def fired(change: Change) -> list[str]:
    """The names of the events one record change causes (none for most changes): WHEN, in code."""
    kind = change.resource_type
    if kind == "Encounter":
        return encounter_events(change)
    if kind == "Location":
        return location_events(change)
    if change.after is None:
        return []
    if kind == "Practitioner":
        return ["practitioner.onboarded" if change.action == "create" else "practitioner.updated"]
    if kind == "Shift":
        return ["shift.updated"]
    if kind == "Timecard":
        return ["timecard.recorded"]
    if kind == "Claim" and change.action == "create":
        return ["claim.created"]
    return []


def derive(change: Change) -> list[tuple[str, dict[str, Any]]]:
    """The events one record change causes, with their payloads (WHAT, from mappings/events/)."""
    return [(event, payload(event, change)) for event in fired(change)]


def on_change(tx: Tx, change: Change) -> None:
    """Change listener: write the change's events to the outbox, in the change's own transaction."""
    if _feed_subscribers and change.resource_type in CHANGE_FEED_TYPES:
        outbox.enqueue(tx, "record.changed", payload("record.changed", change))
    for event, body in derive(change):
        outbox.enqueue(tx, event, body)


def on_changes(tx: Tx, changes: list[Change]) -> None:
    """:func:`on_change` for many changes (a transaction Bundle's), their events written with one
    INSERT, in the same order."""
    write_prepared(tx, [row for change in changes for row in prepare_change(change)])


def prepare_change(change: Change) -> list[tuple[str, str]]:
    """What :func:`on_change` writes for ``change``, made without the store (before the writer, for
    a transaction Bundle's planned entries): each event with its payload as stored text."""
    rows: list[tuple[str, dict[str, Any]]] = []
    if _feed_subscribers and change.resource_type in CHANGE_FEED_TYPES:
        rows.append(("record.changed", payload("record.changed", change)))
    rows.extend(derive(change))
    return [(event, outbox.payload_text(body)) for event, body in rows]


def write_prepared(tx: Tx, rows: list[tuple[str, str]]) -> None:
    """Write the events :func:`prepare_change` made (for many changes, in their order) with one INSERT."""
    if rows:
        outbox.enqueue_many(tx, [(event, text) for event, text in rows])

"""The events derived from record changes, written to the outbox in the change's own transaction.

:func:`record` is a change listener (see :mod:`hms_ach.store.changes`). Event names are stable and
payloads are versioned (``"version": 1``); they carry FHIR references (``Encounter/123``) and codes,
never names, birth dates or identifiers: a receiver that needs more reads the record through the API.

| event | when |
|---|---|
| encounter.admitted | an Encounter is created in-progress, or moves to in-progress |
| encounter.transferred | the current location (location[0]) of an in-progress Encounter changes |
| encounter.discharged | an Encounter's status becomes finished |
| encounter.cancelled | an Encounter's status becomes entered-in-error or cancelled |
| bed.status_changed | a Location's operationalStatus code changes |
| practitioner.onboarded / practitioner.updated | a Practitioner is created / changed |
| shift.updated | a Shift is created or changed |
| timecard.recorded | a Timecard is created or changed |
| claim.created | a Claim is created (see :mod:`hms_ach.outbound.claims`) |
| claim.file_written / claim.file_rejected / claim.error | the 837 sink's outcome for a claim |
| credential.expiring / credential.expired | emitted by the scheduler through :func:`outbox.enqueue` |
| record.changed | every new version of a FHIR resource record (the change feed of the fhir_push sink) |

``record.changed`` (payload: resource, versionId, action create|update|delete) is the change feed:
a sink pattern ``*`` does not match it (see :meth:`SinkSettings.wants`); a sink names it to get it.
It is written only while a running engine has such a sink (:func:`subscribe_change_feed`), so a
deployment without one pays nothing for it; record history keeps every version regardless.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from hms_ach.outbound import outbox
from hms_ach.store.changes import Change

EVENT_NAMES = (
    "encounter.admitted", "encounter.transferred", "encounter.discharged", "encounter.cancelled",
    "bed.status_changed", "practitioner.onboarded", "practitioner.updated",
    "credential.expiring", "credential.expired", "shift.updated", "timecard.recorded",
    "claim.created", "claim.file_written", "claim.file_rejected", "claim.error", "record.changed",
)

#: The record types whose every change is announced as ``record.changed`` (the FHIR resources we keep).
CHANGE_FEED_TYPES = frozenset({"Patient", "Encounter", "Location", "Practitioner", "PractitionerRole",
                               "Organization", "Coverage", "Claim"})


_feed_subscribers = 0


def subscribe_change_feed() -> None:
    """A sink that wants ``record.changed`` has started in this process: write the change feed."""
    global _feed_subscribers
    _feed_subscribers += 1


def unsubscribe_change_feed() -> None:
    global _feed_subscribers
    _feed_subscribers = max(0, _feed_subscribers - 1)


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


def encounter_events(change: Change) -> list[tuple[str, dict[str, Any]]]:
    after = change.after
    if after is None:
        return []
    before = change.before or {}
    status, old_status = after.get("status"), before.get("status") if change.before is not None else None
    payload = {**_base(change), "patient": _ref(after.get("subject")), "status": status,
               "class": _code(after.get("class")), "location": _current_location(after)}
    out: list[tuple[str, dict[str, Any]]] = []
    if status == "in-progress" and old_status != "in-progress":
        out.append(("encounter.admitted", payload))
    elif (status == "in-progress" and change.before is not None
          and _current_location(before) and _current_location(after) != _current_location(before)):
        out.append(("encounter.transferred", {**payload, "previousLocation": _current_location(before)}))
    if status == "finished" and old_status != "finished":
        out.append(("encounter.discharged", payload))
    if status in ("entered-in-error", "cancelled") and old_status != status:
        out.append(("encounter.cancelled", {**payload, "previousStatus": old_status}))
    return out


def location_events(change: Change) -> list[tuple[str, dict[str, Any]]]:
    if change.after is None:
        return []
    new = _code(change.after.get("operationalStatus"))
    old = _code((change.before or {}).get("operationalStatus"))
    if new == old:
        return []
    return [("bed.status_changed", {**_base(change), "status": new, "previousStatus": old,
                                    "partOf": _ref(change.after.get("partOf"))})]


def derive(change: Change) -> list[tuple[str, dict[str, Any]]]:
    """The events one record change causes (none for most changes)."""
    kind = change.resource_type
    if kind == "Encounter":
        return encounter_events(change)
    if kind == "Location":
        return location_events(change)
    if change.after is None:
        return []
    if kind == "Practitioner":
        return [("practitioner.onboarded" if change.action == "create" else "practitioner.updated", _base(change))]
    if kind == "Shift":
        return [("shift.updated", {**_base(change), "practitioner": _ref(change.after.get("practitioner")),
                                   "status": change.after.get("status")})]
    if kind == "Timecard":
        return [("timecard.recorded", {**_base(change), "practitioner": _ref(change.after.get("practitioner"))})]
    if kind == "Claim" and change.action == "create":
        return [("claim.created", {**_base(change), "patient": _ref(change.after.get("patient")),
                                   "encounter": (change.after.get("item") or [{}])[0].get("encounter", [{}])[0]
                                   .get("reference") if change.after.get("item") else None,
                                   "total": (change.after.get("total") or {}).get("value")})]
    return []


def record(conn: Connection, change: Change) -> None:
    """Change listener: enqueue the change's events; at discharge, turn the encounter's charges into a Claim."""
    if _feed_subscribers and change.resource_type in CHANGE_FEED_TYPES:
        outbox.enqueue(conn, "record.changed", {**_base(change), "action": change.action})
    for event, payload in derive(change):
        outbox.enqueue(conn, event, payload)
        if event == "encounter.discharged":
            from hms_ach.outbound.claims import claim_for_encounter

            claim_for_encounter(conn, change.id, change.message_id)

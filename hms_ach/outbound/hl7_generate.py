"""HL7 v2 messages generated from record events, for receivers that speak only HL7 v2: the engine
that runs the ``kind: hl7`` files with a ``generate:`` section (mappings/hl7/, docs/hl7-routing.md).

A generate file says which events it builds a message from, the message type and segments, the
further records it reads (``records:``, each a FHIRPath over the event's record giving a
reference) and, per field, where the value comes from (a FHIRPath, a constant, a code table). The
shipped files build ADT^A01 from ``encounter.admitted``, ADT^A03 from ``encounter.discharged`` and
MFN^M02 from ``practitioner.onboarded`` / ``practitioner.updated``.

This module only reads the records and hands them to :func:`hms_ach.mapping.hl7_transform.generate`:
the record the event is about in the version the event names (``versionId``, so that an admission
delivered after the discharge still shows the admission), the records it points to as they are when
the row is delivered. MSH-10 is ``HMS`` + the event id, the same on every attempt, so that a
receiver can drop a resend.
"""

from __future__ import annotations

from typing import Any

import orjson

from hms_ach.mapping.hl7_transform import GenerateInput, TransformError, compile_fhirpath, generate
from hms_ach.mapping.loader import LoadedFile, MappingSet
from hms_ach.outbound.sinks import Delivery, DeliveryError
from hms_ach.store import resources
from hms_ach.store.db import Store


def generators(mset: MappingSet) -> dict[str, LoadedFile]:
    """Event name -> the generate file that builds its message (``hms-ach check`` refuses two files
    that claim one event)."""
    out: dict[str, LoadedFile] = {}
    for name in sorted(mset.transforms):
        loaded = mset.transforms[name]
        gen = loaded.model.generate
        for event in gen.events if gen is not None else []:
            out.setdefault(event, loaded)
    return out


def _read(store: Store, reference: Any, version: Any = None) -> dict[str, Any] | None:
    """The record ``reference`` names: its version ``version`` when given, else its current version;
    None when the reference is not ``Type/id`` or the record is gone."""
    if not isinstance(reference, str) or "/" not in reference:
        return None
    kind, _, rid = reference.partition("/")
    stored = (
        resources.vread(store, kind, rid, version)
        if isinstance(version, int)
        else resources.read(store, kind, rid)
    )
    if stored is None or stored.deleted:
        return None
    record: dict[str, Any] = orjson.loads(stored.text)
    return record


def build(store: Store, delivery: Delivery, sender: str, facility: str, mset: MappingSet | None) -> bytes:
    """The message of one generated-message event, as ER7 bytes (UTF-8)."""
    loaded = generators(mset).get(delivery.event) if mset is not None else None
    if loaded is None or loaded.model.generate is None:
        raise DeliveryError(
            f"no kind: hl7 file with `generate:` builds a message from {delivery.event}", permanent=True
        )
    gen = loaded.model.generate
    subject = delivery.payload.get("resource")
    record = _read(store, subject, delivery.payload.get("versionId"))
    if record is None:
        raise DeliveryError(f"{subject} no longer exists", permanent=True)
    records = {"record": record}
    for name, read in gen.records.items():
        found = compile_fhirpath(read.reference)(record)
        other = _read(store, found[0] if found else None)
        if other is None and read.required:
            raise DeliveryError(
                f"{loaded.name}: records.{name}: {read.reference} of {subject} names no stored record "
                f"({found[0] if found else 'nothing'!s})",
                permanent=True,
            )
        records[name] = other or {}
    given = GenerateInput(delivery.event, records, delivery.event_id, "", sender, facility)
    tables = {n: f.model for n, f in mset.tables.items()} if mset is not None else {}
    try:
        return generate(loaded.model, given, tables).message
    except TransformError as exc:
        raise DeliveryError(
            f"{loaded.name} failed at {exc.location or '-'}: {exc.message}", permanent=True
        ) from exc

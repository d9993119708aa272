"""HL7 v2.5.1 messages generated from record events, for receivers that speak only HL7 v2.

| event | message | built from |
|---|---|---|
| encounter.admitted | ADT^A01^ADT_A01 (MSH, EVN, PID, PV1) | the Encounter and its subject Patient |
| encounter.discharged | ADT^A03^ADT_A03 (MSH, EVN, PID, PV1) | the Encounter and its subject Patient |
| practitioner.onboarded | MFN^M02^MFN_M02, MFE-1 MAD (MSH, MFI, MFE, STF) | the Practitioner |
| practitioner.updated | MFN^M02^MFN_M02, MFE-1 MUP (MSH, MFI, MFE, STF) | the Practitioner |

The record the event is about is read in the version the event names (``versionId``), the
records it points to (the Patient, the bed) as they are when the row is delivered. The base message
carries the fields below; a sink's ``generate_transform`` (a ``kind: hl7`` mapping) sets what a
receiver needs beyond them (MSH-5/6, local codes) and maps codes through tables. MSH-10 is
``HMS`` + the event id, the same on every attempt, so that a receiver can drop a resend.

* PID-3 every identifier (value^^^^type code), PID-5 the first name (family^given^middle), PID-7
  birthDate, PID-8 gender (M, F, O, U);
* PV1-2 class (IMP I, EMER E, AMB O, other codes as they are), PV1-3 the current location (a bed keyed
  facility/ward/room/bed), PV1-19 the first identifier, PV1-44 / PV1-45 the period's start / end;
* MFI-1 ``PRA`` (table 0175), MFI-3 ``UPD``, MFI-6 ``NE``; MFE-3 the event time; MFE-4 / STF-1 the first
  identifier (value^^system), MFE-5 ``CE``; STF-2 every identifier; STF-3 the name; STF-7 active (A) or not (I).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from hms_ach.outbound.sinks import Delivery, DeliveryError
from hms_ach.store import resources
from hms_ach.store.db import Store

#: event -> (MSH-9, EVN-1 or MFE-1)
GENERATED: dict[str, tuple[str, str]] = {
    "encounter.admitted": ("ADT^A01^ADT_A01", "A01"),
    "encounter.discharged": ("ADT^A03^ADT_A03", "A03"),
    "practitioner.onboarded": ("MFN^M02^MFN_M02", "MAD"),
    "practitioner.updated": ("MFN^M02^MFN_M02", "MUP"),
}

_CLASS = {"IMP": "I", "EMER": "E", "AMB": "O", "PRENC": "P", "OBSENC": "O"}
_GENDER = {"male": "M", "female": "F", "other": "O", "unknown": "U"}


def escape(value: Any) -> str:
    """Text as an ER7 value: the separators escaped (\\F\\ \\S\\ \\T\\ \\R\\ \\E\\), line ends dropped."""
    text = str(value)
    for raw, esc in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(raw, esc)
    return text.replace("\r", " ").replace("\n", " ")


def hl7_time(value: Any) -> str:
    """A FHIR date or dateTime as an HL7 DTM (YYYYMMDD[HHMM[SS]][+ZZZZ]); '' when absent."""
    if not isinstance(value, str) or not value:
        return ""
    if len(value) <= 10:
        return value.replace("-", "")
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return ""
    return moment.strftime("%Y%m%d%H%M%S%z")


def _read(store: Store, reference: Any, version: Any = None) -> dict[str, Any]:
    """The record ``reference`` names: its version ``version`` when given (the one the event is
    about, so that an admission delivered after the discharge still shows the admission), else its
    current version."""
    if not isinstance(reference, str) or "/" not in reference:
        raise DeliveryError(f"the event names no record ({reference!r})", permanent=True)
    kind, _, rid = reference.partition("/")
    if isinstance(version, int):
        stored = resources.vread(store, kind, rid, version)
    else:
        stored = resources.read(store, kind, rid)
    if stored is None or stored.deleted:
        raise DeliveryError(f"{reference} no longer exists", permanent=True)
    record: dict[str, Any] = orjson.loads(stored.text)
    return record


def _identifiers(record: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for i in record.get("identifier") or [] if isinstance(i, dict) and i.get("value")]


def _cx(identifier: dict[str, Any]) -> str:
    codings = (identifier.get("type") or {}).get("coding") or [{}]
    return f"{escape(identifier['value'])}^^^^{escape(codings[0].get('code') or '')}".rstrip("^")


def _xpn(record: dict[str, Any]) -> str:
    names = [n for n in record.get("name") or [] if isinstance(n, dict)]
    if not names:
        return ""
    given = names[0].get("given") or []
    parts = [names[0].get("family") or "", given[0] if given else "", " ".join(given[1:])]
    return "^".join(escape(p) for p in parts).rstrip("^")


def _code(value: Any) -> str:
    if isinstance(value, dict):
        if value.get("code"):
            return str(value["code"])
        codings = value.get("coding") or []
        if codings and isinstance(codings[0], dict):
            return str(codings[0].get("code") or "")
    return ""


def _msh(delivery: Delivery, message_type: str, sender: str, facility: str, now: str) -> str:
    return f"MSH|^~\\&|{escape(sender)}|{escape(facility)}|||{now}||{message_type}|HMS{delivery.event_id}|P|2.5.1"


def _adt(store: Store, delivery: Delivery, msh: str, trigger: str, now: str) -> list[str]:
    enc = _read(store, delivery.payload.get("resource"), delivery.payload.get("versionId"))
    patient = _read(store, (enc.get("subject") or {}).get("reference"))
    pid = [
        "PID",
        "1",
        "",
        "~".join(_cx(i) for i in _identifiers(patient)),
        "",
        _xpn(patient),
        "",
        hl7_time(patient.get("birthDate")),
        _GENDER.get(str(patient.get("gender") or ""), ""),
    ]
    klass = _code(enc.get("class"))
    locations = [loc for loc in enc.get("location") or [] if isinstance(loc, dict)]
    where = ((locations[0].get("location") or {}).get("reference") or "") if locations else ""
    visit = _identifiers(enc)
    period = enc.get("period") or {}
    pv1 = ["PV1", "1", _CLASS.get(klass, klass), _pl(store, where)] + [""] * 15
    pv1 += [escape(visit[0]["value"]) if visit else ""] + [""] * 24
    pv1 += [hl7_time(period.get("start")), hl7_time(period.get("end"))]
    return [msh, f"EVN|{trigger}|{now}", "|".join(pid), "|".join(pv1).rstrip("|")]


def _pl(store: Store, reference: str) -> str:
    """PV1-3 (PL: point of care^room^bed^facility) from a Location keyed ``facility/ward/room/bed``
    (urn:hms-ach:location, as the inbound ADT mappings key beds); '' for any other location."""
    if not reference:
        return ""
    try:
        location = _read(store, reference)
    except DeliveryError:
        return ""
    for identifier in _identifiers(location):
        parts = str(identifier["value"]).split("/")
        if identifier.get("system") == "urn:hms-ach:location" and len(parts) == 4:
            return "^".join(escape(p) for p in [*parts[1:], parts[0]]).rstrip("^")
    return ""


def _mfn(store: Store, delivery: Delivery, msh: str, action: str, now: str) -> list[str]:
    who = _read(store, delivery.payload.get("resource"), delivery.payload.get("versionId"))
    ids = _identifiers(who)
    key = f"{escape(ids[0]['value'])}^^{escape(ids[0].get('system') or '')}".rstrip("^") if ids else ""
    if not key:
        key = escape(str(delivery.payload.get("resource")).partition("/")[2])
    active = "I" if who.get("active") is False else "A"
    stf = ["STF", key, "~".join(_cx(i) for i in ids), _xpn(who), "", "", "", active]
    return [
        msh,
        "MFI|PRA^Practitioner master file^HL70175||UPD|||NE",
        f"MFE|{action}||{now}|{key}|CE",
        "|".join(stf),
    ]


def build(store: Store, delivery: Delivery, sender: str, facility: str) -> bytes:
    """The message of one generated-message event (see the table above), as ER7 bytes (UTF-8)."""
    if delivery.event not in GENERATED:
        raise DeliveryError(f"no HL7 v2 message is generated from {delivery.event}", permanent=True)
    message_type, code = GENERATED[delivery.event]
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")
    msh = _msh(delivery, message_type, sender, facility, now)
    if message_type.startswith("ADT"):
        segments = _adt(store, delivery, msh, code, now)
    else:
        segments = _mfn(store, delivery, msh, code, now)
    return ("\r".join(segments) + "\r").encode("utf-8")

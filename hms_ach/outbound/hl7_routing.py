"""Routing inbound HL7 v2 messages to ``mllp`` sinks: which message goes where, decided from config.

* While an ``mllp`` sink with ``routes:`` runs, :func:`on_message` is subscribed to the ingest
  pipeline (:data:`hms_ach.ingest.pipeline.MESSAGE_ROUTERS`). For every message stored as processed
  it writes one outbox event, ``hl7.received.<channel>.<type>^<event>`` (e.g.
  ``hl7.received.adt_in.ADT^A01``), in the message's own transaction: the event exists exactly when
  the message committed, and before its ACK is sent. The payload carries the stored message's id,
  never its content; the sink reads the raw message at delivery.
* A :class:`Route` matches the event name (channel and message type patterns) when the outbox fans
  events out to the sink, so that a message no route of a sink wants costs that sink nothing. Its
  ``filter`` (an HL7 path test, ``PV1-2 = I``) is tested on the message at delivery; a message it
  refuses is marked delivered with the answer ``not routed``.
* A route's ``fhirpath`` filter (``Encounter.class.code = 'IMP'``) is tested on the records the
  message produced, in the inbound transaction, where the event is written (the records are at hand
  there, and nowhere else as the message made them). It is compiled and checked once, when the
  config is loaded (:func:`record_filter`); each distinct expression of the routes that take the
  event is evaluated once per message, and its outcome kept in the event's payload (``fhirpath``:
  expression -> true/false). At delivery the route admits the message when its expression held.
* Messages stored with an error (AE/AR) are not routed. A replayed message that is processed is
  routed again (at least once: receivers de-duplicate on MSH-10).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from hms_ach.core.records import RECORD_TYPES, MappingResult
from hms_ach.hl7v2.parse import MshHeader
from hms_ach.ingest import pipeline
from hms_ach.mapping.hl7_transform import Er7, compile_fhirpath, parse_path
from hms_ach.store import outbox
from hms_ach.store.messages import MessageMeta
from hms_ach.store.port import Tx

#: The prefix of the routed-message events; only an ``mllp`` sink's routes match them.
EVENT_PREFIX = "hl7.received."
#: An event name is at most 64 characters (the outbox column): the channel name in it is clipped to
#: this many, MSH-9.1 and MSH-9.2 to :data:`_CODE` each (13 + 32 + 1 + 8 + 1 + 8 = 63).
_CHANNEL = 32
_CODE = 8

_FILTER = re.compile(r"^\s*([A-Z][A-Z0-9]{2}-[0-9.]+)\s*(?:(=|!=|in)\s*(.*?))?\s*$")


@dataclass(frozen=True)
class HeaderFilter:
    """``PATH = VALUE``, ``PATH != VALUE``, ``PATH in A, B`` or ``PATH`` (not empty)."""

    path: str
    op: str
    values: tuple[str, ...]

    def holds(self, message: Er7) -> bool:
        value = message.get(parse_path(self.path))
        if self.op == "=":
            return value == self.values[0]
        if self.op == "!=":
            return value != self.values[0]
        if self.op == "in":
            return value in self.values
        return value != ""


def parse_filter(text: str) -> HeaderFilter:
    """A route's ``filter`` text as a test; ValueError saying what is expected."""
    found = _FILTER.match(text)
    if found is None or (found.group(3) or "").startswith(("=", "!")):
        raise ValueError(
            f"filter {text!r}: expected `PATH = VALUE`, `PATH != VALUE`, `PATH in A, B` or `PATH`"
        )
    path, op, rest = found.groups()
    parse_path(path)
    if op is None:
        return HeaderFilter(path, "exists", ())
    values = tuple(v.strip() for v in rest.split(",")) if op == "in" else (rest.strip(),)
    return HeaderFilter(path, op, values)


@dataclass(frozen=True)
class RecordFilter:
    """A FHIRPath test over the records of one type (the expression's first name)."""

    text: str
    resource_type: str
    fn: Any

    def holds(self, records: list[dict[str, Any]]) -> bool:
        """True when the expression gives ``true`` for any record of its type."""
        for record in records:
            if record.get("resourceType") == self.resource_type and self.fn(record) == [True]:
                return True
        return False


@lru_cache(maxsize=512)
def record_filter(text: str) -> RecordFilter:
    """A route's ``fhirpath`` text compiled (once: cached); ValueError saying what is wrong and what is
    expected. The expression starts with a record type (``Encounter.class.code = 'IMP'``)."""
    expected = "expected a FHIRPath expression on a record type, e.g. Encounter.class.code = 'IMP'"
    kind = re.match(r"\s*([A-Z][A-Za-z]*)\b", text)
    if kind is None or kind.group(1) not in RECORD_TYPES:
        known = ", ".join(sorted(RECORD_TYPES))
        raise ValueError(f"fhirpath {text!r}: does not start with a record type ({known}); {expected}")
    try:
        fn = compile_fhirpath(text)
        fn({"resourceType": kind.group(1)})  # a trial run: unknown functions, missing operands
    except Exception as exc:  # noqa: BLE001 - antlr and fhirpathpy raise plain exceptions
        raise ValueError(f"fhirpath {text!r}: {exc}; {expected}") from exc
    return RecordFilter(text, kind.group(1), fn)


class Route(BaseModel):
    """Which inbound messages an ``mllp`` sink forwards, and the transform they go through."""

    model_config = ConfigDict(extra="forbid")

    channel: str = Field("*", description="Inbound channel name (shell pattern)")
    message_types: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Message type and event as in MSH-9, shell patterns: ADT^A01, ADT^A0*, ORU^*",
    )
    filter: str | None = Field(
        None,
        description="An HL7 path test on the message: `PV1-2 = I`, `PV1-2 != O`, `PV1-2 in I, E`, or a path "
        "alone (not empty)",
    )
    fhirpath: str | None = Field(
        None,
        description="A FHIRPath test on the records the message produced, starting with their type: "
        "`Encounter.class.code = 'IMP'`; the message is routed when it is true for any record of that type",
    )
    transform: str | None = Field(
        None, description="A kind: hl7 mapping (mappings/hl7/) applied before sending; none: sent as received"
    )

    @field_validator("filter", "fhirpath")
    @classmethod
    def _filters_compile(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            (parse_filter if info.field_name == "filter" else record_filter)(value)
        return value

    def takes(self, event: str) -> bool:
        """This route wants the routed-message event ``event`` (by channel and message type)."""
        if not event.startswith(EVENT_PREFIX):
            return False
        channel, _, kind = event[len(EVENT_PREFIX) :].rpartition(".")
        return fnmatch.fnmatchcase(channel, self.channel[:_CHANNEL]) and any(
            fnmatch.fnmatchcase(kind, pattern) for pattern in self.message_types
        )

    def admits(self, message: Er7, payload: dict[str, Any]) -> bool:
        """The HL7-path filter holds on ``message`` and the FHIRPath filter held on its records (as
        the event's payload says: a message stored before the route existed has no outcome for it)."""
        if self.filter is not None and not parse_filter(self.filter).holds(message):
            return False
        outcomes = payload.get("fhirpath")
        return self.fhirpath is None or (isinstance(outcomes, dict) and outcomes.get(self.fhirpath) is True)


def event_name(channel: str, header: MshHeader) -> str:
    """``hl7.received.<channel>.<MSH-9.1>^<MSH-9.2>``, each part clipped so that it fits the outbox
    (a sender's long or odd MSH-9 must never fail the message's transaction)."""
    code = header.message_code[:_CODE].replace(".", "_")
    trigger = header.trigger_event[:_CODE].replace(".", "_")
    return f"{EVENT_PREFIX}{channel[:_CHANNEL]}.{code}^{trigger}"


def fhirpath_outcomes(event: str, result: MappingResult | None) -> dict[str, bool]:
    """Each distinct ``fhirpath`` of the running routes that take ``event``, tested on the records of
    ``result`` (evaluated once per message, whatever the number of sinks that share it)."""
    wanted = {
        r.fhirpath for routes in _subscribed for r in routes if r.fhirpath is not None and r.takes(event)
    }
    if not wanted:
        return {}
    records = [{**r.content, "resourceType": r.resource_type} for r in result.records] if result else []
    return {text: record_filter(text).holds(records) for text in sorted(wanted)}


def on_message(
    tx: Tx, meta: MessageMeta, message_id: int, header: MshHeader, result: MappingResult | None
) -> None:
    """Write the routed-message event of a processed message, in its transaction."""
    name = event_name(meta.channel, header)
    payload: dict[str, Any] = {"message": message_id, "channel": meta.channel, "controlId": header.control_id}
    outcomes = fhirpath_outcomes(name, result)
    if outcomes:
        payload["fhirpath"] = outcomes
    outbox.enqueue(tx, name, payload)


#: The routes of the sinks running in this process (one list per sink).
_subscribed: list[list[Route]] = []


def subscribe(routes: list[Route]) -> None:
    """A sink with routes has started in this process: write the routed-message events."""
    _subscribed.append(routes)
    if on_message not in pipeline.MESSAGE_ROUTERS:
        pipeline.MESSAGE_ROUTERS.append(on_message)


def unsubscribe(routes: list[Route]) -> None:
    for i, running in enumerate(_subscribed):
        if running is routes:
            del _subscribed[i]
            break
    if not _subscribed and on_message in pipeline.MESSAGE_ROUTERS:
        pipeline.MESSAGE_ROUTERS.remove(on_message)


def message_id_of(payload: dict[str, Any]) -> int:
    value = payload.get("message")
    if not isinstance(value, int):
        raise ValueError(f"routed-message event without a message id (payload keys: {sorted(payload)})")
    return value

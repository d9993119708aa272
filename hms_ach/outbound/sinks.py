"""What every sink shares: its settings, the delivery it is handed, how it reports failure, and the
contract a sink class meets (:data:`OutboxSink`)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import orjson
from pydantic import BaseModel, ConfigDict, Field

from hms_ach.core.types import Sink


class SinkSettings(BaseModel):
    """Settings every sink has; each sink type's ``Config`` extends this."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Unique sink name; outbox rows are kept per sink")
    type: str = Field(description="Sink type (see hms_ach.outbound.SINK_TYPES)")
    enabled: bool = Field(True, description="false: declared but not delivered to (rows wait)")
    events: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Event names this sink receives; shell patterns (encounter.*)",
    )
    max_age_hours: float = Field(24.0, gt=0, description="Retry a failing row this long, then dead-letter it")
    retry_initial_seconds: float = Field(1.0, gt=0, description="First retry delay; doubled on each failure")
    retry_max_seconds: float = Field(300.0, gt=0, description="Longest delay between two attempts")
    timeout_seconds: float = Field(10.0, gt=0, description="Time limit of one delivery attempt")
    from_beginning: bool = Field(
        False,
        description="A new sink also gets the events stored before it was "
        "declared (default: only the ones after)",
    )

    def wants(self, event: str) -> bool:
        """True if a pattern matches. The change feed (``record.*``) is matched only by patterns naming it,
        so that ``*`` keeps meaning "every business event" and does not pull in every record version;
        the same holds for ``hl7.*`` (inbound messages routed to mllp sinks)."""
        for feed in ("record.", "hl7."):  # hl7.received.*: the routed inbound messages (mllp sinks)
            if event.startswith(feed):
                return any(p.startswith(feed) and fnmatch.fnmatchcase(event, p) for p in self.events)
        return any(fnmatch.fnmatchcase(event, pattern) for pattern in self.events)


@dataclass
class Delivery:
    """One outbox row handed to a sink."""

    row_id: int
    event_id: int
    event: str
    payload: dict[str, Any]
    occurred_at: str
    attempts: int

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt and every sink: receivers drop what they already have."""
        return f"hms-ach-evt-{self.event_id}"

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self.idempotency_key,
            "event": self.event,
            "version": 1,
            "occurredAt": self.occurred_at,
            "data": self.payload,
        }

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


@dataclass
class DeliveryResult:
    """A successful delivery: what to store as the answer, and events to enqueue with it."""

    response: str = ""
    followups: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


class DeliveryError(Exception):
    """A failed attempt. ``permanent``: dead-letter now (no retry); ``retry_after``: seconds asked by the peer."""

    def __init__(
        self,
        message: str,
        *,
        permanent: bool = False,
        retry_after: float | None = None,
        response: str | None = None,
    ):
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after
        self.response = response


#: A running sink, as the outbox dispatcher sees it (the :class:`hms_ach.core.types.Sink` contract
#: with the outbox's types): ``settings``, ``async deliver(Delivery) -> DeliveryResult``, ``async close()``.
OutboxSink: TypeAlias = Sink[SinkSettings, Delivery, DeliveryResult]

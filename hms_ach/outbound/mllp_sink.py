"""The ``mllp`` sink: HL7 v2 messages sent over MLLP to a downstream receiver, its ACK read and kept.

What it sends (see docs/hl7-routing.md):

* **routed** inbound messages: the events ``hl7.received.<channel>.<type>^<event>`` its ``routes``
  match (:mod:`hms_ach.outbound.hl7_routing`), the stored raw message after the route's
  ``transform`` (a ``kind: hl7`` mapping);
* **generated** messages: the record events named in ``events`` (``encounter.admitted``,
  ``encounter.discharged``, ``practitioner.onboarded``, ``practitioner.updated``), built from the
  records (:mod:`hms_ach.outbound.hl7_generate`) and passed through ``generate_transform``.

Delivery is the outbox's: at least once, in order per sink (a row is not sent before the row ahead
of it is delivered or dead). One connection per sink, kept open between messages and reopened after
any failure (a lost connection, a timeout, an unreadable answer), so that a late ACK is never taken
for the next message's. The ACK (MSA-2 = the message's MSH-10) decides: AA or CA is delivered; AE,
AR, CE or CR is dead-lettered or retried as ``on_negative_ack`` says; no ACK within
``ack_timeout_seconds`` is retried with backoff. The row's answer keeps the ACK and the message
sent (``hms-ach outbox show ID``), the ACK first, up to the outbox's 4000 characters.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ssl
from collections import deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ModelWrapValidatorHandler, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from hms_ach.core.tls import client_context
from hms_ach.hl7v2.ack import msa_code
from hms_ach.hl7v2.client import answers, connect, normalise_message
from hms_ach.hl7v2.mllp import Frame, FrameEvent, MllpError, MllpFramer, OversizeFrame, frame
from hms_ach.mapping.hl7_transform import Er7, TransformError, apply, parse_path
from hms_ach.mapping.spec import CodeTable, Hl7TransformMapping
from hms_ach.outbound import events, hl7_generate, hl7_routing
from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, SinkSettings
from hms_ach.store import messages
from hms_ach.store.db import Store

#: The answers of table 0008 that mean the receiver took the message.
ACCEPTED = frozenset({"AA", "CA"})


class MllpClientTls(BaseModel):
    """TLS to the receiver: its certificate is checked against ``host``."""

    model_config = ConfigDict(extra="forbid")

    cafile: str = Field(
        "", description="PEM CA certificate(s) the receiver's certificate must chain to; empty: system CAs"
    )
    cert: str = Field("", description="PEM client certificate to present (mutual TLS); empty: none")
    key: str = Field("", description="PEM private key of cert (empty: inside the cert file)")

    def context(self) -> ssl.SSLContext:
        return client_context(self.cafile or None, self.cert or None, self.key or None)


def _stored_raw(store: Store, message_id: int) -> bytes:
    with store.read() as conn:
        row = messages.get(conn, message_id)
    if row is None:
        raise DeliveryError(f"stored message {message_id} no longer exists", permanent=True)
    return row.raw


def answer_text(sent: bytes, ack: bytes | None) -> str:
    """What the row keeps: the ACK (or none), then the message sent, one segment per line."""

    def lines(data: bytes) -> str:
        return data.decode("utf-8", "replace").replace("\r", "\n").strip()

    return f"ack:\n{lines(ack) if ack is not None else '(none)'}\nsent:\n{lines(sent)}"


class MllpSink:
    class Config(SinkSettings):
        events: list[str] = Field(
            default_factory=list,
            description="Record events to generate messages from, each built by the kind: hl7 file whose "
            "generate: names it: encounter.admitted (ADT^A01), encounter.discharged (ADT^A03), "
            "practitioner.onboarded / practitioner.updated (MFN^M02) are shipped",
        )
        host: str = Field(description="The receiver's host name or address")
        port: int = Field(ge=1, le=65535, description="The receiver's MLLP port")
        tls: MllpClientTls | None = Field(None, description="TLS to the receiver; none: plain TCP")
        connect_timeout_seconds: float = Field(10.0, gt=0, description="Time limit to open the connection")
        ack_timeout_seconds: float = Field(
            30.0,
            gt=0,
            description="Time limit for the ACK of one message (timeout_seconds is raised to connect + ACK when lower)",
        )
        max_ack_bytes: int = Field(1024 * 1024, gt=0, description="Largest ACK read")
        on_negative_ack: Literal["dead-letter", "retry"] = Field(
            "dead-letter",
            description="An AE/AR (CE/CR) answer: dead-letter the row, or retry it with backoff",
        )
        routes: list[hl7_routing.Route] = Field(
            default_factory=list,
            description="Inbound messages forwarded to this receiver (any route matches)",
        )
        generate_transform: str | None = Field(
            None, description="A kind: hl7 mapping applied to generated messages (MSH-5/6 of the receiver...)"
        )
        sending_application: str = Field("HMS-ACH", description="MSH-3 of generated messages")
        sending_facility: str = Field("", description="MSH-4 of generated messages")

        @model_validator(mode="wrap")
        @classmethod
        def _route_errors_name_the_sink(
            cls, data: Any, handler: ModelWrapValidatorHandler[MllpSink.Config]
        ) -> MllpSink.Config:
            try:
                return handler(data)
            except ValidationError as exc:
                raise _naming_the_sink(exc, data) from None

        @model_validator(mode="after")
        def _attempt_fits_its_steps(self) -> MllpSink.Config:
            # the dispatcher gives one attempt timeout_seconds (+5); the connect and the ACK wait fit in it
            self.timeout_seconds = max(
                self.timeout_seconds, self.connect_timeout_seconds + self.ack_timeout_seconds
            )
            return self

        def wants(self, event: str) -> bool:
            if event.startswith(hl7_routing.EVENT_PREFIX):
                return any(route.takes(event) for route in self.routes)
            engine = events.current_engine()  # a generate file of the loaded mappings builds it
            return (
                engine is not None and event in hl7_generate.generators(engine.mset) and super().wants(event)
            )

        def route_for(self, event: str) -> list[hl7_routing.Route]:
            return [route for route in self.routes if route.takes(event)]

    def __init__(self, settings: Config, store: Any = None):
        self.settings = settings
        self.store: Store | None = store
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._framer = MllpFramer(settings.max_ack_bytes)
        self._pending: deque[FrameEvent] = deque()
        self._routing = bool(settings.routes)  # a disabled sink's rows wait too, as for every sink
        if self._routing:
            hl7_routing.subscribe(settings.routes)

    # ------------------------------------------------------------------ what to send
    def _transform(self, name: str | None, raw: bytes) -> bytes:
        if name is None:
            return normalise_message(raw)
        engine = events.current_engine()
        mset = engine.mset if engine is not None else None
        loaded = mset.transforms.get(name) if mset is not None else None
        if mset is None or loaded is None or not isinstance(loaded.model, Hl7TransformMapping):
            raise DeliveryError(f"transform {name!r}: no kind: hl7 mapping of that name is loaded")
        tables: dict[str, CodeTable] = {n: f.model for n, f in mset.tables.items()}
        try:
            return apply(loaded.model, raw, tables).message
        except TransformError as exc:
            raise DeliveryError(
                f"transform {name!r} failed at {exc.location or '-'}: {exc.message}", permanent=True
            ) from exc

    async def _message(self, delivery: Delivery) -> bytes | str:
        """The bytes to send, or why nothing is sent (a filter that refused the message)."""
        if self.store is None:
            raise DeliveryError("the mllp sink needs the store (built without one)", permanent=True)
        if delivery.event.startswith(hl7_routing.EVENT_PREFIX):
            message_id = hl7_routing.message_id_of(delivery.payload)
            raw = await asyncio.to_thread(_stored_raw, self.store, message_id)
            for route in self.settings.route_for(delivery.event):
                try:
                    admitted = route.admits(Er7(raw), delivery.payload)
                except TransformError as exc:
                    raise DeliveryError(
                        f"stored message {message_id}: {exc.message}", permanent=True
                    ) from exc
                if admitted:
                    return self._transform(route.transform, raw)
            return f"not routed: no route's filter admits message {message_id}"
        s = self.settings
        engine = events.current_engine()
        built = await asyncio.to_thread(
            hl7_generate.build,
            self.store,
            delivery,
            s.sending_application,
            s.sending_facility,
            engine.mset if engine is not None else None,
        )
        return self._transform(s.generate_transform, built)

    # ------------------------------------------------------------------ the wire
    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._conn is None:
            s = self.settings
            context = s.tls.context() if s.tls is not None else None
            try:
                async with asyncio.timeout(s.connect_timeout_seconds):
                    self._conn = await connect(s.host, s.port, context, s.connect_timeout_seconds)
            except TimeoutError as exc:
                raise MllpError(f"cannot connect to {s.host}:{s.port}: timed out") from exc
            self._framer = MllpFramer(s.max_ack_bytes)
            self._pending.clear()
        return self._conn

    async def _read_ack(self, reader: asyncio.StreamReader, control_id: str) -> bytes:
        while True:
            while self._pending:
                item = self._pending.popleft()
                if isinstance(item, OversizeFrame):
                    raise MllpError(f"the ACK is {item.size} bytes, over max_ack_bytes")
                if isinstance(item, Frame) and answers(item.payload, control_id):
                    return item.payload
            chunk = await reader.read(65536)
            if not chunk:
                raise MllpError("the receiver closed the connection without an ACK")
            self._pending.extend(self._framer.feed(chunk))

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        message = await self._message(delivery)
        if isinstance(message, str):
            return DeliveryResult(response=message)
        s = self.settings
        control_id = Er7(message).get(_MSH10)
        try:
            reader, writer = await self._connection()
            writer.write(frame(message))
            async with asyncio.timeout(s.ack_timeout_seconds):
                await writer.drain()
                ack = await self._read_ack(reader, control_id)
        except asyncio.CancelledError:
            self._abandon()  # stopped mid-exchange: a late ACK must not meet the next message
            raise
        except TimeoutError as exc:
            await self._drop()
            raise DeliveryError(
                f"no ACK from {s.host}:{s.port} within {s.ack_timeout_seconds} s",
                response=answer_text(message, None),
            ) from exc
        except (MllpError, OSError) as exc:
            await self._drop()
            why = exc.message if isinstance(exc, MllpError) else f"connection failed: {exc}"
            raise DeliveryError(f"{s.host}:{s.port}: {why}", response=answer_text(message, None)) from exc
        code = msa_code(ack.decode("latin-1"))
        answer = answer_text(message, ack)
        if code in ACCEPTED:
            return DeliveryResult(response=answer)
        raise DeliveryError(
            f"the receiver answered {code or 'an ACK without MSA-1'} (on_negative_ack: {s.on_negative_ack})",
            permanent=s.on_negative_ack == "dead-letter",
            response=answer,
        )

    async def close(self) -> None:
        """The sink stops: its connection is closed and its routes stop writing events."""
        await self._drop()
        if self._routing:
            self._routing = False
            hl7_routing.unsubscribe(self.settings.routes)

    def _abandon(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()

    async def _drop(self) -> None:
        """Close the connection (after a failure: the next message opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn[1].close()
            try:
                await asyncio.wait_for(conn[1].wait_closed(), 5)
            except (OSError, TimeoutError):
                pass


_MSH10 = parse_path("MSH-10")


def _naming_the_sink(exc: ValidationError, data: Any) -> ValidationError:
    """``exc`` with its route errors (a filter or fhirpath that does not compile) prefixed with the
    sink's name and the route's index, so that `hms-ach check` names sink, route and expression."""
    name = data.get("name") if isinstance(data, dict) else None
    details: list[InitErrorDetails] = []
    for err in exc.errors():
        loc = err["loc"]
        if loc[:1] == ("routes",) and len(loc) >= 3 and err["type"] == "value_error":
            text = f"sink {name}: routes[{loc[1]}].{'.'.join(str(p) for p in loc[2:])}: {err['ctx']['error']}"
            kind = PydanticCustomError("value_error", "{text}", {"text": text})
            details.append(InitErrorDetails(type=kind, loc=loc, input=err["input"]))
        else:
            details.append(
                InitErrorDetails(type=err["type"], loc=loc, input=err["input"], ctx=err.get("ctx", {}))
            )
    return ValidationError.from_exception_data(exc.title, details)


def unknown_transforms(
    sinks: list[Any], transforms: set[str], source: str = "channels.yaml", generated: set[str] | None = None
) -> list[str]:
    """``hms-ach check``: one line per ``transform:`` / ``generate_transform:`` of an mllp sink that
    names no loaded ``kind: hl7`` mapping (delivery would retry its rows until one is loaded), and,
    given the events the loaded generate files build messages from, per ``events:`` pattern that
    matches none of them."""
    out: list[str] = []
    known = ", ".join(sorted(transforms)) or "none"
    for sink in sinks:
        if not isinstance(sink, MllpSink.Config):
            continue
        named = [(f"routes[{i}].transform", r.transform) for i, r in enumerate(sink.routes)]
        named.append(("generate_transform", sink.generate_transform))
        for where, name in named:
            if name is not None and name not in transforms:
                out.append(
                    f"{source}: sink {sink.name}: {where}: no kind: hl7 mapping is named {name!r} "
                    f"(expected one of: {known})"
                )
        unknown = (
            [p for p in sink.events if not fnmatch.filter(generated, p)] if generated is not None else []
        )
        if unknown:
            out.append(
                f"{source}: sink {sink.name}: events {unknown}: no HL7 v2 message is generated from them "
                f"(expected some of: {', '.join(sorted(generated or [])) or 'none'}; a kind: hl7 file's generate:)"
            )
    return out

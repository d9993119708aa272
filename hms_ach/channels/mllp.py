"""The ``mllp`` channel type: an MLLP listener whose frames go through the pipeline.

Transport (framing, limits, timeouts) is :mod:`hms_ach.hl7v2.mllp`; this module only connects
it to :class:`hms_ach.ingest.pipeline.Pipeline` and states the channel's settings for channels.yaml.

When the store cannot commit a message in time (:class:`~hms_ach.store.errors.StoreUnavailable`:
the database is down or locked, or the writer's deadline passed), the sender gets a negative ACK
(AE, CE in enhanced mode; ERR-3 207 "Application internal error" with a generic text) rather than
a closed connection or no answer: it sends the message again later. Nothing of the message is
half-stored; if its job committed after the deadline, the resend is answered from the duplicate store.
"""

from __future__ import annotations

import logging
import time

from pydantic import Field

from hms_ach.channels.pausing import PauseSwitch
from hms_ach.core import metrics
from hms_ach.core.errors import Err0357, MessageError, RejectError
from hms_ach.core.tls import mllp_tls_with_environment
from hms_ach.core.types import ChannelSettings
from hms_ach.hl7v2.limits import Hl7LimitSettings
from hms_ach.hl7v2.mllp import MllpConfig, MllpServer
from hms_ach.hl7v2.parse import MshHeader, read_header
from hms_ach.hl7v2.policy import Hl7Policy, Hl7PolicySettings, should_send
from hms_ach.ingest.pipeline import Evaluation, Pipeline, ack_for, charset_of
from hms_ach.store import audit
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.messages import MessageMeta

log = logging.getLogger("hms_ach.channels.mllp")


class MllpChannelConfig(ChannelSettings, MllpConfig, Hl7LimitSettings, Hl7PolicySettings):
    """An MLLP listener for HL7 v2 messages."""

    type: str = Field("mllp", description="mllp")


class MllpChannel:
    Config = MllpChannelConfig

    def __init__(self, config: MllpChannelConfig, pipeline: Pipeline):
        self.config = effective_config(config)
        self.pipeline = pipeline
        self.policy = config.hl7_policy(config.name)
        self.server = MllpServer(self.config, self._handle, self._oversize)
        self.pause_switch = PauseSwitch()  # the console's pause: frames wait for the resume

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        await self.server.start()
        tls = self.config.tls
        log.info(
            "channel.started",
            extra={
                "channel": self.config.name,
                "port": self.server.port,
                "tls": "off" if tls is None else ("mtls" if tls.client_ca else "on"),
                "allow_from": ",".join(self.config.allow_from),
            },
        )

    async def stop(self) -> None:
        await self.server.close()

    async def _handle(self, frame: bytes, peer: str) -> bytes | list[bytes] | None:
        """The replies to one frame, after its commit: the ACK, and in enhanced mode the application
        ACK right after it on the same connection, each when MSH-15/16 ask for it. While the channel
        is paused (:mod:`hms_ach.channels.pausing`) the frame waits here, unanswered."""
        await self.pause_switch.wait_until_running()
        started = time.perf_counter()
        try:
            subject = getattr(peer, "cert_subject", None)  # a Peer from the listener (mutual TLS)
            actor = audit.actor_json(
                kind="mllp",
                channel=self.config.name,
                peer=str(peer),
                certificate_subject=str(subject) if subject is not None else None,
            )
            outcome = await self.pipeline.process_hl7(frame, self.policy, actor)
        except StoreUnavailable as exc:
            log.warning(
                "mllp.store_unavailable",
                extra={"channel": self.config.name, "peer": peer, "reason": exc.reason},
            )
            _count(self.config.name, frame, "unavailable", "", started)
            return unavailable_ack(frame, self.policy)
        _count(self.config.name, frame, outcome.status, outcome.ack_code, started)
        return outcome.replies()

    async def _oversize(self, prefix: bytes, size: int, peer: str) -> bytes | None:
        try:
            return await self._record_oversize(prefix, size)
        except StoreUnavailable as exc:
            log.warning(
                "mllp.store_unavailable",
                extra={"channel": self.config.name, "peer": peer, "reason": exc.reason},
            )
            return unavailable_ack(prefix, self.policy)

    async def _record_oversize(self, prefix: bytes, size: int) -> bytes | None:
        error = RejectError(
            f"message of {size} bytes or more exceeds max_message_bytes {self.config.max_message_bytes}",
            "MSH",
            Err0357.VALUE_TOO_LONG,
        )
        outcome = await self.pipeline.record_rejection(prefix, error, self.policy)
        return outcome.ack_bytes()


def _count(channel: str, frame: bytes, status: str, ack_code: str, started: float) -> None:
    """The message and ACK-latency metrics of one answered frame (docs/metrics.md)."""
    try:
        header = read_header(frame)
        message_type = f"{header.message_code}^{header.get(9, 2)}"
    except MessageError:
        message_type = "invalid"
    metrics.MESSAGES.labels(channel, metrics.message_type_label(message_type), status, ack_code).inc()
    metrics.ACK_LATENCY.labels(channel).observe(time.perf_counter() - started)


def effective_config(config: MllpChannelConfig) -> MllpChannelConfig:
    """The channel's settings with the HMS_ACH_MLLP_TLS_* environment variables applied to ``tls``."""
    tls = mllp_tls_with_environment(config.tls)
    return config if tls is config.tls else config.model_copy(update={"tls": tls})


#: The ERR-8 / MSA-3 text of the negative ACK sent when the store cannot commit (no internals).
UNAVAILABLE_TEXT = "the message could not be stored now; send it again later"


def unavailable_ack(frame: bytes, policy: Hl7Policy) -> bytes | None:
    """The AE (CE in enhanced mode) answering ``frame`` when the store is unavailable, ERR-3 207;
    None when the message asked for no negative commit ACK (MSH-15 NE or SU). Never raises."""
    header: MshHeader | None
    try:
        header = read_header(frame)
    except Exception:  # noqa: BLE001 - an unreadable MSH gets the fallback ACK
        header = None
    if header is not None and not should_send(header, "AE"):
        return None
    ev = Evaluation(frame, MessageMeta(channel=policy.channel, raw=frame), header=header)
    error = MessageError(UNAVAILABLE_TEXT, "", Err0357.INTERNAL_ERROR)
    return ack_for(ev, "AE", error).encode(charset_of(ev, policy), errors="replace")

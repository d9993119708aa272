"""The ``mllp`` channel type: an MLLP listener whose frames go through the pipeline.

Transport (framing, limits, timeouts) is :mod:`hms_ach.hl7v2.mllp`; this module only connects
it to :class:`hms_ach.ingest.pipeline.Pipeline` and states the channel's settings for channels.yaml.
"""

from __future__ import annotations

import logging

from pydantic import Field

from hms_ach.app.config import ChannelSettings
from hms_ach.core.errors import Err0357, RejectError
from hms_ach.hl7v2.mllp import MllpConfig, MllpServer
from hms_ach.ingest.pipeline import Hl7Policy, Pipeline

log = logging.getLogger("hms_ach.channels.mllp")


class MllpChannelConfig(ChannelSettings, MllpConfig):
    """An MLLP listener for HL7 v2 messages."""

    type: str = Field("mllp", description="mllp")
    default_charset: str = Field(
        "utf-8", description="Python codec for messages whose MSH-18 is empty (e.g. utf-8, latin-1, ascii)"
    )
    accept_versions: list[str] = Field(
        default_factory=lambda: ["2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "2.7", "2.8"],
        description="MSH-12 versions accepted (2.5 also accepts 2.5.1); others get AR with code 203",
    )
    accept_processing_ids: list[str] = Field(
        default_factory=lambda: ["P", "T", "D"], description="MSH-11 processing ids accepted; others get AR"
    )


class MllpChannel:
    Config = MllpChannelConfig

    def __init__(self, config: MllpChannelConfig, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline
        self.policy = Hl7Policy(
            config.name,
            config.default_charset,
            list(config.accept_versions),
            list(config.accept_processing_ids),
        )
        self.server = MllpServer(config, self._handle, self._oversize)

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        await self.server.start()
        log.info("channel.started", extra={"channel": self.config.name, "port": self.server.port})

    async def stop(self) -> None:
        await self.server.close()

    async def _handle(self, frame: bytes, peer: str) -> bytes | None:
        outcome = await self.pipeline.process_hl7(frame, self.policy)
        return outcome.ack_bytes() if outcome.send else None

    async def _oversize(self, prefix: bytes, size: int, peer: str) -> bytes | None:
        error = RejectError(
            f"message of {size} bytes or more exceeds max_message_bytes {self.config.max_message_bytes}",
            "MSH",
            Err0357.VALUE_TOO_LONG,
        )
        outcome = await self.pipeline.record_rejection(prefix, error, self.policy)
        return outcome.ack_bytes()

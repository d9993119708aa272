"""The ``mllp`` channel type: an MLLP listener whose frames go through the pipeline.

Transport (framing, limits, timeouts) is :mod:`hms_ach.hl7v2.mllp`; this module only connects
it to :class:`hms_ach.ingest.pipeline.Pipeline` and states the channel's settings for channels.yaml.
"""

from __future__ import annotations

import logging

from pydantic import Field

from hms_ach.core.errors import Err0357, RejectError
from hms_ach.core.types import ChannelSettings
from hms_ach.hl7v2.mllp import MllpConfig, MllpServer
from hms_ach.hl7v2.policy import Hl7PolicySettings
from hms_ach.ingest.pipeline import Pipeline

log = logging.getLogger("hms_ach.channels.mllp")


class MllpChannelConfig(ChannelSettings, MllpConfig, Hl7PolicySettings):
    """An MLLP listener for HL7 v2 messages."""

    type: str = Field("mllp", description="mllp")


class MllpChannel:
    Config = MllpChannelConfig

    def __init__(self, config: MllpChannelConfig, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline
        self.policy = config.hl7_policy(config.name)
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

"""The ``fhir_rest`` channel type: FHIR R4 write interactions on the engine's HTTP server under /fhir.

Declared in channels.yaml like any channel; it opens no socket of its own. The write routes are
declared with every other FHIR route in :mod:`hms_ach.fhir.routes` and handled by
:mod:`hms_ach.fhir.write_requests`, which looks this channel up per request for its name, limits
and pipeline. Without an enabled ``fhir_rest`` channel the write routes answer 405.

Interactions: create (``POST /fhir/{type}``, conditional with ``If-None-Exist``), update
(``PUT /fhir/{type}/{id}``, ``If-Match``), conditional update (``PUT /fhir/{type}?identifier=s|v``),
delete (a tombstone version; reads then answer 410) and ``POST /fhir`` with a transaction or batch
Bundle.
"""

from __future__ import annotations

import logging

from pydantic import Field

from hms_ach.core.types import ChannelSettings
from hms_ach.ingest.pipeline import Pipeline

log = logging.getLogger("hms_ach.channels.fhir_rest")


class FhirRestChannelConfig(ChannelSettings):
    """FHIR R4 writes (create, update, delete, transaction/batch Bundles) on the HTTP server at /fhir."""

    type: str = Field("fhir_rest", description="fhir_rest")
    max_body_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Larger request bodies are refused with 413 and never held in memory",
    )
    max_bundle_entries: int = Field(1000, ge=1, description="Bundles with more entries are refused with 413")
    batch_slice_seconds: float = Field(
        0.01,
        gt=0,
        le=10,
        description="A batch Bundle's entries are applied in slices of about this much writer time, each "
        "committed on its own with other channels' messages in between (a transaction Bundle is one commit)",
    )


class FhirRestChannel:
    Config = FhirRestChannelConfig

    def __init__(self, config: FhirRestChannelConfig, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline

    async def start(self) -> None:
        log.info("channel.started", extra={"channel": self.config.name})

    async def stop(self) -> None:
        return None

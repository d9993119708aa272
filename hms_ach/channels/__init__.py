"""Inbound channels. A new channel type is one module plus one line in CHANNEL_TYPES.

Each entry names the module's channel class; the class has a ``Config`` pydantic model extending
:class:`hms_ach.core.types.ChannelSettings` (its ``channels.yaml`` settings, validated by
:mod:`hms_ach.app.config`), is built with ``cls(config, pipeline)`` and run with
``await channel.start()`` / ``await channel.stop()``; it meets :class:`hms_ach.core.types.Channel`,
or :class:`hms_ach.core.types.PollingChannel` when the scheduler polls it. A channel is a
transport only: what it receives goes through :mod:`hms_ach.ingest` (HL7 v2 messages, CSV and
other files), or through :mod:`hms_ach.fhir` for FHIR writes.
"""

from hms_ach.core.registry import Registry

CHANNEL_TYPES = Registry(
    "channel type",
    {
        "mllp": "hms_ach.channels.mllp:MllpChannel",
        "fhir_rest": "hms_ach.channels.fhir_rest:FhirRestChannel",
        "sftp_csv": "hms_ach.channels.sftp_csv:SftpCsvChannel",
        "file_drop": "hms_ach.channels.file_drop:FileDropChannel",
    },
)

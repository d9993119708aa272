"""Inbound channels. A new channel type is one module plus one line in CHANNEL_TYPES.

Each entry names the module's channel class; the class has a ``Config`` pydantic model (its
``channels.yaml`` settings, validated by :mod:`hms_ach.config`) and is built with
``Channel(config, engine)`` and run with ``await channel.start()`` / ``await channel.stop()``.
"""

from hms_ach.registry import Registry

CHANNEL_TYPES = Registry(
    "channel type",
    {
        "mllp": "hms_ach.inbound.mllp_channel:MllpChannel",
        "fhir_rest": "hms_ach.inbound.fhir_rest:FhirRestChannel",
        "sftp_csv": "hms_ach.inbound.sftp_csv:SftpCsvChannel",
    },
)

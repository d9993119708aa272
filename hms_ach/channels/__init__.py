"""Inbound channels. A new channel type is one module plus one line in CHANNEL_TYPES.

Each entry names the module's channel class; the class has a ``Config`` pydantic model (its
``channels.yaml`` settings, validated by :mod:`hms_ach.app.config`) and is built with
``Channel(config, engine)`` and run with ``await channel.start()`` / ``await channel.stop()``.
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

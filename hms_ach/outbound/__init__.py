"""Outbound: the transactional outbox, the events derived from record changes, and the sinks.

A new sink type is one module with a class that has a ``Config`` (extending
:class:`hms_ach.outbound.sinks.SinkSettings`), is built as ``cls(config, store)`` and meets the
:class:`hms_ach.core.types.Sink` contract (``settings``, ``async deliver(delivery)``,
``async close()``; see :data:`hms_ach.outbound.sinks.OutboxSink`), plus one line here.
"""

from hms_ach.core.registry import Registry

#: ``type:`` of a ``sinks:`` entry in channels.yaml -> the sink class.
SINK_TYPES = Registry(
    "sink type",
    {
        "webhook": "hms_ach.outbound.webhook:WebhookSink",
        "rabbitmq": "hms_ach.outbound.rabbitmq:RabbitMqSink",
        "x12_837": "hms_ach.billing.x12_837:X12ClaimSink",
        "fhir_push": "hms_ach.outbound.fhir_push:FhirPushSink",
        "mllp": "hms_ach.outbound.mllp_sink:MllpSink",
        "notify": "hms_ach.outbound.notify:NotifySink",
    },
)

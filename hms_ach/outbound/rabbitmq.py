"""The ``rabbitmq`` sink: each event is published to a durable topic exchange, routing key = event name.

Publisher confirms are on: a row is delivered only once the broker confirmed the message. A lost
connection (broker restarted mid-publish) fails the attempt; the row is retried on a new connection,
so a consumer may see a message twice, with the same ``message_id`` (the idempotency key).
"""

from __future__ import annotations

from typing import Any

import aio_pika
from pydantic import Field, SecretStr

from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, SinkSettings


class RabbitMqSink:
    class Config(SinkSettings):
        url: SecretStr = Field(
            SecretStr("amqp://guest:guest@127.0.0.1:5672/"),
            description="AMQP URL (amqp://user:password@host:5672/vhost)",
        )
        exchange: str = Field("hms_ach.events", description="Topic exchange (declared durable if missing)")

    def __init__(self, settings: Config, store: Any = None):
        self.settings = settings
        self._connection: Any = None
        self._exchange: Any = None

    async def _ensure(self) -> Any:
        if self._exchange is None or self._connection is None or self._connection.is_closed:
            await self.close()
            self._connection = await aio_pika.connect(
                self.settings.url.get_secret_value(), timeout=self.settings.timeout_seconds
            )
            channel = await self._connection.channel(publisher_confirms=True)
            self._exchange = await channel.declare_exchange(
                self.settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        return self._exchange

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        try:
            exchange = await self._ensure()
            message = aio_pika.Message(
                delivery.body(),
                content_type="application/json",
                message_id=delivery.idempotency_key,
                type=delivery.event,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            confirmation = await exchange.publish(
                message, routing_key=delivery.event, timeout=self.settings.timeout_seconds
            )
        except Exception as exc:
            await self.close()
            raise DeliveryError(f"publish failed: {type(exc).__name__}: {exc}") from exc
        return DeliveryResult(response=f"confirmed {type(confirmation).__name__}")

    async def close(self) -> None:
        connection, self._connection, self._exchange = self._connection, None, None
        if connection is not None and not connection.is_closed:
            try:
                await connection.close()
            except Exception:  # noqa: BLE001 - already broken
                pass

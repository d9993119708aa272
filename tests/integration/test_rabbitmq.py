"""RabbitMQ sink against the local broker (127.0.0.1:5672, guest/guest): a real queue gets each event once."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aio_pika
import orjson
import pytest

from hms_ach.store.db import Store
from tests.integration.engine_helpers import mllp_channel
from tests.integration.outbound_helpers import make_engine, send_mllp, wait_for

URL = "amqp://guest:guest@127.0.0.1:5672/"


async def _broker() -> aio_pika.abc.AbstractConnection:
    try:
        return await aio_pika.connect(URL, timeout=5)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(
            f"RabbitMQ is not running on 127.0.0.1:5672 (start it with `rabbitmq-server -detached`): {exc}"
        )


async def test_topic_exchange_queue_gets_admission_bed_and_discharge_once(
    tmp_path: Path, store: Store
) -> None:
    exchange_name = f"hms_ach.test.{uuid.uuid4().hex[:8]}"
    connection = await _broker()
    received: list[dict[str, object]] = []
    keys: list[str] = []
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, "encounter.#")
        await queue.bind(exchange, "bed.#")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                received.append(orjson.loads(message.body))
                keys.append(message.routing_key or "")

        await queue.consume(on_message)
        engine = make_engine(
            tmp_path,
            store.url,
            f"  - name: bus\n    type: rabbitmq\n    url: {URL}\n    exchange: {exchange_name}\n"
            "    retry_initial_seconds: 0.05\n",
        )
        await engine.start()
        try:
            codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "adt_a03.hl7", "mfn_m02.hl7"])
            assert codes == ["AA", "AA", "AA"]
            await wait_for(lambda: "encounter.discharged" in keys)
            await asyncio.sleep(0.5)
        finally:
            await engine.stop()
        await channel.exchange_delete(exchange_name)
    finally:
        await connection.close()
    assert keys.count("encounter.admitted") == 1
    assert keys.count("encounter.discharged") == 1
    assert "bed.status_changed" in keys
    assert not any(k.startswith("practitioner.") for k in keys)  # not bound: the broker drops them
    assert all(m["event"] == k for m, k in zip(received, keys, strict=True))
    assert len({m["id"] for m in received}) == len(received)  # once each

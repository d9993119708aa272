"""``GET /metrics`` (issue 19 item 2), scraped as Prometheus scrapes it and read with Prometheus's own
text parser (``prometheus_client.parser``): the counters move as messages are sent over MLLP by
python-hl7's client, the states are there, and the route needs the ``metrics.read`` action."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import hl7
import hl7.mllp
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, mllp_channel, mllp_yaml, running_engine

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
A01 = (ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes()


@pytest.fixture
async def engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    async with running_engine(tmp_path, store, mllp_yaml("adt_in")) as eng:
        yield eng


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(engine: Engine, roles: tuple[str, ...] = ("operator",)) -> Samples:
    headers = auth_headers(engine, "", roles, sub="prometheus")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as client:
        r = await client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= set(lbl))


async def send(port: int, messages: list[bytes]) -> list[str]:
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port)
    codes = []
    try:
        for raw in messages:
            writer.writemessage(hl7.parse(raw.decode().replace("\n", "\r")))
            ack = await asyncio.wait_for(reader.readmessage(), 10)
            codes.append(str(ack.segment("MSA")[1]))
    finally:
        writer.close()
    return codes


async def test_counters_move_as_messages_are_sent(engine: Engine) -> None:
    before = await scrape(engine)
    a01 = A01.replace(b"\n", b"\r")
    codes = await send(
        mllp_channel(engine).port, [a01, a01, b"MSH|^~\\&|X|Y|Z|W|20260101||ZZZ^Z01|C9|P|2.5\r"]
    )
    assert codes[0] == "AA" and codes[2] == "AR", codes
    after = await scrape(engine)
    name = "hms_ach_messages_total"
    labels = {"channel": "adt_in", "message_type": "ADT^A01"}
    assert (
        value(after, name, **labels, status="processed", ack_code="AA")
        - value(before, name, **labels, status="processed", ack_code="AA")
        == 1
    )
    assert (
        value(after, name, **labels, status="duplicate") - value(before, name, **labels, status="duplicate")
        == 1
    )
    assert (
        value(after, name, channel="adt_in", ack_code="AR")
        - value(before, name, channel="adt_in", ack_code="AR")
        == 1
    )
    count = "hms_ach_ack_latency_seconds_count"
    assert value(after, count, channel="adt_in") - value(before, count, channel="adt_in") == 3
    assert value(after, "hms_ach_writer_batch_jobs_count") > value(before, "hms_ach_writer_batch_jobs_count")
    # the states read at the scrape
    assert value(after, "hms_ach_up") == 1 and value(after, "hms_ach_writer_up") == 1
    assert ("hms_ach_writer_queue_jobs", ()) in after
    assert value(after, "hms_ach_db_pool_connections", pool="writer") >= 0
    assert ("hms_ach_channel_connections", (("channel", "adt_in"),)) in after
    # the HTTP latency by route template, never by concrete path (the registry is the process's: other
    # tests' routes are there too, operation routes such as /fhir/Patient/$export among them)
    routes = {dict(lbl).get("route") for (n, lbl) in after if n == "hms_ach_http_request_seconds_count"}
    assert "/metrics" in routes and not any(
        r and r.startswith("/fhir/Patient/") and "{" not in r and "$" not in r for r in routes
    ), sorted(r for r in routes if r)


async def test_metrics_need_the_metrics_action(engine: Engine) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as client:
        assert (await client.get("/metrics")).status_code == 401
        nurse = auth_headers(engine, "user/*.rs", ("hr_admin",), sub="hr")
        refused = await client.get("/metrics", headers=nurse)
        assert refused.status_code == 403 and "metrics.read" in refused.text
    assert value(await scrape(engine, ("integration",)), "hms_ach_up") == 1
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as client:
        headers = auth_headers(engine, "", ("operator",)) | {
            "Accept": "application/openmetrics-text; version=1.0.0"
        }
        om = await client.get("/metrics", headers=headers)  # as Prometheus asks by default
    assert om.headers["content-type"].startswith("application/openmetrics-text") and om.text.endswith(
        "# EOF\n"
    )

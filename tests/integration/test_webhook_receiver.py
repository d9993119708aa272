"""scripts/webhook_receiver.py, the sample receiver of docs/webhooks.md: it checks the signature and
handles each signed event id once, whatever the unsigned headers say; served on loopback, called
with httpx."""

from __future__ import annotations

import runpy
import threading
import time
from collections.abc import Iterator
from http.server import HTTPServer
from pathlib import Path

import httpx
import orjson
import pytest

from hms_ach.outbound.webhook import signature

ROOT = Path(__file__).resolve().parents[2]
SECRET = "dev-secret-change-me"  # the receiver's default, as in the walkthrough

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def receiver() -> Iterator[str]:
    script = runpy.run_path(str(ROOT / "scripts" / "webhook_receiver.py"))  # not as __main__: no server
    server = HTTPServer(("127.0.0.1", 0), script["Handler"])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/events"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _signed(event_id: str, key: str) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(
        {"id": event_id, "event": "bed.status_changed", "version": 1, "data": {"status": "O"}}
    )
    timestamp = str(int(time.time()))
    headers = {
        "X-HMS-ACH-Timestamp": timestamp,
        "X-HMS-ACH-Signature": signature(SECRET, timestamp, body),
        "Idempotency-Key": key,
        "Content-Type": "application/json",
    }
    return body, headers


def test_each_signed_event_id_is_handled_once(receiver: str, capsys: pytest.CaptureFixture[str]) -> None:
    with httpx.Client(timeout=10) as http:
        body, headers = _signed("hms-ach-evt-7", "hms-ach-evt-7")
        assert http.post(receiver, content=body, headers=headers).status_code == 200
        # the same signed body again, under another (unsigned) Idempotency-Key: still a repeat
        body, headers = _signed("hms-ach-evt-7", "something-else")
        assert http.post(receiver, content=body, headers=headers).status_code == 200
        body, headers = _signed("hms-ach-evt-8", "hms-ach-evt-8")
        assert http.post(receiver, content=body, headers=headers).status_code == 200
        forged = {**headers, "X-HMS-ACH-Signature": "v1=" + "0" * 64}
        assert http.post(receiver, content=body, headers=forged).status_code == 401
        odd = [
            (b"X-HMS-ACH-Timestamp", headers["X-HMS-ACH-Timestamp"].encode()),
            (b"X-HMS-ACH-Signature", "v1=\u00e9".encode()),
        ]
        assert http.post(receiver, content=body, headers=odd).status_code == 401
        missing = {"Content-Type": "application/json"}
        assert http.post(receiver, content=body, headers=missing).status_code == 401
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0:2] for line in out] == [
        ["valid", "hms-ach-evt-7"],
        ["repeat", "of"],
        ["valid", "hms-ach-evt-8"],
        ["BAD", "SIGNATURE:"],
        ["BAD", "SIGNATURE:"],
        ["BAD", "SIGNATURE:"],
    ]

"""The webhook sink's signature check never raises on what a sender controls, and the example secret
is refused for a receiver that is not on this machine."""

from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from hms_ach.outbound.webhook import EXAMPLE_SECRETS, WebhookSink, signature, verify

SECRET = "a-secret-of-our-own"
BODY = b'{"id": "hms-ach-evt-1"}'


def test_verify_accepts_a_good_signature() -> None:
    timestamp = str(int(time.time()))
    assert verify(SECRET, timestamp, BODY, signature(SECRET, timestamp, BODY))
    assert not verify("another-secret", timestamp, BODY, signature(SECRET, timestamp, BODY))
    assert not verify(SECRET, timestamp, BODY + b" ", signature(SECRET, timestamp, BODY))
    stale = str(int(time.time()) - 3600)
    assert not verify(SECRET, stale, BODY, signature(SECRET, stale, BODY))


@pytest.mark.parametrize(
    ("timestamp", "header"),
    [
        (None, None),  # headers missing
        ("", ""),
        ("now", "v1=00"),
        (" 1700000000", "v1=00"),  # int() would accept these three
        ("1_700_000_000", "v1=00"),
        ("\u0661\u0667\u0660\u0660", "v1=00"),  # Arabic-Indic digits
        ("9" * 5000, "v1=00"),  # huge: past int()'s digit limit
        ("VALID", "v1=\u00e9" * 10),  # non-ASCII signature: compare_digest would raise TypeError
        ("VALID", "v1=" + "0" * 10_000_000),  # huge signature
        ("VALID", b"v1=00"),  # not text
        (1700000000, "v1=00"),
    ],
)
def test_verify_never_raises_on_odd_headers(timestamp: object, header: object) -> None:
    now = str(int(time.time()))
    assert verify(SECRET, now if timestamp == "VALID" else timestamp, BODY, header) is False


def test_verify_refuses_a_body_that_is_not_bytes() -> None:
    timestamp = str(int(time.time()))
    assert verify(SECRET, timestamp, BODY.decode(), signature(SECRET, timestamp, BODY)) is False


def _sink(url: str, secret: str, enabled: bool = True) -> WebhookSink.Config:
    return WebhookSink.Config(name="dash", type="webhook", url=url, secret=secret, enabled=enabled)


def test_the_example_secret_is_refused_off_this_machine() -> None:
    (example,) = EXAMPLE_SECRETS
    for url in ("https://dashboard.hospital.example/events", "http://10.0.0.8:9000/events", "not a url"):
        with pytest.raises(ValidationError, match="example secret") as raised:
            _sink(url, example)
        assert (
            example not in raised.value.errors()[0]["msg"]
        )  # the message (as hms-ach check shows it) names no secret
    # dev mode: a receiver on this machine (the walkthrough's scripts/webhook_receiver.py)
    for url in ("http://127.0.0.1:9000/events", "http://localhost:9000/events", "http://[::1]:9000/e"):
        assert _sink(url, example).secret.get_secret_value() == example
    assert not _sink("https://dashboard.hospital.example/events", example, enabled=False).enabled
    assert _sink("https://dashboard.hospital.example/events", SECRET).url.startswith("https://")

"""The ``webhook`` sink: each event is an HTTP POST of its JSON envelope, signed with HMAC-SHA256.

Headers sent (see docs/webhooks.md for how to verify them):

* ``X-HMS-ACH-Timestamp``: Unix seconds when the attempt was signed;
* ``X-HMS-ACH-Signature``: ``v1=`` + hex HMAC-SHA256(secret, timestamp + "." + body);
* ``Idempotency-Key``: the same for every attempt of one event (``hms-ach-evt-<id>``);
* ``X-HMS-ACH-Event``: the event name.

The sink refuses the example secret of channels.yaml and the docs (:data:`EXAMPLE_SECRETS`)
unless its ``url`` is a loopback address: that is the "dev mode" of the webhook walkthrough
(``scripts/webhook_receiver.py`` on 127.0.0.1), where no event leaves the machine. A receiver
elsewhere needs a secret of its own, or anyone who read the docs could sign events for it.

Any 2xx is delivered. Everything else (3xx included: redirects are not followed), a timeout or a
connection error is a failed attempt that is retried; ``Retry-After`` on 429/503 is honoured.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

import httpx
from pydantic import Field, SecretStr, ValidationInfo, field_validator

from hms_ach.core.addresses import is_loopback_url
from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, SinkSettings

#: The example secrets of channels.yaml and docs/webhooks.md: refused unless the url is loopback.
EXAMPLE_SECRETS = frozenset({"dev-secret-change-me"})
#: The longest timestamp (Unix seconds) and signature header ``verify`` looks at; longer ones are refused.
_LONGEST_TIMESTAMP = 20
_LONGEST_SIGNATURE = 100


def signature(secret: str, timestamp: str, body: bytes) -> str:
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "v1=" + mac.hexdigest()


def verify(
    secret: str, timestamp: object, body: object, header: object, tolerance_seconds: float = 300
) -> bool:
    """What a receiver does: recompute the signature, compare in constant time, refuse stale timestamps.

    Never raises on what a sender controls: a missing (None), empty, non-ASCII, malformed or huge
    timestamp or signature header, or a body that is not bytes, is False."""
    if not isinstance(timestamp, str) or not isinstance(header, str) or not isinstance(body, bytes):
        return False
    if not timestamp or len(timestamp) > _LONGEST_TIMESTAMP or len(header) > _LONGEST_SIGNATURE:
        return False
    if not (timestamp.isascii() and timestamp.isdigit() and header.isascii()):
        return False  # int() would take " 1_7", Arabic digits; compare_digest refuses non-ASCII str
    if abs(time.time() - int(timestamp)) > tolerance_seconds:
        return False
    return hmac.compare_digest(signature(secret, timestamp, body).encode(), header.encode())


def retry_after_seconds(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class WebhookSink:
    class Config(SinkSettings):
        url: str = Field(description="Where events are POSTed (https://...)")
        secret: SecretStr = Field(
            description="Shared HMAC-SHA256 key; use ${VAR} to read it from the environment"
        )
        headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers")

        @field_validator("secret")
        @classmethod
        def _no_example_secret(cls, secret: SecretStr, info: ValidationInfo) -> SecretStr:
            url = info.data.get("url")
            enabled = info.data.get("enabled", True)
            if secret.get_secret_value() in EXAMPLE_SECRETS and enabled and isinstance(url, str):
                if not is_loopback_url(url):
                    raise ValueError(
                        "this is the example secret of channels.yaml and the docs, refused for a url that is "
                        "not on this machine (only a loopback url may use it, for trying things out); set "
                        "HMS_ACH_WEBHOOK_SECRET to a random value of your own, e.g. `openssl rand -hex 32`"
                    )
            return secret

    def __init__(self, settings: Config, store: Any = None):
        self.settings = settings
        self._client = httpx.AsyncClient(timeout=settings.timeout_seconds, follow_redirects=False)

    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        body = delivery.body()
        ts = str(int(time.time()))
        headers = {
            **self.settings.headers,
            "Content-Type": "application/json",
            "X-HMS-ACH-Event": delivery.event,
            "X-HMS-ACH-Timestamp": ts,
            "X-HMS-ACH-Signature": signature(self.settings.secret.get_secret_value(), ts, body),
            "Idempotency-Key": delivery.idempotency_key,
        }
        try:
            response = await self._client.post(self.settings.url, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timeout after {self.settings.timeout_seconds}s") from exc
        except httpx.HTTPError as exc:
            raise DeliveryError(f"{type(exc).__name__}: {exc}") from exc
        text = response.text[:2000]
        if 200 <= response.status_code < 300:
            return DeliveryResult(response=f"{response.status_code} {text}".strip())
        raise DeliveryError(
            f"HTTP {response.status_code}",
            response=text,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )

    async def close(self) -> None:
        await self._client.aclose()

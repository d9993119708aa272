"""The notify sink's other paths, each with a real peer on loopback: an alert that fires past its
threshold sends one alert mail and one recovery mail (issue 19); the http channel POSTs JSON to a
gateway and retries a 503; a recipient that cannot be resolved is a stored warning, not a failure;
a refused SMTP login is a retried failure that names no address."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from hms_ach.app.config import load_config
from hms_ach.core.errors import ConfigErrors
from hms_ach.outbound.notify import NotifySink
from hms_ach.outbound.sinks import Delivery, DeliveryError
from hms_ach.store.db import Store
from tests.integration.engine_helpers import mllp_channel
from tests.integration.notify_helpers import SMTP_USER, SmtpServer
from tests.integration.outbound_helpers import make_engine, send_mllp, wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "mappings" / "notifications"
ONCALL = "oncall@hospital.test"


def _delivery(event: str, payload: dict[str, Any], event_id: int = 7) -> Delivery:
    return Delivery(1, event_id, event, payload, "2026-12-06T10:00:00Z", 0)


FIRING = {
    "alert": "adt-errors",
    "kind": "error_rate",
    "target": "adt_in",
    "value": "2 of 2 messages in 10 min (100%)",
    "threshold": 0.5,
    "at": "2026-12-06T10:00:00Z",
}


async def test_an_alert_episode_mails_one_alert_and_one_recovery(tmp_path: Path, store: Store) -> None:
    with SmtpServer() as smtp:  # plain SMTP without AUTH: allowed on loopback
        sink = (
            "  - name: people\n    type: notify\n    channel: email\n"
            f"    templates_dir: {TEMPLATES}\n    smtp_port: {smtp.port}\n    smtp_security: none\n"
            f"    operators: [{ONCALL}]\n    events: ['alert.*']\n    retry_initial_seconds: 0.05\n"
        )
        jobs = (
            "jobs:\n  alerts:\n    interval_seconds: 3600  # run by the test\n    rules:\n"
            "      - name: adt-errors\n        kind: error_rate\n        channel: adt_in\n"
            "        threshold: 0.5\n        min_messages: 2\n        window_minutes: 10\n"
            "        sinks: [people]\n"
        )
        engine = make_engine(tmp_path, store.url, sink, jobs)
        await engine.start()
        try:
            assert engine.scheduler is not None
            port = mllp_channel(engine).port
            assert await send_mllp(port, ["bad/bad_sex_code.hl7", "bad/missing_pid3.hl7"]) == ["AE", "AE"]
            await engine.scheduler.run_job("alerts")
            await wait_for(lambda: len(smtp.mailbox.messages) == 1)
            await engine.scheduler.run_job("alerts")  # still firing: no second mail
            assert await send_mllp(port, ["adt_a01.hl7", "adt_a02.hl7", "adt_a03.hl7"]) == ["AA"] * 3
            await engine.scheduler.run_job("alerts")  # 2 of 5: below half
            await wait_for(lambda: len(smtp.mailbox.messages) == 2)
        finally:
            await engine.stop()
    subjects = [m["Subject"] for m in smtp.mailbox.to(ONCALL)]
    assert subjects == [
        "[hms-ach] ALERT adt-errors: error_rate on adt_in",
        "[hms-ach] RESOLVED adt-errors: error_rate on adt_in",
    ]
    recovery = smtp.mailbox.messages[1][1].get_body(("plain",))
    assert recovery is not None and "Measured now: 2 of 5 messages" in recovery.get_content()


class Gateway:
    """An SMS gateway on loopback: answers ``status`` and keeps the JSON bodies and keys."""

    def __init__(self) -> None:
        self.status = 200
        self.bodies: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if self.status != 200:
            return web.Response(status=self.status, headers={"Retry-After": "2"})
        self.bodies.append(orjson.loads(await request.read()))
        self.keys.append(request.headers["Idempotency-Key"])
        return web.Response(status=202)

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/sms", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}/sms"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _unresolved(rule: str) -> float:
    value = REGISTRY.get_sample_value(
        "hms_ach_notify_unresolved_recipients_total", {"sink": "sms", "rule": rule}
    )
    return value or 0.0


async def test_http_channel_posts_json_and_skips_what_is_not_for_it(store: Store) -> None:
    gateway = Gateway()
    url = await gateway.start()
    settings = NotifySink.Config(
        name="sms",
        type="notify",
        channel="http",
        url=url,
        templates_dir=str(TEMPLATES),
        operators=["+15550100"],
    )
    sink = NotifySink(settings, store)
    try:
        result = await sink.deliver(_delivery("alert.firing", FIRING))
        assert result.response == "sent 1 (operators)"
        assert gateway.bodies == [
            {
                "to": "+15550100",
                "subject": "[hms-ach] ALERT adt-errors: error_rate on adt_in",
                "text": gateway.bodies[0]["text"],
            }
        ]
        assert "is firing since 2026-12-06T10:00:00Z" in gateway.bodies[0]["text"]
        assert gateway.keys == ["hms-ach-evt-7.0"]
        # an alert whose rule names other sinks, and an event without a template: nothing is sent
        skipped = await sink.deliver(_delivery("alert.firing", {**FIRING, "sinks": ["pager"]}))
        assert skipped.response.startswith("not addressed to this sink")
        assert (await sink.deliver(_delivery("claim.created", {}))).response.startswith("no notification")
        # an employee that is not stored: a stored warning and a metric, never a crash
        before = _unresolved("employee")
        lost = await sink.deliver(_delivery("credential.expiring", {"practitioner": "Practitioner/404"}))
        assert lost.response == "sent 0 (nobody); unresolved: employee (no stored Practitioner in the event)"
        assert _unresolved("employee") == before + 1
        # the gateway is down: a failed attempt the outbox retries, with its Retry-After
        gateway.status = 503
        with pytest.raises(DeliveryError) as failed:
            await sink.deliver(_delivery("alert.firing", FIRING, event_id=8))
        assert not failed.value.permanent and failed.value.retry_after == 2.0
        assert "+1555" not in str(failed.value)
        assert len(gateway.bodies) == 1
    finally:
        await sink.close()
        await gateway.stop()


def _mail_sink(smtp: SmtpServer, store: Store, **settings: Any) -> NotifySink:
    """A notify sink mailing the operators through ``smtp``, with ``settings`` on top."""
    config = NotifySink.Config(
        name="mail",
        type="notify",
        channel="email",
        templates_dir=str(TEMPLATES),
        smtp_port=smtp.port,
        operators=[ONCALL],
        **settings,
    )
    return NotifySink(config, store)


async def test_a_refused_smtp_login_is_retried_and_names_no_address(tmp_path: Path, store: Store) -> None:
    with SmtpServer(tmp_path) as smtp:
        sink = _mail_sink(
            smtp,
            store,
            smtp_ca_file=str(smtp.cert),
            smtp_username=SMTP_USER,
            smtp_password="not-the-password",
        )
        with pytest.raises(DeliveryError) as refused:
            await sink.deliver(_delivery("alert.firing", FIRING))
        await sink.close()
    assert not refused.value.permanent and "SMTP 535" in str(refused.value)
    assert ONCALL not in str(refused.value) and not smtp.mailbox.messages


async def test_starttls_is_required_not_opportunistic(store: Store) -> None:
    """A server that does not offer STARTTLS gets nothing: a failed attempt, no mail in clear."""
    with SmtpServer() as smtp:
        sink = _mail_sink(smtp, store)
        with pytest.raises(DeliveryError) as refused:
            await sink.deliver(_delivery("alert.firing", FIRING))
        await sink.close()
    assert not refused.value.permanent and not smtp.mailbox.messages


def test_config_resolves_template_paths_and_checks_the_sinks_alert_rules_name(tmp_path: Path) -> None:
    sinks = (
        "sinks:\n  - name: people\n    type: notify\n    channel: email\n    enabled: false\n"
        "    templates_dir: mappings/notifications\n    smtp_ca_file: certs/ca.pem\n"
    )
    rule = (
        "jobs:\n  alerts:\n    rules:\n      - {name: dead, kind: dead_letters, threshold: 1, sinks: [%s]}\n"
    )
    (tmp_path / "channels.yaml").write_text("channels: []\n" + sinks + rule % "people")
    sink = load_config(tmp_path / "channels.yaml").sinks[0]
    assert sink.templates_dir == str(tmp_path / "mappings" / "notifications")
    assert sink.smtp_ca_file == str(tmp_path / "certs" / "ca.pem")
    (tmp_path / "channels.yaml").write_text("channels: []\n" + sinks + rule % "pager")
    with pytest.raises(ConfigErrors) as exc:
        load_config(tmp_path / "channels.yaml")
    assert "channels.yaml:12:" in str(exc.value)  # the rule's line
    assert "names sink 'pager', which is not a notify sink" in str(exc.value) and "['people']" in str(
        exc.value
    )

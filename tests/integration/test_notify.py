"""The notify sink (issue 17 item 3) against a real SMTP server on loopback (aiosmtpd, STARTTLS with
a test certificate and AUTH): credential-expiry mails go to the nurse and, after escalation, to her
manager; each threshold is sent once across an engine restart; the template renders her name and
the licence. Recipients come from the store (managers and peers through PractitionerRole)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.app.runtime import Engine
from hms_ach.store import outbox
from hms_ach.store import recipient_queries as rq
from hms_ach.store.db import Store
from hms_ach.store.models import CredentialAlert
from tests.integration.engine_helpers import FHIR_JSON, STAFF, auth_headers, start_engine
from tests.integration.notify_helpers import SMTP_PASSWORD, SMTP_USER, SmtpServer
from tests.integration.outbound_helpers import wait_for

pytestmark = pytest.mark.timeout(120)

NURSE_MAIL = "maria.lopez@hospital.test"
MANAGER_MAIL = "head.nurse@hospital.test"
ESCALATE_AFTER = 14


def _config(server: SmtpServer, folder: Path) -> str:
    """A fhir_rest channel, a notify sink (STARTTLS + AUTH) and the credential-expiry job."""
    return (
        "  - name: fhir_in\n    type: fhir_rest\n"
        "sinks:\n  - name: people\n    type: notify\n    channel: email\n"
        f"    templates_dir: {folder / 'mappings' / 'notifications'}\n"
        f"    smtp_port: {server.port}\n    smtp_security: starttls\n    smtp_ca_file: {server.cert}\n"
        f"    smtp_username: {SMTP_USER}\n    smtp_password: ${{HMS_ACH_TEST_SMTP_PASSWORD}}\n"
        "    from_address: staffing@hospital.test\n    events: ['credential.*']\n"
        "    retry_initial_seconds: 0.05\n"
        "jobs:\n  credential_expiry:\n    cron: '0 2 1 1 *'  # run by the test\n"
        f"    thresholds_days: [60, 30, 7]\n    escalate_after_days: {ESCALATE_AFTER}\n"
    )


async def _create(api: httpx.AsyncClient, body: dict[str, Any]) -> str:
    r = await api.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _role(practitioner: str, org: str, code: str) -> dict[str, Any]:
    return {
        "resourceType": "PractitionerRole",
        "active": True,
        "practitioner": {"reference": f"Practitioner/{practitioner}"},
        "organization": {"reference": f"Organization/{org}"},
        "code": [{"coding": [{"system": "urn:hms-ach:code:role", "code": code}]}],
    }


def _person(number: str, given: str, family: str, mail: str, **extra: Any) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": STAFF, "value": number}],
        "active": True,
        "name": [{"family": family, "given": [given]}],
        "telecom": [{"system": "email", "value": mail}],
        **extra,
    }


async def _seed(engine: Engine) -> dict[str, str]:
    """4 West: nurse Maria Lopez (licence RN-449812 ends in 25 days), her peer, and their manager."""
    ends = (date.today() + timedelta(days=25)).isoformat()
    licence = {
        "identifier": [{"system": "urn:oid:2.16.840.1.113883.4.1", "value": "RN-449812"}],
        "code": {"text": "RN licence"},
        "issuer": {"display": "Ohio Board of Nursing"},
        "period": {"start": "2024-01-01", "end": ends},
    }
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30, headers=auth_headers(engine)
    ) as api:
        org = await _create(api, {"resourceType": "Organization", "name": "4 West nursing"})
        ids = {
            "nurse": await _create(
                api, _person("N-1", "Maria", "Lopez", NURSE_MAIL, qualification=[licence])
            ),
            "peer": await _create(api, _person("N-2", "Ken", "Ito", "ken.ito@hospital.test")),
            "manager": await _create(api, _person("M-1", "Ruth", "Ames", MANAGER_MAIL)),
            # no e-mail and no department: her alerts are stored warnings, never a failed row
            "unreachable": await _create(
                api,
                {
                    "resourceType": "Practitioner",
                    "identifier": [{"system": STAFF, "value": "N-3"}],
                    "active": True,
                    "name": [{"family": "Ng", "given": ["Ann"]}],
                    "qualification": [{**licence, "identifier": [{"value": "RN-500001"}]}],
                },
            ),
            "org": org,
        }
        for who, code in (("nurse", "nurse"), ("peer", "nurse"), ("manager", "manager")):
            await _create(api, _role(ids[who], org, code))
    return ids


def _sent_rows(store: Store) -> list[dict[str, Any]]:
    with store.read() as conn:
        return outbox.list_rows(conn, destination="people")


@pytest.fixture
async def smtp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SmtpServer]:
    monkeypatch.setenv("HMS_ACH_TEST_SMTP_PASSWORD", SMTP_PASSWORD)
    with SmtpServer(tmp_path) as server:
        yield server


async def test_expiry_mails_nurse_once_per_threshold_then_escalate_to_manager(
    tmp_path: Path, store: Store, smtp: SmtpServer
) -> None:
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    engine = await start_engine(first_dir, store, _config(smtp, first_dir))
    try:
        assert engine.scheduler is not None
        ids = await _seed(engine)
        with store.read() as conn:  # recipients as the store resolves them
            assert [p.name for p in rq.managers(conn, f"Practitioner/{ids['nurse']}", ["manager"])] == [
                "Ruth Ames"
            ]
            assert [p.name for p in rq.peers(conn, f"Practitioner/{ids['nurse']}")] == ["Ken Ito"]
        assert (await engine.scheduler.run_job("credential_expiry"))[0] == "ok"
        await wait_for(lambda: len(smtp.mailbox.messages) == 1)
        mail = smtp.mailbox.to(NURSE_MAIL)[0]
        assert mail["Subject"] == "Your RN licence RN-449812 expires in 25 days"
        assert mail["Message-ID"].startswith("<hms-ach-evt-") and mail["Date"]  # the same on a resend
        body = mail.get_body(("plain",))
        assert body is not None and "Dear Maria Lopez," in body.get_content()
        assert "(issued by Ohio Board of Nursing)" in body.get_content()
        html = mail.get_body(("html",))
        assert html is not None and "<b>RN-449812</b>" in html.get_content()
        assert smtp.mailbox.logins  # it authenticated (after STARTTLS: the server requires both)
        assert (await engine.scheduler.run_job("credential_expiry"))[0] == "ok"  # same threshold
    finally:
        await engine.stop()
    assert len(smtp.mailbox.messages) == 1
    # Two weeks pass without a renewal: the first alert is dated back, as if raised 15 days ago.
    alerts = CredentialAlert.__table__  # type: ignore[attr-defined]
    with store.transaction() as tx:
        tx.execute(update(alerts).values(created_at=datetime.now(UTC) - timedelta(days=ESCALATE_AFTER + 1)))
    engine = await start_engine(second_dir, store, _config(smtp, second_dir))  # a restart
    try:
        assert engine.scheduler is not None
        outcome = await engine.scheduler.run_job("credential_expiry")
        assert outcome[0] == "ok" and "escalated=2" in outcome[1] and "expiring=0" in outcome[1]
        await wait_for(lambda: len(smtp.mailbox.messages) == 2)
        escalation = smtp.mailbox.to(MANAGER_MAIL)
        assert [m["Subject"] for m in escalation] == [
            "Escalation: RN licence RN-449812 of Maria Lopez not renewed"
        ]
        text = escalation[0].get_body(("plain",))
        assert text is not None and text.get_content().startswith("Dear Ruth Ames,")
        assert (await engine.scheduler.run_job("credential_expiry"))[0] == "ok"  # nothing new
    finally:
        await engine.stop()
    assert len(smtp.mailbox.to(NURSE_MAIL)) == 1 and len(smtp.mailbox.messages) == 2
    rows = _sent_rows(store)
    assert sorted(r["event"] for r in rows) == ["credential.escalated"] * 2 + ["credential.expiring"] * 2
    assert {r["status"] for r in rows} == {"delivered"}
    assert {r["response"] for r in rows} == {
        "sent 1 (employee)",
        "sent 1 (managers)",
        "sent 0 (nobody); unresolved: employee (no email contact)",
        "sent 0 (nobody); unresolved: managers (none found)",
    }
    listed = CliRunner().invoke(app, ["outbox", "--status", "delivered", "--database", store.url])
    assert (
        listed.exit_code == 0
        and "response=sent 0 (nobody); unresolved: managers (none found)" in listed.output
    )
    assert "@" not in listed.output  # no address is stored or shown


async def test_a_role_outside_its_period_notifies_nobody(
    tmp_path: Path, store: Store, smtp: SmtpServer
) -> None:
    """A manager whose role ended yesterday, and one whose role starts tomorrow, are neither managers
    nor holders of the role; the manager whose period covers today (its end day included) is."""
    engine = await start_engine(tmp_path, store, _config(smtp, tmp_path))
    yesterday, today, tomorrow = (date.today() + timedelta(days=d) for d in (-1, 0, 1))
    try:
        ids = await _seed(engine)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30, headers=auth_headers(engine)
        ) as api:
            for number, name, period in (
                ("M-2", "Past", {"start": "2020-01-01", "end": yesterday.isoformat()}),
                ("M-3", "Future", {"start": tomorrow.isoformat()}),
                ("M-4", "Today", {"start": "2020-01-01", "end": today.isoformat()}),
            ):
                pid = await _create(api, _person(number, name, "Manager", f"{number}@hospital.test"))
                await _create(api, {**_role(pid, ids["org"], "manager"), "period": period})
        with store.read() as conn:
            nurse = f"Practitioner/{ids['nurse']}"
            assert [p.name for p in rq.managers(conn, nurse, ["manager"])] == ["Ruth Ames", "Today Manager"]
            assert sorted(p.name for p in rq.role_holders(conn, "manager")) == ["Ruth Ames", "Today Manager"]
    finally:
        await engine.stop()

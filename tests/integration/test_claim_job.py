"""The nightly claim_creation job: charges posted after the discharge get their Claim (and 837) then."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import orjson
import pytest
from sqlalchemy import func, select, text
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.billing.claim_job import create_claims, unclaimed_encounters
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES
from tests.integration.engine_helpers import mllp_channel
from tests.integration.outbound_helpers import SECRET, Receiver, make_engine, send_mllp, wait_for

Claim = RECORD_TABLES["Claim"]


def _claims(store: Store) -> int:
    with store.reader.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(Claim.__table__)).scalar_one())  # type: ignore[attr-defined]


def _job_config(tmp_path: Path, store: Store, settle_hours: float) -> str:
    path = tmp_path / f"jobs_{settle_hours}.yaml"
    path.write_text(
        f"engine:\n  database_url: '{store.url}'\n  mappings: mappings\n  watch: false\n"
        "http:\n  enabled: false\nchannels: []\n"
        f"jobs:\n  claim_creation:\n    settle_hours: {settle_hours}\n"
    )
    return str(path)


async def test_charges_after_discharge_get_their_claim_from_the_nightly_job(
    tmp_path: Path, store: Store
) -> None:
    receiver = Receiver()
    url = await receiver.start()
    engine = make_engine(
        tmp_path,
        store.url,
        f"  - name: finance\n    type: webhook\n    url: {url}\n"
        f"    secret: {SECRET}\n    events: ['claim.*']\n"
        "    retry_initial_seconds: 0.05\n",
    )
    await engine.start()
    try:
        # discharged before any charge: the discharge makes no claim
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "adt_a03.hl7", "dft_p03.hl7"])
        assert codes == ["AA", "AA", "AA"]
        assert _claims(store) == 0
        runner = CliRunner()
        # charges that changed within settle_hours are not complete yet
        result = await asyncio.to_thread(
            runner.invoke,
            cli_app,
            ["jobs", "run", "claim_creation", "--config", _job_config(tmp_path, store, 6)],
        )
        assert result.exit_code == 0, result.output
        assert "created=0" in result.output and _claims(store) == 0
        result = await asyncio.to_thread(
            runner.invoke,
            cli_app,
            ["jobs", "run", "claim_creation", "--config", _job_config(tmp_path, store, 0)],
        )
        assert result.exit_code == 0, result.output
        assert "claim_creation: ok: created=1, skipped=0, failed=0" in result.output
        await wait_for(lambda: "claim.created" in receiver.names())
        # a second run finds nothing left to do
        result = await asyncio.to_thread(
            runner.invoke,
            cli_app,
            ["jobs", "run", "claim_creation", "--config", _job_config(tmp_path, store, 0)],
        )
        assert "created=0" in result.output
    finally:
        await engine.stop()
        await receiver.stop()
    assert _claims(store) == 1 and receiver.names().count("claim.created") == 1
    created = receiver.events[receiver.names().index("claim.created")]["data"]
    assert created["total"] == 475.0
    # the claim's audit entry names the job that made it (no message did)
    with store.read() as conn:
        actors = (
            conn.execute(
                text("SELECT actor FROM audit_entry WHERE entity_type = 'Claim' AND action = 'create'")
            )
            .scalars()
            .all()
        )
    assert [orjson.loads(a) for a in actors] == [{"kind": "system", "job": "claim_creation"}]


async def test_only_finished_encounters_are_claimed(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hms_ach")  # as `hms-ach run` logs: its counts are logged
    engine = make_engine(tmp_path, store.url, "  []\n")
    await engine.start()
    try:
        assert await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "dft_p03.hl7"]) == ["AA", "AA"]
    finally:
        await engine.stop()
    with store.writer.begin() as conn:
        assert unclaimed_encounters(conn, 0) == []  # in progress: charges may still come
        assert create_claims(conn, 0) == {"created": 0, "skipped": 0, "failed": 0}
    assert _claims(store) == 0
    logged = [r for r in caplog.records if r.getMessage() == "claims.created"]
    counts = [tuple(getattr(r, f"claims_{k}") for k in ("created", "skipped", "failed")) for r in logged]
    assert counts == [(0, 0, 0)]

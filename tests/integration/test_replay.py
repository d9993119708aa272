"""``hms-ach replay`` of stored FHIR writes (fhir_rest) and bad CSV rows (sftp_csv), after a mapping fix.

The failures are made the way they happen in production: a FHIR request sent to the running engine
(uvicorn on loopback) while a mapping is wrong, and a roster file polled from a real SFTP server
while a code table lacks a code. The fix is an edit of the mapping files; replay is the CLI.
SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import orjson
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.channels.sftp_csv import SftpCsvChannel, SftpCsvConfig
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store import audit, messages
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES, ResourceHistory
from hms_ach.store.writer import StoreWriter
from tests.integration.engine_helpers import FHIR_JSON, ROOT, auth_headers
from tests.integration.sftp_server import PASSWORD, USER, SftpServer

STAFF = "urn:hms-ach:id:staff"
MRN = "urn:oid:2.16.840.1.113883.19.5"
BROKEN_RULE = "  - target: birthDate\n    source: birthDate\n"


@pytest.fixture
def workdir(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> Path:
    """mappings/ and a channels.yaml (fhir_rest on a loopback port) on the test's store."""
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        "channels:\n  - name: fhir_in\n    type: fhir_rest\n    max_body_bytes: 65536\n"
    )
    monkeypatch.setenv("HMS_ACH_DATABASE_URL", store.url)
    return tmp_path


def cli(workdir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*args, "--config", str(workdir / "channels.yaml")])
    return result.exit_code, result.output


def message_rows(store: Store) -> list[Any]:
    with store.reader.connect() as conn:
        return list(conn.execute(select(messages.T).order_by(messages.T.c.id)).all())


def records(store: Store, rtype: str) -> list[dict[str, Any]]:
    table = RECORD_TABLES[rtype].__table__  # type: ignore[attr-defined]
    with store.reader.connect() as conn:
        return [orjson.loads(r.resource) for r in conn.execute(table.select().where(table.c.version_id > 0))]


def snapshot(store: Store) -> tuple[Any, ...]:
    """Everything a replay could write: message rows (status, error, replay count), versions, audit entries."""
    with store.reader.connect() as conn:
        msgs = [(r.id, r.status, r.error, r.ack_code, r.replay_count) for r in message_rows(store)]
        versions = conn.execute(select(func.count()).select_from(ResourceHistory)).scalar_one()
        entries = conn.execute(select(func.count()).select_from(audit.T)).scalar_one()
    return msgs, versions, entries


def _patient(mrn: str, family: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": family, "given": ["Ada"]}],
        "gender": "female",
    }


async def test_fhir_writes_refused_by_a_wrong_mapping_replay_after_the_fix(
    workdir: Path, store: Store
) -> None:
    mapping = workdir / "mappings" / "resources" / "patient_fhir.yaml"
    good = mapping.read_text()
    assert BROKEN_RULE in good
    # the analyst's mistake: birthDate made required, and the senders send none
    mapping.write_text(good.replace(BROKEN_RULE, BROKEN_RULE + '    required: "birthDate is empty"\n'))
    eng = Engine(load_config(workdir / "channels.yaml"), database=store.url)
    await eng.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{eng.http_port}/fhir", timeout=30, headers=auth_headers(eng)
        ) as http:
            created = await http.post(
                "/Patient",
                json=_patient("M-1", "Lovelace"),
                headers={**FHIR_JSON, "If-None-Exist": f"identifier={MRN}|M-1"},
            )
            updated = await http.put(
                f"/Patient?identifier={MRN}|M-2", json=_patient("M-2", "Byron"), headers=FHIR_JSON
            )
            bundle = {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "fullUrl": "urn:uuid:p3",
                        "resource": _patient("M-3", "King"),
                        "request": {"method": "POST", "url": "Patient"},
                    }
                ],
            }
            in_bundle = await http.post("", json=bundle, headers=FHIR_JSON)
    finally:
        await eng.stop()
    for resp in (created, updated, in_bundle):
        assert resp.status_code == 422, resp.text
        assert "birthDate is empty" in resp.text
    failed = [m for m in message_rows(store) if m.content_type == "fhir+json"]
    assert [m.status for m in failed] == ["rejected"] * 3
    assert records(store, "Patient") == []

    mapping.write_text(good)  # the fix
    before = snapshot(store)
    code, out = cli(workdir, "replay", "--status", "rejected", "--dry-run")
    assert code == 0, out
    assert out.count("rejected -> processed 200") == 3, out
    assert out.count("  new Patient/") == 3, out
    assert all(f'"family": "{name}"' in out for name in ("Lovelace", "Byron", "King")), out
    assert "dry run: nothing written" in out
    assert snapshot(store) == before and records(store, "Patient") == []

    code, out = cli(workdir, "replay", *[str(m.id) for m in failed])
    assert code == 0, out
    assert out.count("rejected -> processed 200") == 3, out
    patients = {p["identifier"][0]["value"]: p for p in records(store, "Patient")}
    assert sorted(patients) == ["M-1", "M-2", "M-3"]
    rows = {m.id: m for m in message_rows(store)}
    assert all(rows[m.id].status == "processed" and rows[m.id].replay_count == 1 for m in failed)
    # the replayed conditional create is still conditional: again, it finds the record and writes nothing
    code, out = cli(workdir, "replay", str(failed[0].id))
    assert code == 0 and "processed -> processed 200" in out and "0 record(s) changed" in out, out
    assert len(records(store, "Patient")) == 3


def employees(store: Store) -> dict[str, dict[str, Any]]:
    """Practitioners by employee number."""
    return {
        i["value"]: p
        for p in records(store, "Practitioner")
        for i in p.get("identifier", [])
        if i.get("system") == STAFF
    }


async def _poll_roster(workdir: Path, store: Store, host_key: asyncssh.SSHKey, text: str) -> None:
    root = workdir / "sftp_root"
    (root / "inbox").mkdir(parents=True)
    server = await SftpServer(root, host_key).start()
    writer = StoreWriter(store)
    try:
        path = root / "inbox" / "roster.csv"
        path.write_text(text)
        then = time.time() - 60
        os.utime(path, (then, then))
        channel = SftpCsvChannel(
            SftpCsvConfig.model_validate(
                dict(
                    name="roster_in",
                    type="sftp_csv",
                    host="127.0.0.1",
                    port=server.port,
                    username=USER,
                    password=PASSWORD,
                    known_hosts=str(server.known_hosts(workdir / "known_hosts")),
                    dataset="staff_roster",
                    min_file_age_seconds=0,
                    stable_seconds=0,
                    work_dir=str(workdir / "work"),
                )
            ),
            Pipeline(writer, MappingEngine(load_mappings(workdir / "mappings"))),
        )
        out = await channel.poll()
        assert [f.status for f in out.files] == ["error"], out.summary()
    finally:
        writer.stop()
        await server.close()


async def test_bad_csv_row_replays_after_the_code_table_is_fixed(workdir: Path, store: Store) -> None:
    lines = (ROOT / "samples" / "csv" / "staff_roster.csv").read_text().splitlines()
    bad = lines[1].split(",")
    bad[0], bad[4] = "E1999", "N"  # a gender code the table does not know yet
    await _poll_roster(
        workdir,
        store,
        asyncssh.generate_private_key("ssh-ed25519"),
        "\n".join([lines[0], lines[2], ",".join(bad)]) + "\n",
    )
    rows = message_rows(store)
    row = next(m for m in rows if m.status == "error" and "|" in (m.idempotency_key or ""))
    file_row = next(m for m in rows if m.control_id == "roster.csv")
    assert row.error_location == "roster.csv line 3 column gender"
    assert "E1999" not in employees(store)

    # dry run before the fix: still an error, nothing written
    before = snapshot(store)
    code, out = cli(workdir, "replay", str(row.id), "--dry-run")
    assert code == 0 and "error -> error AE" in out, out
    assert snapshot(store) == before

    table = workdir / "mappings" / "tables" / "staff_gender.yaml"
    table.write_text(table.read_text().replace("  X: other\n", "  X: other\n  N: other\n"))
    code, out = cli(workdir, "replay", str(row.id), "--dry-run")
    assert code == 0 and "error -> processed AA" in out and "1 record(s) would change" in out, out
    assert '+  "gender": "other"' in out
    assert snapshot(store) == before

    # the whole file's message holds no row: replay says so and leaves it alone
    code, out = cli(workdir, "replay", str(row.id), str(file_row.id))
    assert code == 1, out  # one of them could not be replayed
    assert "error -> processed AA" in out and "not replayable: message" in out, out
    assert employees(store)["E1999"]["gender"] == "other"
    by_id = {m.id: m for m in message_rows(store)}
    assert by_id[row.id].status == "processed" and by_id[row.id].error is None
    assert by_id[file_row.id].status == "error" and by_id[file_row.id].replay_count == 0

"""Bulk Data ``$export`` (issue 15, item 4) against a running engine, with httpx following the async
protocol: kick-off, status polling, the manifest, every NDJSON line parsed by ``fhir.resources.R4B``;
``_type``/``_since``; patient level; Group answered 404; cancel; an export resumed after the engine
is stopped mid-way and started again on the same store; scope refusals; who may read the files.
SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
from fhir.resources.R4B import get_fhir_model_class

from benchmarks.bulk_load import LoadState, load
from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.fhir.export import ExportManager, ExportSettings
from hms_ach.store import export_queries
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, start_fhir_engine
from tests.integration.test_fhir_everything import create

ASYNC = {"prefer": "respond-async", "accept": "application/fhir+json"}
MRN = "urn:hms-ach:id:mrn"


async def seed(http: httpx.AsyncClient, patients: int = 3) -> list[str]:
    ward = await create(http, {"resourceType": "Location", "name": "4W"})
    ids = []
    for i in range(patients):
        pid = await create(
            http,
            {"resourceType": "Patient", "identifier": [{"system": MRN, "value": f"B{i}"}], "gender": "male"},
        )
        await create(
            http,
            {
                "resourceType": "Encounter",
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "subject": {"reference": f"Patient/{pid}"},
                "location": [{"location": {"reference": f"Location/{ward}"}}],
            },
        )
        ids.append(pid)
    return ids


async def wait_done(http: httpx.AsyncClient, status_url: str, within: float = 60) -> httpx.Response:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        resp = await http.get(status_url)
        if resp.status_code != 202:
            return resp
        assert resp.headers["x-progress"] and int(resp.headers["retry-after"]) >= 1
        assert loop.time() < deadline, "the export did not finish"
        await asyncio.sleep(0.1)


async def read_files(http: httpx.AsyncClient, manifest: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every file of ``manifest``, each line parsed by fhir.resources.R4B; type -> resources."""
    out: dict[str, list[dict[str, Any]]] = {}
    for item in manifest["output"]:
        resp = await http.get(item["url"], headers={"accept": "application/fhir+ndjson"})
        assert resp.status_code == 200, resp.text
        assert resp.headers["content-type"].startswith("application/fhir+ndjson")
        lines = resp.content.decode().splitlines()
        assert len(lines) == item["count"]
        for line in lines:
            data = orjson.loads(line)
            assert data["resourceType"] == item["type"]
            get_fhir_model_class(item["type"]).model_validate(data)  # parses as R4B
            out.setdefault(item["type"], []).append(data)
    return out


async def kick_off(http: httpx.AsyncClient, path: str = "/$export", **params: str) -> str:
    resp = await http.get(path, params=params, headers=ASYNC)
    assert resp.status_code == 202, resp.text
    return resp.headers["content-location"]


async def test_system_export_end_to_end(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    patients = await seed(http)
    status_url = await kick_off(http)
    done = await wait_done(http, status_url)
    assert done.status_code == 200, done.text
    manifest = done.json()
    assert manifest["requiresAccessToken"] is True and manifest["error"] == []
    assert manifest["request"].endswith("/fhir/$export") and manifest["transactionTime"]
    files = await read_files(http, manifest)
    assert sorted(p["id"] for p in files["Patient"]) == sorted(patients)
    assert len(files["Encounter"]) == 3 and len(files["Location"]) == 1
    # and the shipped workflow forms, published at start (docs/review-cases.md)
    assert {o["type"] for o in manifest["output"]} == {"Patient", "Encounter", "Location", "Questionnaire"}

    # _type and _since; the patient level leaves the ward out
    typed = (await wait_done(http, await kick_off(http, _type="Encounter"))).json()
    assert [o["type"] for o in typed["output"]] == ["Encounter"]
    later = (await wait_done(http, await kick_off(http, _since="2999-01-01T00:00:00Z"))).json()
    assert later["output"] == []
    level = (await wait_done(http, await kick_off(http, "/Patient/$export"))).json()
    assert {o["type"] for o in level["output"]} == {"Patient", "Encounter"}
    fmt = {"_outputFormat": "application/fhir+ndjson"}
    assert (await http.get("/$export", params=fmt, headers=ASYNC)).status_code == 202

    # refusals: no Prefer, a bad format, an unknown parameter, Group
    assert (await http.get("/$export")).status_code == 400
    assert (await http.get("/$export?_outputFormat=text/csv", headers=ASYNC)).status_code == 400
    assert (await http.get("/$export?_typeFilter=x", headers=ASYNC)).status_code == 400
    group = await http.get("/Group/1/$export", headers=ASYNC)
    assert group.status_code == 404 and "Group" in group.json()["issue"][0]["diagnostics"]

    # another client may neither poll nor download; without a token: 401
    base = f"http://127.0.0.1:{fhir_engine.http_port}"
    other = auth_headers(fhir_engine, sub="someone-else")
    assert (await http.get(status_url, headers=other)).status_code == 404
    assert (await http.get(manifest["output"][0]["url"], headers=other)).status_code == 404
    async with httpx.AsyncClient(base_url=base) as anon:
        assert (await anon.get(manifest["output"][0]["url"])).status_code == 401

    # the kick-off and the downloads are recorded as export accesses
    for _ in range(50):
        audit = await http.get("/AuditEvent", params={"subtype": "export", "_count": 100})
        if audit.json().get("total", 0) >= 4:
            break
        await asyncio.sleep(0.1)
    assert audit.json().get("total", 0) >= 4


async def test_scope_refusal(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    await seed(http, 1)
    user = auth_headers(fhir_engine, "user/*.rs")
    resp = await http.get("/$export", headers={**ASYNC, **user})
    assert resp.status_code == 403 and "system/*.read" in resp.json()["issue"][0]["diagnostics"]
    only = auth_headers(fhir_engine, "system/Patient.read")
    assert (await http.get("/$export?_type=Encounter", headers={**ASYNC, **only})).status_code == 403
    async with httpx.AsyncClient(base_url=http.base_url, headers=only, timeout=30) as limited:
        done = await wait_done(limited, await kick_off(limited))
        assert [o["type"] for o in done.json()["output"]] == ["Patient"]


async def test_cancel_deletes_the_files(fhir_engine: Engine, http: httpx.AsyncClient) -> None:
    await seed(http, 2)
    status_url = await kick_off(http)
    manifest = (await wait_done(http, status_url)).json()
    export_dir = fhir_engine.config.data_dir / "exports" / status_url.rsplit("/", 1)[1]
    assert export_dir.is_dir() and any(export_dir.iterdir())
    assert (await http.delete(status_url)).status_code == 202
    assert not export_dir.exists()
    assert (await http.get(status_url)).status_code == 404
    assert (await http.get(manifest["output"][0]["url"])).status_code == 404
    assert (await http.delete(status_url)).status_code == 404


class StopsAfterThreeBatches(ExportManager):
    """The worker, asked to stop (as by an engine stop) once it has committed three batches."""

    saves = 0

    def _save(self, export_id: str, progress: dict[str, Any], lease: datetime | None) -> None:
        self.saves += 1
        if self.saves == 3:
            self._stopping.set()
        super()._save(export_id, progress, lease)


async def test_an_export_resumes_after_a_restart(tmp_path: Path, store: Store) -> None:
    """The engine stops after the first batches; started again on the same store it finishes the
    export: every record exactly once."""
    state = LoadState(seed=15)
    load(store.url, state, practitioners=0, patients=300)
    assert state.patients == 300
    engine = await start_fhir_engine(tmp_path, store)
    base = f"http://127.0.0.1:{engine.http_port}/fhir"
    assert engine.exports is not None
    engine.exports.stop()  # no worker: the kick-off waits
    headers = auth_headers(engine)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as http:
        status_url = await kick_off(http, _type="Patient")
    # run the worker by hand for three batches, then stop it as an engine stop does
    manager = StopsAfterThreeBatches(store, engine.exports.root, ExportSettings(batch_size=50))
    await asyncio.to_thread(manager.run_pending)
    export_file = engine.exports.root / status_url.rsplit("/", 1)[1] / "Patient.ndjson"
    assert 0 < len(export_file.read_bytes().splitlines()) < 300
    with export_file.open("ab") as f:
        f.write(b'{"half a line')  # written after the last commit: cut away on resume
    await engine.stop()

    engine = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)  # the same store
    await engine.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{engine.http_port}/fhir", headers=auth_headers(engine), timeout=30
        ) as http:
            status_url = status_url.replace(base, str(http.base_url).rstrip("/"))
            done = await wait_done(http, status_url)
            assert done.status_code == 200, done.text
            manifest = done.json()
            manifest["output"] = [
                o | {"url": o["url"].replace(base, str(http.base_url).rstrip("/"))}
                for o in manifest["output"]
            ]
            files = await read_files(http, manifest)
        ids = [p["id"] for p in files["Patient"]]
        assert len(ids) == 300 and len(set(ids)) == 300
    finally:
        await engine.stop()


def test_old_exports_are_deleted_with_their_files(tmp_path: Path, store: Store) -> None:
    manager = ExportManager(store, tmp_path / "exports", ExportSettings(retention_hours=1))
    now = datetime.now(UTC)
    for export_id, age in (("old", timedelta(hours=2)), ("new", timedelta(minutes=5))):
        (tmp_path / "exports" / export_id).mkdir(parents=True)
        (tmp_path / "exports" / export_id / "Patient.ndjson").write_bytes(b"{}\n")
        row = {
            "id": export_id,
            "status": "complete",
            "kind": "system",
            "sub": "s",
            "client_id": None,
            "request": "r",
            "base": "b",
            "types": "[]",
            "since": None,
            "transaction_time": now - age,
            "directory": str(tmp_path / "exports" / export_id),
            "created_at": now - age,
        }
        with store.transaction() as tx:
            export_queries.insert_export(tx, row)
    manager._cleanup()  # noqa: SLF001  (what the worker runs every cleanup_every_seconds)
    assert not (tmp_path / "exports" / "old").exists() and (tmp_path / "exports" / "new").exists()
    with store.read() as conn:
        assert export_queries.export_row(conn, "old") is None
        assert export_queries.export_row(conn, "new") is not None


class CancelledMidway(ExportManager):
    """The worker, whose export is cancelled (its row deleted, as DELETE does) after its first batch."""

    def _save(self, export_id: str, progress: dict[str, Any], lease: datetime | None) -> None:
        with self.store.transaction() as tx:
            export_queries.delete_export(tx, export_id)
        super()._save(export_id, progress, lease)


async def test_cancel_while_running_stops_the_worker_and_deletes_the_files(
    tmp_path: Path, store: Store
) -> None:
    load(store.url, LoadState(seed=16), practitioners=0, patients=40)
    engine = await start_fhir_engine(tmp_path, store)
    try:
        assert engine.exports is not None
        engine.exports.stop()  # no worker: the kick-off waits for the one below
        base = f"http://127.0.0.1:{engine.http_port}/fhir"
        async with httpx.AsyncClient(base_url=base, headers=auth_headers(engine), timeout=30) as http:
            status_url = await kick_off(http, _type="Patient")
            running = (await http.get(status_url)).headers["x-progress"]
            assert running.startswith("accepted")
            manager = CancelledMidway(store, engine.exports.root, ExportSettings(batch_size=10))
            await asyncio.to_thread(manager.run_pending)
            assert not (engine.exports.root / status_url.rsplit("/", 1)[1]).exists()
            assert (await http.get(status_url)).status_code == 404
    finally:
        await engine.stop()

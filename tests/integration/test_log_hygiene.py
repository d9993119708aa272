"""Issue 13: no field values (PHI) in any log line, whatever fails.

A running engine (MLLP, the FHIR API, /api/v1, a fhir_push sink), logging through the production
setup (``hms-ach run``'s JSON lines) at DEBUG, gets inputs that carry the marker ``ZZMARKERZZ`` in
patient fields down every failure path: HL7 that python-hl7 or our parser refuses, a mapping that
fails on a value, a sink whose peer refuses (its answer echoes the identifier), a database error
whose text holds the value (a trigger), bad FHIR and /api/v1 bodies, and ids and query values in
URLs. The marker must appear in no line at any level, tracebacks included. Both stores."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from sqlalchemy import text

from hms_ach.app.cli import _setup_logging
from hms_ach.app.config import LoggingSettings, load_config
from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, mllp_channel

ROOT = Path(__file__).resolve().parents[2]
MARKER = "ZZMARKERZZ"

pytestmark = pytest.mark.timeout(120)

GOOD = (ROOT / "samples/hl7/adt_a01.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")


def _hl7(control: str, **swap: str) -> bytes:
    """The A01 sample under control id ``control`` with parts of it replaced (old -> new)."""
    raw = GOOD.replace(b"S-A01-0001", control.encode())
    for old, new in swap.items():
        raw = raw.replace(old.replace("_", "|").encode(), new.encode())
    return raw


#: Messages that fail in the parser, the mapping or the store, each carrying the marker.
BAD_HL7: dict[str, bytes] = {
    "marked identifier (goes to the sink)": _hl7("HYG-1", Rivera_Maria=f"{MARKER}ID|Maria").replace(
        b"100001^^^GENHOSP^MR", f"{MARKER}01^^^GENHOSP^MR".encode()
    ),
    "bad sex code": _hl7("HYG-2", _F_=f"|{MARKER}|"),
    "bad birth date": _hl7("HYG-3", _19750314_=f"|19{MARKER}|"),
    "undecodable escape": _hl7("HYG-4", Rivera=f"\\X{MARKER}\\"),
    "invalid utf-8": _hl7(
        "HYG-5", Rivera=f"{MARKER}\udcff".encode("utf-8", "surrogateescape").decode("latin-1")
    ).replace(b"\xc3\xbf", b"\xff\xfe"),
    "unsupported version": _hl7("HYG-6", Rivera=MARKER).replace(b"|P|2.5.1", f"|P|2.{MARKER}".encode()),
    "unsupported type": _hl7("HYG-7").replace(b"ADT^A01^ADT_A01", f"ADT^{MARKER}".encode()),
    "truncated header": b"MSH|^~\\&|ADTSYS|GENHOSP|" + MARKER.encode(),
    "no header": f"PID|1||{MARKER}^^^GENHOSP^MR||{MARKER}^Maria\r".encode(),
    "database error": _hl7("HYG-8", Rivera=f"{MARKER}DB").replace(
        b"100001^^^GENHOSP^MR", b"HYGDB01^^^GENHOSP^MR"
    ),
}


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The production log setup (JSON lines, rate limiting on) at DEBUG, into a buffer."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    _setup_logging("DEBUG", LoggingSettings(), stream=stream)
    try:
        yield stream
    finally:
        root.handlers[0].flush()
        root.handlers[:] = saved
        root.setLevel(level)


class RefusingPeer:
    """A FHIR server that refuses everything with an OperationOutcome echoing the request URL
    (so that the sink's error text holds the patient's identifier)."""

    def __init__(self) -> None:
        self.requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        await request.read()
        outcome = {
            "resourceType": "OperationOutcome",
            "issue": [
                {"severity": "error", "code": "exception", "diagnostics": f"cannot serve {request.path_qs}"}
            ],
        }
        return web.json_response(outcome, status=500)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def peer() -> AsyncIterator[RefusingPeer]:
    server = RefusingPeer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def _refuse_marked_rows(store: Store) -> None:
    """A database error whose text holds the stored value: a trigger refusing the marked history row."""
    with store.transaction() as conn:
        if store.url.startswith("sqlite"):
            conn.execute(
                text(
                    "CREATE TRIGGER hygiene_refuse BEFORE INSERT ON resource_history "
                    f"WHEN NEW.resource LIKE '%{MARKER}DB%' "
                    f"BEGIN SELECT RAISE(ABORT, 'refused: {MARKER}DB is not welcome'); END"
                )
            )
        else:
            conn.execute(
                text(
                    "CREATE FUNCTION hygiene_refuse() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.resource LIKE '%{MARKER}DB%' THEN RAISE EXCEPTION 'refused: %', NEW.resource; "
                    "END IF; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
            )
            conn.execute(
                text(
                    "CREATE TRIGGER hygiene_refuse BEFORE INSERT ON resource_history "
                    "FOR EACH ROW EXECUTE FUNCTION hygiene_refuse()"
                )
            )


async def _send(port: int, raw: bytes) -> bytes | None:
    """One frame on a new connection; its ACK, or None when the engine answers none."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"\x0b" + raw + b"\x1c\r")
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\x1c\r"), 20)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
        return None
    finally:
        writer.close()


async def _engine(tmp_path: Path, store: Store, peer: RefusingPeer) -> Engine:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "drop").mkdir()
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n  commit_timeout_seconds: 30\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        "jobs:\n  enabled: false\n"
        "channels:\n"
        "  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n    idle_timeout_seconds: 5\n"
        "  - name: fhir_in\n    type: fhir_rest\n"
        f"  - name: drop_in\n    type: file_drop\n    directory: {tmp_path / 'drop'}\n"
        f"    work_dir: {tmp_path / 'work'}\n    poll_interval_seconds: 3600\n    min_file_age_seconds: 0\n"
        "    stable_seconds: 0\n    max_file_bytes: 4096\n"
        "sinks:\n"
        f"  - name: mirror\n    type: fhir_push\n    base_url: http://127.0.0.1:{peer.port}/fhir\n"
        "    retry_initial_seconds: 0.05\n    retry_max_seconds: 0.2\n    timeout_seconds: 5\n"
    )
    engine = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await engine.start()
    return engine


async def test_no_field_value_reaches_any_log_line(
    tmp_path: Path, store: Store, peer: RefusingPeer, log_stream: io.StringIO
) -> None:
    _refuse_marked_rows(store)
    engine = await _engine(tmp_path, store, peer)
    try:
        port = mllp_channel(engine).port
        acks = {name: await _send(port, raw) for name, raw in BAD_HL7.items()}
        for _ in range(3):  # a sender resends what a loaded store could not commit in time
            if b"MSA|AA" in (acks["marked identifier (goes to the sink)"] or b""):
                break
            acks["marked identifier (goes to the sink)"] = await _send(
                port, BAD_HL7["marked identifier (goes to the sink)"]
            )
        assert b"MSA|AA" in (acks["marked identifier (goes to the sink)"] or b""), acks
        codes = {name: (ack or b"").split(b"MSA|")[-1][:2].decode() for name, ack in acks.items()}
        refused = {name for name, code in codes.items() if code in ("AE", "AR")}
        assert refused >= set(BAD_HL7) - {
            "marked identifier (goes to the sink)",
            "undecodable escape",
            "database error",
        }, codes

        base = f"http://127.0.0.1:{engine.http_port}"
        fhir = {"content-type": "application/fhir+json"}
        async with httpx.AsyncClient(base_url=base, timeout=20, headers=auth_headers(engine)) as client:
            patient = {"resourceType": "Patient", "gender": MARKER, "name": [{"family": MARKER}]}
            assert (await client.post("/fhir/Patient", json=patient, headers=fhir)).status_code in (400, 422)
            bad_json = f'{{"resourceType": "Patient", "name": [{{"family": "{MARKER}"'
            assert (await client.post("/fhir/Patient", content=bad_json, headers=fhir)).status_code == 400
            employee = {"employee_number": MARKER, "family": "", "npi": MARKER, "gender": MARKER}
            assert (await client.post("/api/v1/employees", json=employee)).status_code == 422
            assert (await client.get(f"/fhir/Patient/{MARKER}")).status_code == 404
            assert (await client.get(f"/fhir/Patient?name={MARKER}&birthdate={MARKER}")).status_code in (
                200,
                400,
            )
            assert (await client.get(f"/api/v1/employees/{MARKER}?q={MARKER}")).status_code == 404

        # files whose names carry the marker: too large, a symbolic link, and one with a bad message
        drop = tmp_path / "drop"
        (drop / f"{MARKER}_big.hl7").write_bytes(GOOD * 10)
        (drop / f"{MARKER}_link.hl7").symlink_to(drop / f"{MARKER}_big.hl7")
        (drop / f"{MARKER}_sex.hl7").write_bytes(BAD_HL7["bad sex code"].replace(b"HYG-2", b"HYG-9"))
        polled = await engine.channels["drop_in"].poll()  # type: ignore[attr-defined]
        assert len(polled.skipped) == 2 and len(polled.files) == 1, polled

        # the sink fails on the marked patient: its peer's answer echoes the identifier
        deadline = asyncio.get_running_loop().time() + 30
        while "outbox.delivery_failed" not in log_stream.getvalue():
            assert asyncio.get_running_loop().time() < deadline, "the sink never failed"
            await asyncio.sleep(0.1)
        assert peer.requests >= 1
    finally:
        await engine.stop()
    logging.getLogger().handlers[0].flush()
    output = log_stream.getvalue()
    # no line holds a value, whatever its level
    leaks = [line for line in output.splitlines() if MARKER in line]
    assert leaks == []
    assert "Traceback" not in output
    lines = [json.loads(line) for line in output.splitlines()]
    events = {line["event"] for line in lines}
    # the failure paths were taken and logged
    logged = {
        "outbox.delivery_failed",
        "http.request",
        "message.error",
        "file.size_error",
        "file.symlink_error",
    }
    assert logged <= events, sorted(events)
    assert any(
        line["event"] == "http.request" and line["route"] == "/fhir/{resource_type}/{rid}" for line in lines
    )
    failed = next(line for line in lines if line["event"] == "outbox.delivery_failed")
    assert failed["sink"] == "mirror" and failed["http_status"] == 500

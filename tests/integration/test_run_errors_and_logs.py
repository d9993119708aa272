"""Issue 13: one clear line for a start-up failure (a port in use, a bad time zone), database URLs
redacted, no field values or bound SQL parameters in log lines, and ``hms-ach send`` with MSH-15 NE
and a timeout on one message. Real sockets, real processes, the real store."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from hms_ach.app.cli import _JsonLogFormatter, app
from hms_ach.core.redact import redact_url
from hms_ach.hl7v2.client import expects_ack, send_each
from hms_ach.hl7v2.mllp import FS, VT
from hms_ach.hl7v2.policy import Hl7Policy
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store
from hms_ach.store.writer import StoreWriter
from tests.integration.pipeline_helpers import process_sync

ROOT = Path(__file__).resolve().parents[2]


def test_port_in_use_gives_one_line_and_exit_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "channels.yaml"
        cfg.write_text(
            f"engine:\n  database_url: sqlite:///{tmp_path}/s.db\n  mappings: {ROOT / 'mappings'}\n"
            "  watch: false\nhttp:\n  enabled: false\njobs:\n  enabled: false\n"
            f"channels:\n  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: {port}\n"
        )
        done = subprocess.run(
            [sys.executable, "-m", "hms_ach.app.cli", "run", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    expected = f"hms-ach: cannot listen on 127.0.0.1:{port} (channel adt_in): address already in use"
    assert lines[-1] == expected
    assert [line for line in lines if line.startswith("hms-ach:")] == [expected]


def test_check_reports_a_bad_time_zone_with_its_position(tmp_path: Path) -> None:
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(
        f"engine:\n  mappings: {ROOT / 'mappings'}\n  timezone: Mars/Olympus\njobs:\n  timezone: Europe/Nowhere\n"
    )
    result = CliRunner().invoke(app, ["check", "-c", str(cfg)])
    assert result.exit_code == 1
    assert f"{cfg}:3:3: engine.timezone: unknown time zone 'Mars/Olympus' (expected an IANA time zone" in (
        result.output
    )
    assert f"{cfg}:5:3: jobs.timezone: unknown time zone 'Europe/Nowhere'" in result.output
    run = CliRunner().invoke(app, ["run", "-c", str(cfg)])
    assert run.exit_code == 2 and "Mars/Olympus" in run.output and run.exception is not None
    assert isinstance(run.exception, SystemExit)


def test_database_urls_are_redacted() -> None:
    assert redact_url("postgresql://user:secret@host/db") == "postgresql://user:***@host/db"
    assert redact_url("postgresql+psycopg://u:p@ss/w@h:5432/db") == "postgresql+psycopg://u:***@h:5432/db"
    assert redact_url("postgresql://h/db?user=a&password=b") == "postgresql://h/db?user=a&password=***"
    assert redact_url("sqlite:///hms_ach.db") == "sqlite:///hms_ach.db"
    assert redact_url("postgresql://user@host/db") == "postgresql://user@host/db"


def test_run_prints_the_store_url_without_its_password(tmp_path: Path) -> None:
    cfg = tmp_path / "channels.yaml"
    cfg.write_text("engine:\n  database_url: postgresql://user:s3cr3t-pw@127.0.0.1:1/db\n")
    done = subprocess.run(
        [sys.executable, "-m", "hms_ach.app.cli", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "s3cr3t-pw" not in done.stderr + done.stdout
    assert "postgresql://user:***@127.0.0.1:1/db" in done.stderr


@pytest.fixture
def pipeline(store: Store) -> Iterator[Pipeline]:
    writer = StoreWriter(store)
    yield Pipeline(writer, MappingEngine(load_mappings(ROOT / "mappings")))
    writer.stop()


def test_no_field_values_or_sql_parameters_in_log_lines(
    pipeline: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    raw = (ROOT / "samples/hl7/bad/bad_sex_code.hl7").read_bytes()
    raw = raw.replace(b"|Q|||", b"|ZZPHIVALUE|||").replace(b"Ferreira", b"ZZPHINAME")
    formatter = _JsonLogFormatter()
    with caplog.at_level(logging.DEBUG):
        out = process_sync(pipeline, raw, Hl7Policy("test"))
        assert out.ack_code == "AE"
        secret = "ZZPHIPARAM-12345"
        with pytest.raises(Exception) as raised, pipeline.writer.store.transaction() as conn:
            conn.execute(text("INSERT INTO no_such_table (x) VALUES (:x)"), {"x": secret})
        assert secret not in str(raised.value)  # hide_parameters: no bound values in SQL error text
        try:
            raise RuntimeError("decoding failed") from raised.value
        except RuntimeError:
            logging.getLogger("hms_ach.test").exception("test.sql_failed")
    lines = [formatter.format(r) for r in caplog.records]
    assert any("test.sql_failed" in line and "Error(" in line for line in lines)
    for line in lines:
        assert "ZZPHI" not in line and "Traceback" not in line


def _ack(message: bytes) -> bytes:
    control = message.split(b"\r")[0].split(b"|")[9]
    return (
        VT
        + b"MSH|^~\\&|R|R|S|S|20260101||ACK|A"
        + control
        + b"|P|2.5.1\rMSA|AA|"
        + control
        + b"\r"
        + FS
        + b"\r"
    )


class _Listener:
    """An MLLP peer on 127.0.0.1 that ACKs every message except those with MSH-15 NE and SILENT."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.received: list[bytes] = []
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.readuntil(FS + b"\r")
                message = data.strip(VT + FS + b"\r")
                self.received.append(message)
                if expects_ack(message) and b"SILENT" not in message:
                    writer.write(_ack(message))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def _message(control: str, msh15: str = "") -> bytes:
    return f"MSH|^~\\&|S|S|R|R|20260101||ADT^A01|{control}|P|2.5.1|||{msh15}\rPID|1||1^^^H^MR\r".encode()


def test_expects_ack_follows_msh_15() -> None:
    assert not expects_ack(_message("1", "NE"))
    assert expects_ack(_message("1", ""))  # original mode: the ACK is expected
    assert expects_ack(_message("1", "AL"))
    assert expects_ack(b"MSH|^~\\&|S\r")


def test_send_skips_the_ack_for_ne_and_goes_on_after_a_timeout(tmp_path: Path) -> None:
    listener = _Listener()
    try:
        msgs = [_message("NE1", "NE"), _message("SILENT"), _message("OK1"), _message("OK2", "AL")]
        results = asyncio.run(asyncio.wait_for(send_each("127.0.0.1", listener.port, msgs, 0.5), 10))
        assert [r.ack_expected for r in results] == [False, True, True, True]
        assert results[0].ack is None and results[0].error is None
        assert results[1].error is not None and "no ACK" in results[1].error
        assert results[2].ack is not None and b"MSA|AA|OK1" in results[2].ack
        assert results[3].ack is not None and b"MSA|AA|OK2" in results[3].ack
        files = []
        for i, m in enumerate(msgs):
            files.append(tmp_path / f"{i}.hl7")
            files[-1].write_bytes(m)
        run = CliRunner().invoke(
            app, ["send", *map(str, files), "--port", str(listener.port), "--timeout", "0.5"]
        )
        assert run.exit_code == 1  # one message got no ACK
        assert "no ACK expected" in run.output and "MSA|AA|OK2" in run.output.replace("\n", "\r")
        assert "no ACK from" in run.output
    finally:
        listener.close()

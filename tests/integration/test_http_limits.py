"""Issue 13: the body limit of every HTTP route (``http.max_body_bytes``) and the access log, against
a real ``hms-ach run`` process and real HTTP clients (httpx, and a raw socket where a client must stop
sending once it is answered).

The server's memory is read from /proc: its peak RSS (VmHWM) must not grow by the size of a
refused body, which is enforced while the body streams in, never after buffering it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.integration.engine_helpers import local_authenticator, mint_token, wait_until_live

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 1024 * 1024  # http.max_body_bytes of the server under test
BIG = 200 * 1024 * 1024  # the body a client tries to send
MB = 1024 * 1024

pytestmark = pytest.mark.timeout(180)


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    token: str  # a bearer token of the engine's own issuer (every route but /health needs one)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def peak_rss(self) -> int:
        """The server process's peak resident set size (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/<pid>/status")

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                data = json.loads(line)
                if data.get("event") == name:
                    out.append(data)
        return out


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("http_limits")
    shutil.copytree(ROOT / "mappings", base / "mappings")
    port = _free_port()
    (base / "channels.yaml").write_text(
        f"engine:\n  database_url: sqlite:///{base}/s.db\n  mappings: mappings\n  watch: false\n"
        f"http:\n  host: 127.0.0.1\n  port: {port}\n  max_body_bytes: {LIMIT}\n"
        "jobs:\n  enabled: false\n"
        "channels:\n  - name: fhir_in\n    type: fhir_rest\n    max_body_bytes: 16777216\n"
    )
    log = base / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "hms_ach.app.cli", "run", "-c", str(base / "channels.yaml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=base,
        )
    # the engine's local issuer keeps its key in <config dir>/data: a token signed with it
    token = mint_token(local_authenticator(base / "data"), sub="http-limits")
    srv = Server(process, port, log, token)
    try:
        wait_until_live(srv.base, process, log.read_text, 90)
        with httpx.Client(base_url=srv.base, timeout=30, headers=srv.auth) as client:  # lazy set-up
            for method, path, ctype in ROUTES:
                client.request(method, path, content=b"{}", headers={"content-type": ctype})
        yield srv
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _read_response(sock: socket.socket, deadline: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, headers, body by Content-Length) from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of its answer"
        body += chunk
    return status, headers, body[:length]


def _request_head(method: str, path: str, ctype: str, framing: str, token: str) -> bytes:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
        f"Authorization: Bearer {token}\r\n{framing}\r\n\r\n"
    ).encode()


def _check_413(path: str, headers: dict[str, str], body: bytes) -> None:
    doc = json.loads(body)
    if path.startswith("/api/v1"):
        assert headers["content-type"].startswith("application/problem+json")
        assert doc["status"] == 413 and "http.max_body_bytes" in doc["detail"]
    else:
        assert headers["content-type"].startswith("application/fhir+json")
        assert doc["resourceType"] == "OperationOutcome"
        assert (
            doc["issue"][0]["code"] == "too-costly"
            and "http.max_body_bytes" in doc["issue"][0]["diagnostics"]
        )


ROUTES = [
    ("POST", "/api/v1/employees", "application/json"),
    ("POST", "/fhir/Patient", "application/fhir+json"),
    ("POST", "/fhir", "application/fhir+json"),
    ("GET", "/health", "application/json"),  # a route that never reads a body is limited too
]


@pytest.mark.parametrize(("method", "path", "ctype"), ROUTES)
def test_a_declared_oversize_body_is_refused_before_a_byte_is_read(
    server: Server, method: str, path: str, ctype: str
) -> None:
    before = server.peak_rss()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_request_head(method, path, ctype, f"Content-Length: {BIG}", server.token))
        status, headers, body = _read_response(sock, time.monotonic() + 20)
    assert status == 413
    assert headers["connection"] == "close"
    _check_413(path, headers, body)
    assert server.peak_rss() - before < 16 * MB


@pytest.mark.parametrize(("method", "path", "ctype"), ROUTES[:3])
def test_a_chunked_oversize_body_is_refused_while_it_streams(
    server: Server, method: str, path: str, ctype: str
) -> None:
    """A client streams a 200 MB chunked body and stops when answered: the answer is a 413 after
    little more than the limit, and the server's peak RSS grows by far less than the body."""
    before = server.peak_rss()
    chunk = b"x" * 65536
    frame = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    deadline = time.monotonic() + 60
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(_request_head(method, path, ctype, "Transfer-Encoding: chunked", server.token))
        answered = False
        while sent < BIG and not answered:
            sock.settimeout(5)
            try:
                sock.sendall(frame)
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError, TimeoutError):
                answered = True  # the server stopped reading: its answer is waiting
            sock.setblocking(False)
            try:
                answered = answered or bool(sock.recv(1, socket.MSG_PEEK))
            except BlockingIOError:
                pass
            sock.setblocking(True)
            assert time.monotonic() < deadline, f"no answer after {sent} bytes"
        status, headers, body = _read_response(sock, time.monotonic() + 20)
    assert status == 413
    _check_413(path, headers, body)
    assert sent < 16 * MB, f"the client could send {sent} bytes before the 413"
    assert server.peak_rss() - before < 32 * MB


def test_bodies_under_the_limit_are_served_with_content_length_or_chunked(server: Server) -> None:
    employee = {"employee_number": "HTTPLIM-1", "family": "Limit", "given": ["Body"]}
    with httpx.Client(base_url=server.base, timeout=30, headers=server.auth) as client:
        created = client.post("/api/v1/employees", json=employee)
        assert created.status_code == 201, created.text

        def chunks() -> Iterator[bytes]:
            text = json.dumps({**employee, "employee_number": "HTTPLIM-2"}).encode()
            yield text[:10]
            yield text[10:]

        streamed = client.post(
            "/api/v1/employees", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 201, streamed.text
        big = client.post(
            "/api/v1/employees", content=b" " * (LIMIT + 1), headers={"content-type": "application/json"}
        )
        assert big.status_code == 413 and big.headers["content-type"].startswith("application/problem+json")


def test_one_access_log_event_per_request_with_the_route_template(server: Server) -> None:
    with httpx.Client(base_url=server.base, timeout=30, headers=server.auth) as client:
        assert client.get("/fhir/Patient/ZZACCESSID?name=ZZQUERYVALUE").status_code == 404
        assert client.get("/api/v1/employees/ZZEMPLOYEE?x=ZZQUERYVALUE").status_code == 404
        assert client.get("/no/such/ZZPATH").status_code == 404
    deadline = time.monotonic() + 10
    while True:
        events = server.events("http.request")
        marked = [
            e
            for e in events
            if e.get("route") in ("/fhir/{resource_type}/{rid}", "/api/v1/employees/{employee_id}")
        ]
        # the line of the last request may follow its answer: wait for it too
        unmatched = any(e.get("route") == "(unmatched)" and e.get("status") == 404 for e in events)
        if (len(marked) >= 2 and unmatched) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    text = server.log.read_text(errors="replace")
    assert "ZZACCESSID" not in text and "ZZQUERYVALUE" not in text and "ZZEMPLOYEE" not in text
    assert "ZZPATH" not in text
    assert "uvicorn.access" not in text and '"GET /' not in text  # uvicorn's own access log is off
    fhir = next(e for e in events if e["route"] == "/fhir/{resource_type}/{rid}")
    assert fhir["method"] == "GET" and fhir["status"] == 404 and fhir["caller"] == "http-limits"
    assert isinstance(fhir["duration_ms"], float) and str(fhir["client"]).startswith("127.0.0.1:")
    assert any(e["route"] == "/api/v1/employees/{employee_id}" and e["status"] == 404 for e in events)
    assert any(e["route"] == "(unmatched)" and e["status"] == 404 for e in events)
    # a 413 for a streamed body carries its route; one for a declared length is answered before routing
    assert any(e["route"] == "/api/v1/employees" and e["status"] == 413 for e in events)
    assert any(e["route"] == "(unmatched)" and e["status"] == 413 for e in events)


def test_no_server_logs_an_exception_for_a_refused_body(server: Server) -> None:
    text = server.log.read_text(errors="replace")
    assert "Traceback" not in text
    assert "api.unexpected_error" not in text and "Exception in ASGI application" not in text
    assert os.path.exists(f"/proc/{server.process.pid}")

"""TLS on every port, with real peers on loopback: ``openssl s_client`` and our MLLP client against
an MLLP listener over TLS (and mutual TLS with a subject allow-list), the ``allow_from`` source
allow-list, and a running engine serving HTTPS to httpx and fhirpy while ``hms-ach send --tls``
delivers to its MLLP channel. Certificates are made here with ``cryptography``: a test CA, a server
certificate for 127.0.0.1 and localhost, client certificates with different subjects, and a second,
unrelated CA."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from fhirpy import AsyncFHIRClient
from sqlalchemy import text
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.core.tls import (
    MINIMUM_TLS_VERSION,
    MllpTlsSettings,
    SourceAllowList,
    client_context,
    mllp_tls_with_environment,
    subject_allowed,
    subject_of,
)
from hms_ach.hl7v2.client import send_messages
from hms_ach.hl7v2.mllp import FS, MllpConfig, MllpError, MllpServer, Peer, frame
from tests.integration.engine_helpers import ROOT, auth_headers

pytestmark = pytest.mark.timeout(60)

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl command is not installed")

MESSAGE = (
    b"MSH|^~\\&|LAB|HOSP|HMS|HOSP|20260101120000||ADT^A01^ADT_A01|TLS1|P|2.5\r"
    b"EVN|A01|20260101120000\rPID|1||T-1^^^HOSP^MR||DOE^JANE\r"
)


# certificates ---------------------------------------------------------------------------------


def _name(cn: str, org: str = "Test Hospital") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


@dataclass
class Issued:
    cert: Path
    key: Path


class Authority:
    """A test CA that writes its certificate and the certificates it signs as PEM files."""

    def __init__(self, directory: Path, cn: str):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.name = _name(cn)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert = directory / f"{cn}.pem"
        self.cert.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, cn: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.directory / f"{cn}.crt", self.directory / f"{cn}.key")
        issued.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        issued.key.chmod(0o600)
        return issued


@dataclass
class Pki:
    ca: Authority
    other_ca: Authority
    server: Issued
    lab: Issued  # CN=lab-analyzer, on the allow-lists
    intruder: Issued  # CN=intruder, signed by the right CA, on no allow-list
    stranger: Issued  # CN=lab-analyzer too, but signed by the other CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory, "Test Hospital CA")
    other = Authority(directory, "Other CA")
    return Pki(
        ca=ca,
        other_ca=other,
        server=ca.issue("hms-ach-server", server=True),
        lab=ca.issue("lab-analyzer", server=False),
        intruder=ca.issue("intruder", server=False),
        stranger=other.issue("lab-analyzer-elsewhere", server=False),
    )


# an MLLP listener that records who sent what --------------------------------------------------


def _ack(control_id: str) -> bytes:
    return f"MSH|^~\\&|HMS|HOSP|LAB|HOSP|20260101120000||ACK|A-{control_id}|P|2.5\rMSA|AA|{control_id}\r".encode()


class Recorder:
    def __init__(self) -> None:
        self.peers: list[str] = []

    async def __call__(self, payload: bytes, peer: str) -> bytes:
        self.peers.append(peer)
        control_id = payload.split(b"\r")[0].split(b"|")[9].decode()
        return _ack(control_id)


def _listener(tls: MllpTlsSettings | None, **settings: object) -> tuple[MllpServer, Recorder]:
    recorder = Recorder()
    config = MllpConfig.model_validate({"host": "127.0.0.1", "port": 0, "tls": tls, **settings})
    return MllpServer(config, recorder), recorder


async def _openssl_exchange(port: int, *args: str, payload: bytes = MESSAGE, deadline: float = 15) -> bytes:
    """Run ``openssl s_client`` against the listener, send one framed message through its stdin and
    return what came back up to the end of the first frame (b"" when the connection failed)."""
    assert OPENSSL is not None
    proc = await asyncio.create_subprocess_exec(
        OPENSSL,
        "s_client",
        "-connect",
        f"127.0.0.1:{port}",
        "-quiet",  # no session chatter on stdout, and stdin EOF does not end the session (-ign_eof)
        *args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    received = b""
    try:
        try:
            proc.stdin.write(frame(payload))
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # openssl already ended (a refused handshake can be that quick): read what it said
        async with asyncio.timeout(deadline):
            while FS not in received:
                chunk = await proc.stdout.read(4096)
                if not chunk:
                    break
                received += chunk
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    return received


def _msa(ack: bytes) -> list[str]:
    line = next(seg for seg in ack.strip(b"\x0b\x1c\r").split(b"\r") if seg.startswith(b"MSA"))
    return line.decode().split("|")[1:3]


# MLLP over TLS --------------------------------------------------------------------------------


@needs_openssl
async def test_mllp_over_tls_answers_openssl_s_client(pki: Pki) -> None:
    server, recorder = _listener(MllpTlsSettings(cert=str(pki.server.cert), key=str(pki.server.key)))
    async with server:
        reply = await _openssl_exchange(
            server.port, "-CAfile", str(pki.ca.cert), "-verify_return_error", "-servername", "localhost"
        )
    assert _msa(reply) == ["AA", "TLS1"]
    (peer,) = recorder.peers
    assert isinstance(peer, Peer) and peer.host == "127.0.0.1" and peer.cert_subject is None


@needs_openssl
async def test_mutual_tls_passes_the_client_subject_to_the_handler(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    tls = MllpTlsSettings(
        cert=str(pki.server.cert),
        key=str(pki.server.key),
        client_ca=str(pki.ca.cert),
        allowed_subjects=["lab-analyzer"],
    )
    server, recorder = _listener(tls)
    caplog.set_level(logging.INFO, logger="hms_ach.hl7v2.mllp")
    async with server:
        reply = await _openssl_exchange(
            server.port,
            "-CAfile",
            str(pki.ca.cert),
            "-cert",
            str(pki.lab.cert),
            "-key",
            str(pki.lab.key),
        )
        # our own client, with the full RFC 4514 subject on the allow-list this time
        acks = await send_messages(
            "127.0.0.1",
            server.port,
            [MESSAGE.replace(b"TLS1", b"TLS2")],
            timeout=10,
            ssl_context=client_context(str(pki.ca.cert), str(pki.lab.cert), str(pki.lab.key)),
        )
    assert _msa(reply) == ["AA", "TLS1"]
    assert _msa(acks[0]) == ["AA", "TLS2"]
    subjects = [p.cert_subject for p in recorder.peers if isinstance(p, Peer)]
    assert [s.common_name if s else None for s in subjects] == ["lab-analyzer", "lab-analyzer"]
    assert subjects[0] is not None
    assert subjects[0].rfc4514 == "CN=lab-analyzer,O=Test Hospital,C=US"
    opened = [r for r in caplog.records if getattr(r, "event", "") == "mllp.connection_opened"]
    assert opened and opened[0].fields["subject"] == "CN=lab-analyzer,O=Test Hospital,C=US"  # type: ignore[attr-defined]
    assert opened[0].fields["tls"] in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]


@pytest.mark.parametrize("client", ["no certificate", "wrong CA", "subject not allowed"])
async def test_mutual_tls_refuses(pki: Pki, client: str, caplog: pytest.LogCaptureFixture) -> None:
    tls = MllpTlsSettings(
        cert=str(pki.server.cert),
        key=str(pki.server.key),
        client_ca=str(pki.ca.cert),
        allowed_subjects=["lab-analyzer", "CN=billing,O=Test Hospital,C=US"],
    )
    identity = {"no certificate": None, "wrong CA": pki.stranger, "subject not allowed": pki.intruder}[client]
    context = client_context(
        str(pki.ca.cert),
        str(identity.cert) if identity else None,
        str(identity.key) if identity else None,
    )
    server, recorder = _listener(tls)
    caplog.set_level(logging.INFO, logger="hms_ach.hl7v2.mllp")
    async with server:
        with pytest.raises(MllpError):
            await send_messages("127.0.0.1", server.port, [MESSAGE], timeout=10, ssl_context=context)
    assert recorder.peers == []  # nothing reached the handler
    events = {getattr(r, "event", "") for r in caplog.records}
    expected = "mllp.tls_subject_refused" if client == "subject not allowed" else "mllp.tls_handshake_failed"
    assert expected in events
    assert "mllp.connection_opened" not in events


@needs_openssl
async def test_tls_1_1_is_refused(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    server, recorder = _listener(MllpTlsSettings(cert=str(pki.server.cert), key=str(pki.server.key)))
    caplog.set_level(logging.INFO, logger="hms_ach.hl7v2.mllp")
    assert server.ssl_context is not None
    assert server.ssl_context.minimum_version == MINIMUM_TLS_VERSION == ssl.TLSVersion.TLSv1_2
    async with server:
        # SECLEVEL=0 lets this openssl offer TLS 1.1 at all; the listener must still say no
        reply = await _openssl_exchange(
            server.port, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0", "-CAfile", str(pki.ca.cert)
        )
    assert reply == b""
    assert recorder.peers == []
    failed = [r for r in caplog.records if getattr(r, "event", "") == "mllp.tls_handshake_failed"]
    assert [r.fields["error"] for r in failed] == ["UNSUPPORTED_PROTOCOL"]  # type: ignore[attr-defined]


async def test_a_stalled_handshake_is_closed_at_its_deadline_and_counts_as_a_connection(pki: Pki) -> None:
    tls = MllpTlsSettings(cert=str(pki.server.cert), key=str(pki.server.key), handshake_timeout_seconds=0.5)
    server, _recorder = _listener(tls, max_connections=1)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # plain TCP: no ClientHello
        try:
            async with asyncio.timeout(5):
                while server.connection_count == 0:
                    await asyncio.sleep(0.01)
            assert server.connection_count == 1  # it holds a slot meanwhile...
            loop = asyncio.get_running_loop()
            started = loop.time()
            async with asyncio.timeout(10):
                assert await reader.read(100) == b""  # ...until the deadline closes it
            assert loop.time() - started < 5
        finally:
            writer.close()
        async with asyncio.timeout(5):
            while server.connection_count:
                await asyncio.sleep(0.01)


# allow_from -----------------------------------------------------------------------------------


def _from_127_0_0_2(port: int) -> bytes:
    """Connect from 127.0.0.2, send a message, return what came back before the server closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.bind(("127.0.0.2", 0))
        sock.connect(("127.0.0.1", port))
        try:
            sock.sendall(frame(MESSAGE))
            return sock.recv(4096)
        except (ConnectionResetError, BrokenPipeError):
            return b""


@pytest.mark.parametrize("transport", ["tcp", "tls"])
async def test_allow_from_refuses_a_source_outside_the_list(
    pki: Pki, transport: str, caplog: pytest.LogCaptureFixture
) -> None:
    tls = MllpTlsSettings(cert=str(pki.server.cert), key=str(pki.server.key)) if transport == "tls" else None
    context = client_context(str(pki.ca.cert)) if tls else None
    server, recorder = _listener(tls, allow_from=["127.0.0.1/32"])
    caplog.set_level(logging.INFO, logger="hms_ach.hl7v2.mllp")
    async with server:
        for _ in range(3):  # over TLS too it is closed before any handshake (no TLS reply comes)
            assert await asyncio.to_thread(_from_127_0_0_2, server.port) == b""
        acks = await send_messages(  # inside the list
            "127.0.0.1", server.port, [MESSAGE], timeout=10, ssl_context=context
        )
    assert _msa(acks[0]) == ["AA", "TLS1"]
    assert [p.host for p in recorder.peers if isinstance(p, Peer)] == ["127.0.0.1"]
    rejected = [r for r in caplog.records if getattr(r, "event", "") == "mllp.connection_rejected"]
    assert len(rejected) == 1  # three refusals, one log line (rate-limited per source)
    assert rejected[0].fields["limit"] == "allow_from"  # type: ignore[attr-defined]


def test_allow_from_defaults_to_loopback_and_matches_ipv4_and_ipv6() -> None:
    assert MllpConfig().allow_from == ["127.0.0.0/8", "::1/128"]
    allowed = SourceAllowList(MllpConfig().allow_from)
    assert allowed.allows("127.0.0.2") and allowed.allows("::1") and allowed.allows("::ffff:127.0.0.1")
    assert not allowed.allows("10.0.0.1") and not allowed.allows("fe80::1%eth0")
    lan = SourceAllowList(["10.1.0.0/16", "fd00::/8"])
    assert lan.allows("10.1.200.3") and lan.allows("fd12::5") and not lan.allows("10.2.0.1")
    with pytest.raises(ValueError, match="not an IP network"):
        MllpConfig(allow_from=["10.0.0.0/33"])


def test_subject_allow_list_matches_a_cn_or_the_whole_subject(pki: Pki) -> None:
    subject = subject_of(_der(pki.lab.cert))
    assert subject is not None and subject.common_name == "lab-analyzer"
    assert subject_allowed(subject, [])
    assert subject_allowed(subject, ["lab-analyzer"])
    assert subject_allowed(subject, ["cn=lab-analyzer, o=test hospital, c=us"])
    assert not subject_allowed(subject, ["LAB-ANALYZER"])  # a CN is compared exactly
    assert not subject_allowed(subject, ["CN=lab-analyzer,O=Other,C=US"])
    assert not subject_allowed(None, ["lab-analyzer"])


def _der(pem: Path) -> bytes:
    return x509.load_pem_x509_certificate(pem.read_bytes()).public_bytes(serialization.Encoding.DER)


def test_mllp_tls_environment_overrides_every_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    assert mllp_tls_with_environment(None, {}) is None
    env = {"HMS_ACH_MLLP_TLS_CERT": "/s/c.pem", "HMS_ACH_MLLP_TLS_KEY": "/s/k.pem"}
    on = mllp_tls_with_environment(None, env)
    assert on is not None and (on.cert, on.key, on.client_ca) == ("/s/c.pem", "/s/k.pem", "")
    own = MllpTlsSettings(cert="a.pem", client_ca="ca.pem", allowed_subjects=["lab"])
    merged = mllp_tls_with_environment(own, {"HMS_ACH_MLLP_TLS_CLIENT_CA": "/s/ca.pem"})
    assert merged is not None and (merged.cert, merged.client_ca, merged.allowed_subjects) == (
        "a.pem",
        "/s/ca.pem",
        ["lab"],
    )


# the engine: HTTPS, MLLP over TLS, hms-ach send --tls, hms-ach check ------------------------------


def _engine_yaml(tmp_path: Path, pki: Pki, *, http_cert: Path | None = None) -> Path:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    path = tmp_path / "channels.yaml"
    path.write_text(
        "engine:\n  mappings: mappings\n  watch: false\n"
        f"  database_url: sqlite:///{tmp_path}/store.db\n  data_dir: {tmp_path}/data\n"
        "http:\n  host: 127.0.0.1\n  port: 0\n"
        f"  tls:\n    cert: {http_cert or pki.server.cert}\n    key: {pki.server.key}\n"
        "channels:\n"
        "  - name: adt_in\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n"
        "    allow_from: [127.0.0.1/32]\n"
        f"    tls:\n      cert: {pki.server.cert}\n      key: {pki.server.key}\n"
        f"      client_ca: {pki.ca.cert}\n      allowed_subjects: [lab-analyzer]\n"
    )
    return path


def _hms_ach(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hms_ach.app.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )


async def _run_engine(path: Path, body: Callable[[Engine], Awaitable[None]]) -> None:
    engine = Engine(load_config(path))
    await engine.start()
    try:
        await body(engine)
    finally:
        await engine.stop()


@pytest.mark.timeout(120)
async def test_engine_serves_https_to_httpx_and_fhirpy_and_mllp_tls_to_hms_ach_send(
    tmp_path: Path, pki: Pki
) -> None:
    message_file = tmp_path / "adt.hl7"
    message_file.write_bytes((ROOT / "samples" / "hl7" / "adt_a01.hl7").read_bytes())

    async def body(engine: Engine) -> None:
        assert engine.http_port is not None
        headers = auth_headers(engine)
        base = f"https://127.0.0.1:{engine.http_port}"
        trust = ssl.create_default_context(cafile=str(pki.ca.cert))
        async with httpx.AsyncClient(verify=trust, timeout=10) as client:
            health = await client.get(f"{base}/health")
            assert health.status_code == 200
            assert (await client.get(f"{base}/fhir/Patient", headers=headers)).status_code == 200
            assert (await client.get(f"{base}/fhir/Patient")).status_code == 401
        fhir = AsyncFHIRClient(
            f"{base}/fhir",
            authorization=headers["authorization"],
            aiohttp_config={"ssl": trust},
            extra_headers={"Accept": "application/fhir+json"},
        )
        assert await fhir.resources("Patient").search(family="nobody").fetch_all() == []
        # plain HTTP to the HTTPS port fails cleanly, and HTTPS still works after it
        async with httpx.AsyncClient(timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{engine.http_port}/health")
        async with httpx.AsyncClient(verify=trust, timeout=10) as client:
            assert (await client.get(f"{base}/health")).status_code == 200
        # a client that does not trust the engine's CA refuses the connection
        async with httpx.AsyncClient(timeout=5) as untrusting:
            with pytest.raises(httpx.ConnectError):
                await untrusting.get(f"{base}/health")

        port = str(engine.channels["adt_in"].port)  # type: ignore[attr-defined]
        tls_args = [
            "--tls",
            "--cacert",
            str(pki.ca.cert),
            "--cert",
            str(pki.lab.cert),
            "--key",
            str(pki.lab.key),
        ]
        sent = await asyncio.to_thread(
            _hms_ach, "send", str(message_file), "--host", "127.0.0.1", "--port", port, *tls_args
        )
        assert sent.returncode == 0, sent.stderr
        assert "-> ACK AA" in sent.stdout
        # the audit trail names the sender by its certificate subject (issue 14, item 5)
        # (the engine's own entries, the workflows' forms published at start, are kind "system")
        with engine.store.read() as conn:
            written = [
                json.loads(a)
                for (a,) in conn.execute(text("SELECT actor FROM audit_entry WHERE actor IS NOT NULL"))
            ]
        actors = [a for a in written if a["kind"] != "system"]
        assert actors and all(a["kind"] == "mllp" for a in actors)
        assert {a["certificate_subject"] for a in actors} == {"CN=lab-analyzer,O=Test Hospital,C=US"}, actors
        # the server certificate is verified by default: without --cacert it is not trusted
        untrusted = await asyncio.to_thread(
            _hms_ach,
            "send",
            str(message_file),
            "--host",
            "127.0.0.1",
            "--port",
            port,
            "--tls",
            "--timeout",
            "10",
        )
        assert untrusted.returncode == 1
        assert "not trusted" in untrusted.stderr

    await _run_engine(_engine_yaml(tmp_path, pki), body)


def test_check_names_an_unusable_tls_file(tmp_path: Path, pki: Pki) -> None:
    path = _engine_yaml(tmp_path, pki, http_cert=tmp_path / "missing.pem")
    result = CliRunner().invoke(cli_app, ["check", "--config", str(path)])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if "http.tls" in line]
    assert len(lines) == 1 and "missing.pem does not exist" in lines[0]
    (tmp_path / "b").mkdir()
    key_mismatch = _engine_yaml(tmp_path / "b", pki, http_cert=pki.lab.cert)
    result = CliRunner().invoke(cli_app, ["check", "--config", str(key_mismatch)])
    assert result.exit_code == 1 and "http.tls: cannot load certificate" in result.output
    # relative paths are relative to channels.yaml, not to the working directory
    beside = tmp_path / "c"
    beside.mkdir()
    path = _engine_yaml(beside, pki)
    shutil.copy(pki.server.cert, beside / "server.crt")
    shutil.copy(pki.server.key, beside / "server.key")
    text = path.read_text()
    path.write_text(
        text.replace(str(pki.server.cert), "server.crt").replace(str(pki.server.key), "server.key")
    )
    result = CliRunner().invoke(cli_app, ["check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert load_config(path).http.tls.cert == str(beside / "server.crt")


def test_mllp_over_tls_on_the_engines_event_loop(pki: Pki) -> None:
    """The same exchange on the loop ``hms-ach run`` uses (uvloop where installed): its TLS layer
    must get the ClientHello, and our stream must be the one that is answered."""
    from hms_ach.app import eventloop

    async def exchange() -> tuple[bytes, str | None, int]:
        tls = MllpTlsSettings(
            cert=str(pki.server.cert),
            key=str(pki.server.key),
            client_ca=str(pki.ca.cert),
            handshake_timeout_seconds=0.5,
        )
        server, recorder = _listener(tls)
        async with server:
            context = client_context(str(pki.ca.cert), str(pki.lab.cert), str(pki.lab.key))
            acks = await send_messages("127.0.0.1", server.port, [MESSAGE], timeout=10, ssl_context=context)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # never says hello
            async with asyncio.timeout(10):
                await reader.read(100)
            writer.close()
            async with asyncio.timeout(5):
                while server.connection_count:
                    await asyncio.sleep(0.01)
        peer = recorder.peers[0]
        subject = peer.cert_subject if isinstance(peer, Peer) else None
        return acks[0], subject.common_name if subject else None, server.connection_count

    ack, cn, left = eventloop.run(exchange())
    assert _msa(ack) == ["AA", "TLS1"]
    assert cn == "lab-analyzer" and left == 0


async def test_at_the_connection_cap_a_stalled_handshake_makes_room(pki: Pki) -> None:
    tls = MllpTlsSettings(cert=str(pki.server.cert), key=str(pki.server.key), handshake_timeout_seconds=30)
    server, recorder = _listener(tls, max_connections=1)
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)  # holds the only slot
        try:
            async with asyncio.timeout(5):
                while server.connection_count == 0:
                    await asyncio.sleep(0.01)
            acks = await send_messages(
                "127.0.0.1", server.port, [MESSAGE], timeout=10, ssl_context=client_context(str(pki.ca.cert))
            )
            async with asyncio.timeout(5):
                assert await reader.read(100) == b""  # evicted long before its 30 s deadline
        finally:
            writer.close()
    assert _msa(acks[0]) == ["AA", "TLS1"] and len(recorder.peers) == 1

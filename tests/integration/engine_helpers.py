"""A running engine with the fhir_rest channel on a loopback port, for the FHIR write, audit and
workforce API tests, and the bearer tokens to call it.

Authentication is on in every engine the tests start (``auth.mode: local``, the shipped default): the
signing key is created in the test's temporary data directory, and :func:`auth_headers` mints a token
with :func:`hms_ach.auth.local_issuer.issue_token`, as ``hms-ach token`` does. By default the token
may do everything (:data:`FULL_SCOPE`, :data:`FULL_ROLES`); tests of access control ask for less.
In-process apps (``create_app``) take :func:`local_authenticator` over a temporary directory."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.auth.authenticate import Authenticator, create_authenticator
from hms_ach.auth.local_issuer import TokenRequest, issue_token
from hms_ach.auth.settings import AuthSettings
from hms_ach.channels.mllp import MllpChannel
from hms_ach.store.db import Store

ROOT = Path(__file__).resolve().parents[2]
FHIR_JSON = {"content-type": "application/fhir+json"}
#: The SMART scopes and /api/v1 roles of a token that may do everything.
FULL_SCOPE = "system/*.cruds"
FULL_ROLES = ("hr_admin", "auditor")
#: The identifier system of staff numbers (Practitioner.identifier).
STAFF = "urn:hms-ach:id:staff"
#: The interactions of a record type the FHIR API serves but never writes (its CapabilityStatement).
READ_INTERACTIONS = frozenset({"read", "vread", "history-instance", "history-type", "search-type"})


def local_authenticator(data_dir: Path) -> Authenticator:
    """A ``mode: local`` authenticator whose signing key lives in ``data_dir`` (created there)."""
    return create_authenticator(AuthSettings(mode="local"), data_dir)


def engine_authenticator(engine: Engine) -> Authenticator:
    """The running engine's authenticator (its HTTP API is started)."""
    assert engine.authenticator is not None, "the engine's HTTP API is not started"
    return engine.authenticator


def mint_token(
    authenticator: Authenticator | Engine,
    scope: str = FULL_SCOPE,
    roles: tuple[str, ...] = FULL_ROLES,
    *,
    sub: str = "test-client",
    patient: str | None = None,
    employee_id: str | None = None,
    departments: tuple[str, ...] = (),
    ttl_seconds: int | None = None,
) -> str:
    """A token of the local issuer of ``authenticator`` (or of a running engine), as ``hms-ach token``
    prints it."""
    auth = engine_authenticator(authenticator) if isinstance(authenticator, Engine) else authenticator
    assert auth.local_key is not None, "auth.mode is not local"
    request = TokenRequest(
        scope=scope,
        sub=sub,
        patient=patient,
        roles=roles,
        employee_id=employee_id,
        departments=departments,
        ttl_seconds=ttl_seconds,
    )
    return issue_token(auth.settings, auth.local_key, request)


def auth_headers(
    authenticator: Authenticator | Engine,
    scope: str = FULL_SCOPE,
    roles: tuple[str, ...] = FULL_ROLES,
    **claims: Any,
) -> dict[str, str]:
    """``Authorization: Bearer <token>`` with a token of :func:`mint_token` (``claims``: its keyword
    arguments, ``sub=``, ``patient=``...)."""
    token = mint_token(authenticator, scope, roles, **claims)
    return {"authorization": f"Bearer {token}"}


def nurse(number: str = "E2001", family: str = "Osei", **extra: Any) -> dict[str, Any]:
    """An active Practitioner with staff number ``number`` (a FHIR write body), plus ``extra`` elements."""
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": STAFF, "value": number}],
        "active": True,
        "name": [{"family": family, "given": ["Amara"]}],
        "gender": "female",
        **extra,
    }


def basic_shift(
    number: str,
    practitioner_id: str,
    start: str = "2026-12-01T07:00:00Z",
    end: str = "2026-12-01T15:00:00Z",
    status: str | None = "planned",
) -> dict[str, Any]:
    """A shift as FHIR ``Basic`` (a write body): shift id ``number`` of ``Practitioner/practitioner_id``,
    from ``start`` to ``end``, with a status extension unless ``status`` is None."""
    extension: list[dict[str, Any]] = [
        {
            "url": "urn:hms-ach:fhir:StructureDefinition/shift-period",
            "valuePeriod": {"start": start, "end": end},
        }
    ]
    if status is not None:
        extension.append({"url": "urn:hms-ach:fhir:StructureDefinition/shift-status", "valueCode": status})
    return {
        "resourceType": "Basic",
        "identifier": [{"system": "urn:hms-ach:id:shift", "value": number}],
        "code": {"coding": [{"system": "urn:hms-ach:code:basic-type", "code": "shift"}]},
        "subject": {"reference": f"Practitioner/{practitioner_id}"},
        "extension": extension,
    }


def mllp_yaml(name: str = "adt_in", *settings: str) -> str:
    """A channels.yaml list entry: an MLLP channel on a free loopback port, plus ``settings`` lines
    (``"idle_timeout_seconds: 5"``)."""
    return f"  - name: {name}\n    type: mllp\n    host: 127.0.0.1\n    port: 0\n" + "".join(
        f"    {line}\n" for line in settings
    )


async def start_engine(tmp_path: Path, store: Store, channels: str, engine_yaml: str = "") -> Engine:
    """Copy the repository's mappings beside a channels.yaml listing ``channels`` (HTTP on a free
    loopback port) and start the engine on ``store``; ``engine_yaml``: more lines of its ``engine:``
    section, each indented two spaces and ending with a newline."""
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    (tmp_path / "channels.yaml").write_text(
        "engine:\n  mappings: mappings\n  watch: false\n"
        + engine_yaml
        + "http:\n  host: 127.0.0.1\n  port: 0\n"
        "channels:\n" + channels
    )
    eng = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await eng.start()
    return eng


@asynccontextmanager
async def running_engine(
    tmp_path: Path, store: Store, channels: str, engine_yaml: str = ""
) -> AsyncIterator[Engine]:
    """:func:`start_engine`, stopped when the block ends (for fixtures)."""
    eng = await start_engine(tmp_path, store, channels, engine_yaml)
    try:
        yield eng
    finally:
        await stop_engine(eng)


#: How long a fixture waits for an engine's stop (it takes well under a second when nothing hangs).
STOP_DEADLINE_SECONDS = 60.0


async def stop_engine(eng: Engine, deadline: float = STOP_DEADLINE_SECONDS) -> None:
    """``eng.stop()`` with a deadline: past it the test fails with the phase the stop was in and
    the stacks of every task and thread of the process, so that a stop that hangs (it hung once in
    CI, on PostgreSQL, in the bulk export tests' teardown) is reported with its cause."""
    stopping = asyncio.ensure_future(eng.stop())
    done, _ = await asyncio.wait({stopping}, timeout=deadline)
    if done:
        stopping.result()
        return
    report = _stacks()
    stopping.cancel()
    raise AssertionError(f"the engine did not stop within {deadline:g} s (phase {eng.stop_phase}):\n{report}")


def _stacks() -> str:
    out = io.StringIO()
    for task in asyncio.all_tasks():
        out.write(f"--- task {task.get_name()} ({task.get_coro()!r})\n")
        task.print_stack(limit=12, file=out)
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {names.get(ident, ident)}\n")
        out.write("".join(traceback.format_stack(frame, limit=12)))
    return out.getvalue()


async def start_fhir_engine(tmp_path: Path, store: Store) -> Engine:
    """The engine with one fhir_rest channel (``fhir_in``) on ``store``."""
    return await start_engine(
        tmp_path, store, "  - name: fhir_in\n    type: fhir_rest\n    max_body_bytes: 65536\n"
    )


def mllp_channel(engine: Engine, name: str = "adt_in") -> MllpChannel:
    """The running MLLP channel ``name`` of ``engine`` (its port, its server)."""
    channel = engine.channels[name]
    assert isinstance(channel, MllpChannel), f"channel {name} is a {type(channel).__name__}"
    return channel


def wait_until_live(
    base: str, process: subprocess.Popen[Any], output: Callable[[], str], within: float
) -> None:
    """Poll ``base``/health/live until it answers 200; fail with the process's ``output`` if the
    process ends first, or after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        assert process.poll() is None, output()
        try:
            if httpx.get(f"{base}/health/live", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{base} did not answer /health/live within {within:.0f} s"
        time.sleep(0.2)

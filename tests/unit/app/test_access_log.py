"""The access log event: the route template, never the concrete path or the query; the caller
that authentication put in ``request.state.caller``; a 500 when the application failed."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pytest
from fastapi import FastAPI, Request

from hms_ach.app.access_log import CALLER_ATTRIBUTE, AccessLogMiddleware, Caller
from hms_ach.app.config import HttpSettings
from hms_ach.app.http import create_app
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, local_authenticator


@dataclass(frozen=True)
class ServiceCaller:
    subject: str
    scopes: tuple[str, ...] = ()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access() -> Iterator[list[logging.LogRecord]]:
    logger = logging.getLogger("hms_ach.http.access")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _app(tmp_path: Path, access_log: bool = True) -> tuple[FastAPI, Store]:
    store = Store(f"sqlite:///{tmp_path}/s.db")
    authenticator = local_authenticator(tmp_path / "data")
    app = create_app(store, settings=HttpSettings(access_log=access_log), authenticator=authenticator)
    app.state.test_headers = auth_headers(authenticator, sub="ZZSUBJECT-free")

    @app.get("/whoami/{who}")
    def whoami(who: str, request: Request) -> dict[str, str]:
        setattr(request.state, CALLER_ATTRIBUTE, ServiceCaller(f"svc-{len(who)}"))
        return {"ok": "yes"}

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("ZZSECRET in the text")

    return app, store


def _fields(record: logging.LogRecord) -> dict[str, object]:
    keys = ("method", "route", "status", "duration_ms", "client", "caller")
    return {k: record.__dict__[k] for k in keys}


async def test_the_event_names_the_route_template_and_the_caller(
    tmp_path: Path, access: list[logging.LogRecord]
) -> None:
    app, store = _app(tmp_path)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=("10.0.0.7", 4242))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=app.state.test_headers
        ) as client:
            assert (await client.get("/whoami/ZZPATHVALUE?token=ZZQUERY")).status_code == 200
            assert (await client.get("/fhir/Patient/ZZPATHVALUE")).status_code == 404
            assert (await client.get("/boom")).status_code == 500
            assert (await client.get("/fhir/Patient", headers={"Authorization": ""})).status_code == 401
    finally:
        store.dispose()
    assert [r.getMessage() for r in access] == ["http.request"] * 4
    first, second, third, refused = (_fields(r) for r in access)
    assert first["route"] == "/whoami/{who}" and first["caller"] == "svc-11" and first["status"] == 200
    assert first["client"] == "10.0.0.7:4242" and first["method"] == "GET"
    assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
    # the caller authentication found (the token's sub), never the token
    assert second == {
        **second,
        "route": "/fhir/{resource_type}/{rid}",
        "status": 404,
        "caller": "ZZSUBJECT-free",
    }
    assert third["route"] == "/boom" and third["status"] == 500
    assert refused["status"] == 401 and refused["caller"] is None
    assert all("ZZPATHVALUE" not in repr(r.__dict__) and "ZZQUERY" not in repr(r.__dict__) for r in access)
    assert isinstance(ServiceCaller("x"), Caller)


async def test_the_access_log_can_be_turned_off(tmp_path: Path, access: list[logging.LogRecord]) -> None:
    app, store = _app(tmp_path, access_log=False)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
        ) as client:
            assert (await client.get("/health/live")).status_code == 200
    finally:
        store.dispose()
    assert access == []  # the middleware still times requests for /metrics, but logs none
    middleware = [m for m in app.user_middleware if cast(object, m.cls) is AccessLogMiddleware]
    assert len(middleware) == 1 and middleware[0].kwargs == {"log_requests": False}

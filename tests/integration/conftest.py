"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.integration.engine_helpers import auth_headers, start_fhir_engine, stop_engine


@pytest.fixture
async def fhir_engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    """The engine with a fhir_rest channel, on the test's store; stopped after the test."""
    eng = await start_fhir_engine(tmp_path, store)
    try:
        yield eng
    finally:
        await stop_engine(eng)


@pytest.fixture
async def http(fhir_engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """A client of :func:`fhir_engine`'s ``/fhir`` base with a token that may do everything."""
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{fhir_engine.http_port}/fhir",
        timeout=30,
        headers=auth_headers(fhir_engine),
    ) as client:
        yield client

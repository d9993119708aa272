"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.integration.engine_helpers import start_fhir_engine


@pytest.fixture
async def fhir_engine(tmp_path: Path, store: Store) -> AsyncIterator[Engine]:
    """The engine with a fhir_rest channel, on the test's store; stopped after the test."""
    eng = await start_fhir_engine(tmp_path, store)
    try:
        yield eng
    finally:
        await eng.stop()

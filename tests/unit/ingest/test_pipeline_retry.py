"""The pipeline's bounded retry of a message whose commit lost a unique-key race to another
instance (``retry_unique``, docs/scale-out.md)."""

from __future__ import annotations

import pytest

from hms_ach.ingest.pipeline import retry_unique
from hms_ach.store import conflicts
from hms_ach.store.errors import StoreUnavailable


class _UniqueViolation(Exception):
    sqlstate = "23505"


async def test_a_unique_violation_runs_the_job_again_until_it_commits() -> None:
    calls = []

    async def run() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _UniqueViolation("duplicate key")
        return "AA"

    assert await retry_unique(run) == "AA"
    assert len(calls) == 3


async def test_the_retry_is_bounded_and_other_errors_pass_at_once() -> None:
    calls = []

    async def always() -> str:
        calls.append(1)
        raise _UniqueViolation("duplicate key")

    with pytest.raises(_UniqueViolation):
        await retry_unique(always)
    assert len(calls) == conflicts.MAX_ATTEMPTS

    for error in (StoreUnavailable("down"), ValueError("content")):
        calls.clear()

        async def fails(error: Exception = error) -> str:
            calls.append(1)
            raise error

        with pytest.raises(type(error)):
            await retry_unique(fails)
        assert len(calls) == 1

"""The bounded retry of conflicts between concurrent transactions (hms_ach/store/conflicts.py)."""

from __future__ import annotations

import pytest

from hms_ach.store import conflicts


class _DriverError(Exception):
    def __init__(self, sqlstate: str):
        super().__init__("driver error")
        self.sqlstate = sqlstate


class _Wrapped(Exception):
    """As SQLAlchemy wraps a driver error: the driver's in ``orig``."""

    def __init__(self, orig: BaseException):
        super().__init__("wrapped")
        self.orig = orig


def _raised_from(cause: BaseException) -> Exception:
    try:
        raise RuntimeError("domain error") from cause
    except RuntimeError as exc:
        return exc


def test_the_sqlstate_is_found_on_the_error_its_driver_error_or_a_cause() -> None:
    assert conflicts.sqlstate(_DriverError("40P01")) == "40P01"
    assert conflicts.sqlstate(_Wrapped(_DriverError("40001"))) == "40001"
    assert conflicts.sqlstate(_raised_from(_Wrapped(_DriverError("23505")))) == "23505"
    assert conflicts.sqlstate(ValueError("no state")) is None
    assert conflicts.is_retryable(_Wrapped(_DriverError("40P01")))
    assert conflicts.is_retryable(_Wrapped(_DriverError("40001")))
    assert not conflicts.is_retryable(_Wrapped(_DriverError("23505")))
    assert conflicts.is_unique_violation(_raised_from(_Wrapped(_DriverError("23505"))))


def test_a_conflict_runs_the_work_again_until_it_succeeds() -> None:
    calls = []

    def work() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _Wrapped(_DriverError("40P01"))
        return "done"

    assert conflicts.retrying(work, conflicts.is_retryable) == "done"
    assert len(calls) == 3


def test_the_retries_are_bounded_and_other_errors_are_not_retried() -> None:
    calls = []

    def deadlocks() -> None:
        calls.append(1)
        raise _Wrapped(_DriverError("40P01"))

    with pytest.raises(_Wrapped):
        conflicts.retrying(deadlocks, conflicts.is_retryable)
    assert len(calls) == conflicts.MAX_ATTEMPTS

    calls.clear()

    def fails() -> None:
        calls.append(1)
        raise ValueError("a content error")

    with pytest.raises(ValueError):
        conflicts.retrying(fails, conflicts.is_retryable)
    assert len(calls) == 1


def test_pauses_stay_short_and_grow() -> None:
    for attempt in range(conflicts.MAX_ATTEMPTS):
        assert 0 <= conflicts.pause(attempt) <= conflicts.FIRST_PAUSE_SECONDS * 2**attempt

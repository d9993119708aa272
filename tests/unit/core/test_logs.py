"""The log rate limiter: a flood of identical errors becomes a bounded number of lines, with a
summary that counts what was dropped; different errors and INFO events are not held back."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from hms_ach.app.cli import _setup_logging
from hms_ach.app.config import LoggingSettings
from hms_ach.core.logs import RateLimitedHandler


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("hms_ach.test.logs")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    before = log.handlers[:]
    yield log
    log.handlers[:] = before
    log.propagate = True


def _fail(log: logging.Logger, value: str) -> None:
    try:
        raise ValueError(f"bad value {value}")
    except ValueError:
        log.exception("store.commit_failed", extra={"channel": "adt_in"})


def test_ten_thousand_identical_failures_give_a_bounded_number_of_lines(logger: logging.Logger) -> None:
    clock, out = Clock(), Collect()
    logger.addHandler(RateLimitedHandler(out, burst=10, interval_seconds=60, clock=clock))
    for i in range(10_000):
        _fail(logger, f"patient-{i}")  # the text differs, what happened does not
        clock.now += 0.001  # 10 s in all: one window
    assert len(out.records) == 10
    clock.now += 60
    logger.info("message.processed")  # any later record brings the summary out
    summary = [r for r in out.records if r.getMessage() == "log.suppressed"]
    assert len(summary) == 1
    assert summary[0].__dict__["suppressed"] == 9_990
    assert summary[0].__dict__["suppressed_event"] == "store.commit_failed"
    assert summary[0].__dict__["exception"] == "ValueError"
    assert summary[0].levelno == logging.ERROR and summary[0].name == logger.name


def test_each_window_lets_the_burst_through_again(logger: logging.Logger) -> None:
    clock, out = Clock(), Collect()
    handler = RateLimitedHandler(out, burst=3, interval_seconds=10, clock=clock)
    logger.addHandler(handler)
    for _window in range(5):
        for _ in range(100):
            logger.error("outbox.dispatch_error")
        clock.now += 10
    handler.flush()
    events = [r.getMessage() for r in out.records]
    assert events.count("outbox.dispatch_error") == 15
    assert [r.__dict__["suppressed"] for r in out.records if r.getMessage() == "log.suppressed"] == [97] * 5


def test_different_errors_and_info_events_are_not_held_back(logger: logging.Logger) -> None:
    clock, out = Clock(), Collect()
    logger.addHandler(RateLimitedHandler(out, burst=2, interval_seconds=60, clock=clock))
    for _ in range(50):
        logger.info("message.processed")  # below WARNING: always passes
    for _ in range(5):
        logger.error("a.failed")
        logger.error("b.failed")
        logger.warning("a.failed")  # another level: another group
        try:
            raise KeyError("x")
        except KeyError:
            logger.exception("a.failed")  # another exception kind: another group
        for name in ("mllp.garbage_discarded", "mllp.send_timeout"):  # named by an `event` field
            logger.warning("%s", f"{name} peer=10.0.0.{len(out.records)}", extra={"event": name})
    events = [(r.getMessage(), r.levelno, bool(r.exc_info)) for r in out.records]
    assert sorted(r.__dict__["event"] for r in out.records if "event" in r.__dict__) == sorted(
        ["mllp.garbage_discarded", "mllp.send_timeout"] * 2
    )
    assert events.count(("message.processed", logging.INFO, False)) == 50
    assert events.count(("a.failed", logging.ERROR, False)) == 2
    assert events.count(("b.failed", logging.ERROR, False)) == 2
    assert events.count(("a.failed", logging.WARNING, False)) == 2
    assert events.count(("a.failed", logging.ERROR, True)) == 2


def test_the_summary_is_written_when_the_handler_closes(logger: logging.Logger) -> None:
    out = Collect()
    handler = RateLimitedHandler(out, burst=1, interval_seconds=3600)
    logger.addHandler(handler)
    for _ in range(4):
        logger.warning("sftp.poll_failed")
    handler.close()
    assert [r.getMessage() for r in out.records] == ["sftp.poll_failed", "log.suppressed"]
    assert out.records[1].__dict__["suppressed"] == 3


def test_the_engine_logging_is_rate_limited_by_default_and_configurable() -> None:
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        stream = io.StringIO()
        _setup_logging("INFO", stream=stream)
        log = logging.getLogger("hms_ach.test.engine_logging")
        for i in range(10_000):
            _fail(log, f"ZZMARKER-{i}")
        root.handlers[0].flush()
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        assert len(lines) == LoggingSettings().rate_limit_burst + 1
        assert lines[-1]["event"] == "log.suppressed" and lines[-1]["suppressed"] == 10_000 - len(lines) + 1
        assert "ZZMARKER" not in stream.getvalue()  # exceptions are logged by kind, never by text

        stream = io.StringIO()
        _setup_logging("INFO", LoggingSettings(rate_limit_enabled=False), stream=stream)
        for i in range(100):
            _fail(log, str(i))
        assert len(stream.getvalue().splitlines()) == 100
    finally:
        root.handlers[:] = saved
        root.setLevel(level)

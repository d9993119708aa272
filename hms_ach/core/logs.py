"""Rate limiting of repeated log lines: a flood of identical errors costs a few lines, not a disk.

:class:`RateLimitedHandler` wraps the handler that writes the lines. Records at ``min_level``
(WARNING) and above are grouped by *what happened*, never by the values they carry:

    (logger name, level, message template, exception kind)

The message template is ``record.msg`` before ``%`` formatting (or the record's ``event`` field,
when a caller names its event that way and formats the message itself), and the exception kind is the
exception's type name (with its SQLSTATE for database errors, :func:`hms_ach.core.redact.error_kind`).
Per group, the first ``burst`` records of each ``interval_seconds`` window pass; later ones are
counted and dropped. When a group's window has ended with records dropped, one summary line is
written: the event ``log.suppressed`` with ``suppressed_event`` (the template), ``suppressed``
(the count), ``exception`` and ``interval_seconds``. Summaries are written as soon as any record
reaches the handler after the window ended (checked at most once a second), and when the handler
is flushed or closed (at exit). Records below ``min_level`` (the per-message INFO events) always pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hms_ach.core.redact import error_kind

#: The key of a group of identical records: (logger, level, template, exception kind).
LogKey = tuple[str, int, str, str]


@dataclass
class _Window:
    start: float
    passed: int = 0
    suppressed: int = 0


def record_key(record: logging.LogRecord) -> LogKey:
    """What makes two records "the same error": their logger, level, message template and the kind
    of their exception (no formatted values)."""
    exc = record.exc_info[1] if record.exc_info else None
    kind = error_kind(exc) if exc is not None else ""
    event = record.__dict__.get("event")  # a stable event name given as a field (hl7v2.mllp's events)
    return (record.name, record.levelno, event if isinstance(event, str) else str(record.msg), kind)


class RateLimitedHandler(logging.Handler):
    """Passes records to ``target``, at most ``burst`` per group of identical records per
    ``interval_seconds``, and then one summary line with the number dropped (see the module doc)."""

    def __init__(
        self,
        target: logging.Handler,
        *,
        burst: int = 10,
        interval_seconds: float = 60.0,
        min_level: int = logging.WARNING,
        max_groups: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        super().__init__(logging.NOTSET)
        if burst < 1 or interval_seconds <= 0:
            raise ValueError("burst must be >= 1 and interval_seconds > 0")
        self.target = target
        self.burst = burst
        self.interval_seconds = interval_seconds
        self.min_level = min_level
        self.max_groups = max_groups
        self._clock = clock
        self._windows: dict[LogKey, _Window] = {}
        self._guard = threading.Lock()
        self._last_sweep = clock()

    def emit(self, record: logging.LogRecord) -> None:
        due: list[logging.LogRecord] = []
        passes = True
        with self._guard:
            now = self._clock()
            if now - self._last_sweep >= 1.0:
                self._last_sweep = now
                due = self._ended(now)
            if record.levelno >= self.min_level:
                passes = self._admit(record_key(record), now, due)
        for summary in due:
            self.target.handle(summary)
        if passes:
            self.target.handle(record)

    def _admit(self, key: LogKey, now: float, due: list[logging.LogRecord]) -> bool:
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.interval_seconds:
            if window.suppressed:
                due.append(self._summary(key, window))
            window = None
        if window is None:
            if len(self._windows) >= self.max_groups:  # a bounded table: forget the groups that ended
                due.extend(self._ended(now))
                if len(self._windows) >= self.max_groups:
                    self._windows.clear()
            window = self._windows[key] = _Window(now)
        if window.passed < self.burst:
            window.passed += 1
            return True
        window.suppressed += 1
        return False

    def _ended(self, now: float) -> list[logging.LogRecord]:
        """Summaries of the windows that have ended with records dropped; ended windows are dropped."""
        out = []
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval_seconds:
                if window.suppressed:
                    out.append(self._summary(key, window))
                del self._windows[key]
        return out

    def _summary(self, key: LogKey, window: _Window) -> logging.LogRecord:
        name, level, template, kind = key
        return logging.makeLogRecord(
            {
                "name": name,
                "levelno": level,
                "levelname": logging.getLevelName(level),
                "msg": "log.suppressed",
                "suppressed_event": template,
                "suppressed": window.suppressed,
                "exception": kind or None,
                "interval_seconds": self.interval_seconds,
            }
        )

    def pending_summaries(self) -> list[logging.LogRecord]:
        """Summaries of every group with dropped records, ended or not; their counts restart."""
        with self._guard:
            out = []
            for key, window in self._windows.items():
                if window.suppressed:
                    out.append(self._summary(key, window))
                    window.suppressed = 0
            return out

    def flush(self) -> None:
        stream = getattr(self.target, "stream", None)
        if stream is not None and getattr(stream, "closed", False):
            return  # the stream is gone (a test runner's capture, a closed pipe): nothing can be written
        for summary in self.pending_summaries():
            self.target.handle(summary)
        self.target.flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.target.close()
            super().close()

    def setFormatter(self, fmt: logging.Formatter | None) -> None:  # noqa: N802 - logging's name
        self.target.setFormatter(fmt)

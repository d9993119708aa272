"""Conflicts between concurrent transactions, and their bounded retry (PostgreSQL, several instances).

Two instances (or an instance's writer thread and its thread apart) writing the same records at
the same moment meet at row locks (``FOR UPDATE`` on the business key, :mod:`hms_ach.store.
repository`), at the unique constraints, and at the audit chain's advisory lock. PostgreSQL
serialises them; what it cannot serialise it refuses, and a retry of the refused work succeeds:

* a deadlock (SQLSTATE 40P01) or a serialization failure (40001): the transaction was rolled
  back whole; the writer runs the whole group commit again (:func:`retrying`);
* a unique violation (23505) that a concurrent insert of the same key caused: the message's job
  runs again, and then finds the other transaction's committed row (the pipeline, with
  :func:`is_unique_violation`).

Retries are bounded (:data:`MAX_ATTEMPTS`, with a short random pause that grows): past them the
error is handled as before (the writer reports the store failure and no ACK is sent, so the sender
resends; a unique violation is stored as the message's error). Nothing is lost either way.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("hms_ach.store.conflicts")
T = TypeVar("T")

#: SQLSTATEs after which the whole transaction runs again: serialization_failure, deadlock_detected.
RETRY_SQLSTATES = frozenset({"40001", "40P01"})
#: SQLSTATE unique_violation.
UNIQUE_VIOLATION = "23505"
#: Attempts in all (the first one included).
MAX_ATTEMPTS = 5
#: The first pause's upper bound (seconds); it doubles with each attempt.
FIRST_PAUSE_SECONDS = 0.02


def sqlstate(exc: BaseException | None) -> str | None:
    """The SQLSTATE of ``exc`` or of an error it was raised from (driver errors carry it)."""
    seen = 0
    while exc is not None and seen < 10:
        for candidate in (exc, getattr(exc, "orig", None)):
            code = getattr(candidate, "sqlstate", None)
            if isinstance(code, str) and code:
                return code
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def is_retryable(exc: BaseException | None) -> bool:
    """A deadlock or serialization failure: the transaction may simply run again."""
    return sqlstate(exc) in RETRY_SQLSTATES


def is_unique_violation(exc: BaseException | None) -> bool:
    """A unique constraint refused a write (maybe a concurrent insert of the same key)."""
    return sqlstate(exc) == UNIQUE_VIOLATION


def pause(attempt: int) -> float:
    """The random pause before attempt ``attempt + 1`` (seconds)."""
    return random.uniform(0, FIRST_PAUSE_SECONDS * (2**attempt))  # noqa: S311 - jitter, not a secret


def retrying(work: Callable[[], T], conflicted: Callable[[BaseException], bool]) -> T:
    """``work()``, run again (up to :data:`MAX_ATTEMPTS` in all) while it raises an error for which
    ``conflicted`` is true; the last attempt's error is raised as it is."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return work()
        except Exception as exc:
            if attempt == MAX_ATTEMPTS - 1 or not conflicted(exc):
                raise
            log.warning("store.conflict_retry", extra={"attempt": attempt + 1, "sqlstate": sqlstate(exc)})
            time.sleep(pause(attempt))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

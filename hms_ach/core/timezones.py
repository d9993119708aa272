"""IANA time zone names in settings: :data:`IanaTimeZone` checks one with :mod:`zoneinfo` when the
configuration is loaded, so that ``hms-ach check`` reports a bad one (file:line:col) before
``hms-ach run`` would fail on it."""

from __future__ import annotations

from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

EXPECTED = "an IANA time zone such as Europe/Paris"


def check_timezone(name: str) -> str:
    """``name`` if zoneinfo knows it; else a pydantic error of type ``iana_timezone``."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise PydanticCustomError(
            "iana_timezone", "unknown time zone '{value}'", {"value": name, "expected": EXPECTED}
        ) from None
    return name


IanaTimeZone = Annotated[str, AfterValidator(check_timezone)]

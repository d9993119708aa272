"""The event loop the engine runs on: uvloop where it is installed, else the standard asyncio loop.

``HMS_ACH_LOOP=asyncio`` keeps the standard loop (to compare, or to rule uvloop out when hunting a
bug). The benchmarks' socket ceilings run on the same loop as the engine, so that the two compare.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: the loop :func:`run` would use."""
    if os.environ.get("HMS_ACH_LOOP", "auto") == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_name` names."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)

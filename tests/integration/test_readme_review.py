"""The README's "Review cases" section, run as written on one engine and one store (issue 18).

It runs like the workforce sections (:mod:`tests.integration.test_readme_workforce`: the same shell,
the same trimmed answers), after the walkthrough's token lines, on a fresh engine. The section also
uses ``date -u [-d '+N hours'] +FORMAT``, for a shift that covers now; this shell answers it with the
clock of the test.
"""

from __future__ import annotations

import json
import re
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hms_ach.app.runtime import Engine
from tests.integration.test_readme_workforce import (
    BLOCK,
    README,
    Shell,
    Text,
    commands,
    readme_engine,
    section,
    shown_in,
)

__all__ = ["readme_engine"]  # the fixture, used by name

pytestmark = pytest.mark.timeout(240)

HEADING = "## Review cases"
PRELUDE = ("TOKEN=", "AUTH=")


def steps() -> list[tuple[list[str], Any]]:
    """(command lines, the trimmed answer shown after them or None), in README order."""
    text = README.read_text()
    walkthrough = section(text, "## A five-minute walkthrough")
    prelude = [c for b in BLOCK.findall(walkthrough) if b[0] == "sh" for c in commands(b[1])]
    found: list[tuple[list[str], Any]] = [([c for c in prelude if c.startswith(PRELUDE)], None)]
    for kind, body in BLOCK.findall(section(text, HEADING)):
        if kind == "sh":
            found.append((commands(body), None))
        else:
            assert found[-1][1] is None, "two answers after one sh block"
            found[-1] = (found[-1][0], json.loads(body) if kind == "json" else Text(body))
    return found


class ReviewShell(Shell):
    """The workforce README shell, plus ``date -u`` (see the module docstring)."""

    async def run(self, line: str) -> Any:
        words = shlex.split(self.expand(line), comments=True)
        if words and words[0] == "date":
            return self.date(words[1:])
        return await super().run(line)

    @staticmethod
    def date(args: list[str]) -> str:
        moment = datetime.now(UTC)
        fmt = args[-1].removeprefix("+")
        if "-d" in args:
            offset = re.fullmatch(r"\+(\d+) hours?", args[args.index("-d") + 1])
            assert offset is not None, f"date -d {args}: only '+N hours'"
            moment += timedelta(hours=int(offset.group(1)))
        return moment.strftime(fmt)


async def test_readme_review_section_runs_as_written(
    readme_engine: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, cwd = readme_engine
    shell = ReviewShell(engine, cwd, monkeypatch)
    ran = 0
    for lines, shown in steps():
        out: Any = None
        for line in lines:
            out = await shell.run(line)
            ran += 1
        if shown is not None:
            assert out is not None, f"no answer to compare after {lines[-1]}"
            shown_in(shown, out, lines[-1][:80])
    assert ran >= 20

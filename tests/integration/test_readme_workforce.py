"""The README's workforce sections, run as written, in order, on one engine and one store.

The engine runs the shipped channels.yaml (loopback, free ports, a temporary data directory). From
the README this test reads the walkthrough's token and staff master file lines, then every ``sh``
block of the sections in :data:`SECTIONS`, and runs each command line: ``curl`` as an HTTP request to
the engine, ``.venv/bin/hms-ach ...`` as the CLI, ``NAME=$(...)`` and ``export`` as variables, the
SFTP demo server in-process. A ``text`` block right after an ``sh`` block holds lines of the output
of that block's last command; a ``json`` block is its answer, trimmed: each key shown must be in the answer with that value (recursively; a
list shows its first items), and a string ``"…"`` stands for any value.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.store.db import Store
from tests.integration.engine_helpers import mllp_channel
from tests.integration.test_readme_sftp import _demo_module  # the demo server script, loaded

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SECTIONS = (
    "## Onboarding a nurse over FHIR, then asking who works here",
    "## Nightly CSV files over SFTP: roster, shifts, timecards",
    "## Shifts, timecards and the compliance figures",
)
#: The walkthrough lines the workforce sections build on: the token, and the staff master file.
PRELUDE = ("TOKEN=", "AUTH=", ".venv/bin/hms-ach send samples/hl7/mfn_m02.hl7")
ANY = "…"
BLOCK = re.compile(r"```(sh|json|text)\n(.*?)```", re.S)


def section(text: str, heading: str) -> str:
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end >= 0 else len(text)]


def commands(block: str) -> list[str]:
    """The command lines of an ``sh`` block: continuations joined, comments and blank lines left out."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(line.strip())
    return out


def steps() -> list[tuple[list[str], Any]]:
    """(command lines, the trimmed answer shown after them or None), in README order."""
    text = README.read_text()
    walkthrough = section(text, "## A five-minute walkthrough")
    prelude = [c for b in BLOCK.findall(walkthrough) if b[0] == "sh" for c in commands(b[1])]
    found: list[tuple[list[str], Any]] = [([c for c in prelude if c.startswith(PRELUDE)], None)]
    for heading in SECTIONS:
        for kind, body in BLOCK.findall(section(text, heading)):
            if kind == "sh":
                found.append((commands(body), None))
            else:
                assert found[-1][1] is None, f"{heading}: two answers after one sh block"
                found[-1] = (found[-1][0], json.loads(body) if kind == "json" else Text(body))
    return found


class Text(str):
    """A ``text`` block: each of its lines is in the command's output (a list: one item a line)."""


def shown_in(shown: Any, got: Any, where: str = "$") -> None:
    """``shown`` (the README's trimmed answer) is part of ``got`` (see the module docstring)."""
    if shown == ANY:
        return
    if isinstance(shown, Text):
        output = "\n".join(got) if isinstance(got, list) else str(got)
        missing = [line for line in shown.splitlines() if line.strip() and line.strip() not in output]
        assert not missing, f"{where}: {missing} not in the output {output!r}"
        return
    if isinstance(shown, dict):
        assert isinstance(got, dict), f"{where}: expected an object, got {got!r}"
        for key, value in shown.items():
            assert key in got, f"{where}: no {key!r} in {sorted(got)}"
            shown_in(value, got[key], f"{where}.{key}")
    elif isinstance(shown, list):  # each item shown is a distinct item of the answer, in any order
        assert isinstance(got, list) and len(got) >= len(shown), f"{where}: {got!r}"
        left = list(got)
        for i, value in enumerate(shown):
            match = next((g for g in left if _is_part(value, g)), None)
            if match is None:
                shown_in(value, left[0] if len(left) == 1 else None, f"{where}[{i}]")  # says what differs
            left.remove(match)
    else:
        assert shown == got, f"{where}: README shows {shown!r}, the engine answered {got!r}"


def _is_part(shown: Any, got: Any) -> bool:
    try:
        shown_in(shown, got)
    except AssertionError:
        return False
    return True


class Shell:
    """Runs the README's command lines against the engine (see the module docstring)."""

    def __init__(self, engine: Engine, cwd: Path, monkeypatch: pytest.MonkeyPatch):
        self.engine, self.cwd, self.env = engine, cwd, monkeypatch
        self.vars: dict[str, str] = {"PWD": str(cwd)}
        self.base = f"http://127.0.0.1:{engine.http_port}"
        self.sftp: Any = None
        self.sftp_port = 0

    def expand(self, line: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: self.vars.get(m.group(1), m.group(0)), line)

    async def run(self, line: str) -> Any:
        assign = re.fullmatch(r"(\w+)=\$\((.*)\)", line)
        if assign:  # NAME=$(command [| python3 -c 'code'])
            command, _, pipe = assign.group(2).partition(" | ")
            out = await self.run(command)
            text = out if isinstance(out, str) else json.dumps(out)
            if pipe:
                code = shlex.split(pipe)
                assert code[:2] == ["python3", "-c"], pipe
                done = subprocess.run(
                    [sys.executable, "-c", code[2]], input=text, capture_output=True, text=True, timeout=30
                )
                assert done.returncode == 0, done.stderr
                text = done.stdout
            self.vars[assign.group(1)] = text.strip()
            return None
        words = shlex.split(self.expand(line), comments=True)
        simple = re.fullmatch(r"(\w+)=(.*)", line)
        if simple and len(words) == 1:
            self.vars[simple.group(1)] = words[0].partition("=")[2]
            return None
        if words[0] == "export":
            for word in words[1:]:
                name, _, value = word.partition("=")
                if name == "HMS_ACH_SFTP_PORT":  # the demo server listens on a free port here
                    value = str(self.sftp_port)
                self.env.setenv(name, value)
            return None
        if words[0] == "curl":
            return await self.curl(words[1:])
        if words[0] == ".venv/bin/hms-ach":
            return await self.cli(words[1:])
        if words[:2] == [".venv/bin/python", "scripts/sftp_demo_server.py"]:
            self.sftp, self.sftp_port = await _demo_module().start(self.cwd / "sftp_demo", 0)
            return None
        if words[0] == "ls":
            return sorted(p.name for p in (self.cwd / words[1]).iterdir())
        raise AssertionError(f"the README test cannot run: {line}")

    async def curl(self, args: list[str]) -> Any:
        method, headers, body, url = "GET", {}, None, ""
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "-X":
                method, i = args[i + 1], i + 1
            elif arg == "-H":
                name, _, value = args[i + 1].partition(":")
                headers[name.strip()] = value.strip()
                i += 1
            elif arg in ("-d", "--data", "--data-binary"):
                data = args[i + 1]
                body = (self.cwd / data[1:]).read_bytes() if data.startswith("@") else data.encode()
                method = "POST" if method == "GET" else method
                i += 1
            elif arg == "-s":
                pass
            else:
                url = arg
            i += 1
        url = url.replace("http://localhost:8080", self.base)
        async with httpx.AsyncClient(timeout=60) as http:
            resp = await http.request(method, url, headers=headers, content=body)
        assert resp.status_code < 500, f"{method} {url}: {resp.status_code} {resp.text[:500]}"
        try:
            return resp.json()
        except ValueError:
            return resp.text

    async def cli(self, args: list[str]) -> str:
        if args[0] in ("token", "jobs", "audit"):
            args = [*args, "--config", str(self.cwd / "channels.yaml")]
        result = await asyncio.to_thread(CliRunner().invoke, cli_app, args)
        assert result.exit_code == 0, f"hms-ach {' '.join(args)}: {result.output}"
        # stdout alone: CliRunner swaps the process's sys.stderr, so a warning the running engine
        # logs from another thread meanwhile would land in result.output
        return str(result.stdout)


@pytest.fixture
async def readme_engine(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Engine, Path]]:
    """The engine of the shipped channels.yaml in a folder laid out like the checkout (samples,
    scripts, mappings), the README's working directory."""
    for name in ("samples", "scripts", "mappings"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "channels.yaml").write_text((ROOT / "channels.yaml").read_text())
    for name in [n for n in os.environ if n.startswith("HMS_ACH_SFTP_")]:
        monkeypatch.delenv(name)
    for name, value in {
        "HMS_ACH_DATABASE_URL": store.url,
        "HMS_ACH_DATA_DIR": str(tmp_path / "data"),
        "HMS_ACH_HTTP_HOST": "127.0.0.1",
        "HMS_ACH_HTTP_PORT": "0",
        "HMS_ACH_MLLP_HOST": "127.0.0.1",
        "HMS_ACH_MLLP_PORT": "0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    engine = Engine(load_config(tmp_path / "channels.yaml"), database=store.url)
    await engine.start()
    monkeypatch.setenv("HMS_ACH_MLLP_PORT", str(mllp_channel(engine).port))  # for `hms-ach send`
    try:
        yield engine, tmp_path
    finally:
        await engine.stop()


async def test_readme_workforce_sections_in_order(
    readme_engine: tuple[Engine, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, cwd = readme_engine
    shell = Shell(engine, cwd, monkeypatch)
    ran = 0
    try:
        for lines, shown in steps():
            out: Any = None
            for line in lines:
                out = await shell.run(line)
                ran += 1
            if os.environ.get("HMS_ACH_README_SHOW"):  # to write the README's answers
                print(lines[-1] if lines else "", json.dumps(out, indent=2), sep="\n")
            if shown is not None:
                assert out is not None, f"no answer to compare after {lines[-1]}"
                shown_in(shown, out, lines[-1][:80])
    finally:
        if shell.sftp is not None:
            shell.sftp.close()
            await shell.sftp.wait_closed()
    assert ran > 20 and "ID" in shell.vars

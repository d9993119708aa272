"""The README's SFTP walkthrough, as a newcomer runs it: scripts/sftp_demo_server.py serves the sample
CSVs, the shipped channels.yaml is pointed at it through the environment, and one `hms-ach jobs run`
per channel stores the staff, shifts, timecards and kiosk clock events and moves the files to processed/."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES

Practitioner, Shift, Timecard = (RECORD_TABLES[n] for n in ("Practitioner", "Shift", "Timecard"))


ROOT = Path(__file__).resolve().parents[2]


def _demo_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "sftp_demo_server", ROOT / "scripts" / "sftp_demo_server.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_readme_sftp_walkthrough(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    demo = _demo_module()
    root = tmp_path / "sftp_demo"
    server, port = await demo.start(root, 0)
    try:
        monkeypatch.chdir(tmp_path)  # the channels' work_dir is relative, as for a user
        for name, value in {
            "HMS_ACH_SFTP_ENABLED": "true",
            "HMS_ACH_SFTP_HOST": "127.0.0.1",
            "HMS_ACH_SFTP_PORT": str(port),
            "HMS_ACH_SFTP_USER": demo.USER,
            "HMS_ACH_SFTP_PASSWORD_FILE": str(root / "password"),
            "HMS_ACH_SFTP_KNOWN_HOSTS": str(root / "known_hosts"),
            "HMS_ACH_DATABASE_URL": store.url,
        }.items():
            monkeypatch.setenv(name, value)
        config = str(ROOT / "channels.yaml")
        for job, rows in (
            ("poll:staff_roster_sftp", "4/4"),
            ("poll:shifts_sftp", "4/4"),
            ("poll:timecards_sftp", "3/3"),
            ("poll:clock_events_sftp", "4/4"),
        ):
            result = await asyncio.to_thread(
                CliRunner().invoke, cli_app, ["jobs", "run", job, "--config", config]
            )
            assert result.exit_code == 0, result.output
            assert f"processed ({rows} rows)" in result.output
    finally:
        server.close()
        await server.wait_closed()
    assert sorted(p.name for p in (root / "processed").iterdir()) == [
        "clock_events.csv",
        "shifts.csv",
        "staff_roster.csv",
        "timecards.csv",
    ]
    assert list((root / "inbox").iterdir()) == []
    with store.reader.connect() as conn:
        counts = [
            conn.execute(select(func.count()).select_from(t.__table__)).scalar_one()  # type: ignore[attr-defined]
            for t in (Practitioner, Shift, Timecard)
        ]
    assert counts == [4, 4, 5]  # 3 timecards from timecards.csv, 2 from the clock events

"""A config reload rebuilds the scheduler's jobs from the new channels.yaml (running engine, real APScheduler)."""

from __future__ import annotations

import shutil
from pathlib import Path

from hms_ach.app.config import load_config
from hms_ach.app.runtime import Engine
from hms_ach.channels.sftp_csv import SftpCsvChannel
from hms_ach.store.db import Store
from tests.integration.engine_helpers import ROOT

BASE = "engine:\n  mappings: mappings\n  watch: false\nhttp:\n  enabled: false\n"


def _sftp(name: str, interval: int, tmp_path: Path) -> str:
    return (
        f"  - name: {name}\n    type: sftp_csv\n    host: 127.0.0.1\n    port: 2222\n    username: feed\n"
        f"    password: pw\n    accept_any_host_key: true\n    dataset: staff_roster\n"
        f"    poll_interval_seconds: {interval}\n    work_dir: {tmp_path / 'work'}\n"
    )


def _triggers(eng: Engine) -> dict[str, str]:
    assert eng.scheduler is not None and eng.scheduler.aps is not None
    return {job.id: str(job.trigger) for job in eng.scheduler.aps.get_jobs()}


def _polled(eng: Engine, channel: str) -> object:
    """The channel object the poll job calls (bound as the job function's default argument)."""
    assert eng.scheduler is not None
    defaults = eng.scheduler.jobs[f"poll:{channel}"].run.__defaults__
    assert defaults
    return defaults[0]


async def test_reload_rebuilds_the_jobs(tmp_path: Path, store: Store) -> None:
    shutil.copytree(ROOT / "mappings", tmp_path / "mappings")
    config = tmp_path / "channels.yaml"
    config.write_text(
        BASE
        + "channels:\n"
        + _sftp("roster_in", 300, tmp_path)
        + "jobs:\n  credential_expiry:\n    cron: '0 2 * * *'\n"
    )
    eng = Engine(load_config(config), database=store.url)
    await eng.start()
    try:
        before = _triggers(eng)
        assert before["poll:roster_in"] == "interval[0:05:00]"
        assert "hour='2'" in before["credential_expiry"]
        first_channel = eng.channels["roster_in"]
        assert _polled(eng, "roster_in") is first_channel
        assert eng.scheduler is not None and eng.scheduler.aps is not None
        housekeeping_next = eng.scheduler.aps.get_job("housekeeping").next_run_time

        # a new channel, a changed poll interval, a new cron, and a job switched off
        config.write_text(
            BASE
            + "channels:\n"
            + _sftp("roster_in", 120, tmp_path)
            + _sftp("shifts_in", 600, tmp_path)
            + "jobs:\n  credential_expiry:\n    cron: '15 4 * * *'\n"
            + "  claim_creation:\n    enabled: false\n"
        )
        assert await eng.reload_config()
        after = _triggers(eng)
        assert after["poll:roster_in"] == "interval[0:02:00]"
        assert after["poll:shifts_in"] == "interval[0:10:00]"
        assert "hour='4'" in after["credential_expiry"] and "minute='15'" in after["credential_expiry"]
        assert "claim_creation" not in after
        # the poll job now belongs to the restarted channel, and an unchanged job kept its next run
        assert eng.channels["roster_in"] is not first_channel
        assert _polled(eng, "roster_in") is eng.channels["roster_in"]
        roster_in = eng.channels["roster_in"]
        assert isinstance(roster_in, SftpCsvChannel)
        assert roster_in.config.poll_interval_seconds == 120
        assert eng.scheduler is not None and eng.scheduler.aps is not None
        assert eng.scheduler.aps.get_job("housekeeping").next_run_time == housekeeping_next

        # the channel removed: its poll job goes too; jobs disabled: the scheduler stops
        config.write_text(BASE + "channels: []\njobs:\n  enabled: false\n")
        assert await eng.reload_config()
        assert eng.scheduler is None and eng.channels == {}
        config.write_text(BASE + "channels:\n" + _sftp("shifts_in", 600, tmp_path))
        assert await eng.reload_config()
        assert set(_triggers(eng)) == {
            "poll:shifts_in",
            "credential_expiry",
            "housekeeping",
            "claim_creation",
            "audit_checkpoint",
            "alerts",
            "case_timers",
        }
    finally:
        await eng.stop()

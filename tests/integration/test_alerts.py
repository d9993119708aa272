"""Alert rules (issue 19 item 2): a channel that errors past its threshold sends one alert and, once
its error rate falls, one recovery, received by a real webhook receiver on loopback; the rules'
states survive a restart; bad rules are refused with the setting named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hms_ach.app.runtime import Engine
from hms_ach.outbound.alerts import AlertRule, AlertSettings, check_rules
from hms_ach.store.db import Store
from tests.integration.engine_helpers import mllp_channel
from tests.integration.outbound_helpers import SECRET, Receiver, make_engine, send_mllp, wait_for

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def _engine(tmp_path: Path, store: Store, url: str) -> Engine:
    sink = (
        f"  - name: oncall\n    type: webhook\n    url: {url}\n    secret: {SECRET}\n"
        "    events: ['alert.*']\n    retry_initial_seconds: 0.05\n"
    )
    jobs = (
        "jobs:\n  alerts:\n    interval_seconds: 3600  # run by the test\n    rules:\n"
        "      - name: adt-errors\n        kind: error_rate\n        channel: adt_in\n"
        "        threshold: 0.5\n        min_messages: 2\n        window_minutes: 10\n"
    )
    return make_engine(tmp_path, store.url, sink, jobs)


async def test_one_alert_per_episode_then_one_recovery(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    url = await receiver.start()
    engine = _engine(tmp_path, store, url)
    await engine.start()
    try:
        assert engine.scheduler is not None
        port = mllp_channel(engine).port
        assert await send_mllp(port, ["bad/bad_sex_code.hl7", "bad/missing_pid3.hl7"]) == ["AE", "AE"]
        assert (await engine.scheduler.run_job("alerts"))[0] == "ok"
        await wait_for(lambda: receiver.names() == ["alert.firing"])
        assert (await engine.scheduler.run_job("alerts"))[0] == "ok"  # still firing: no second alert
        fired = receiver.events[0]["data"]
        assert fired["alert"] == "adt-errors" and fired["target"] == "adt_in"
        assert fired["value"].startswith("2 of 2 messages")
    finally:
        await engine.stop()
    engine = _engine(tmp_path, store, url)  # a restart remembers the episode
    await engine.start()
    try:
        assert engine.scheduler is not None
        await engine.scheduler.run_job("alerts")
        port = mllp_channel(engine).port
        assert await send_mllp(port, ["adt_a01.hl7", "adt_a02.hl7", "adt_a03.hl7"]) == ["AA", "AA", "AA"]
        await engine.scheduler.run_job("alerts")  # 2 of 5: below half
        await wait_for(lambda: receiver.names() == ["alert.firing", "alert.resolved"])
        resolved = receiver.events[1]["data"]
        assert resolved["alert"] == "adt-errors" and resolved["duration_seconds"] >= 0
    finally:
        await engine.stop()
        await receiver.stop()


def test_rules_of_every_kind_measure_the_store(store: Store) -> None:
    rules = [
        AlertRule(name="quiet", kind="silence", channel="adt_in", minutes=5),
        AlertRule(name="dead", kind="dead_letters", threshold=1),
        AlertRule(name="queue", kind="queue_depth", sink="oncall", threshold=100),
        AlertRule(name="jobs", kind="job_failing"),
    ]
    with store.transaction() as tx:
        assert check_rules(tx, rules) == (1, 1)  # only silence holds: nothing was ever received


def test_bad_rules_are_refused_naming_what_is_missing() -> None:
    with pytest.raises(ValidationError, match="needs `channel:`"):
        AlertRule(name="x", kind="error_rate")
    with pytest.raises(ValidationError, match="row count"):
        AlertRule(name="x", kind="dead_letters", threshold=0.5)
    with pytest.raises(ValidationError, match="unique"):
        AlertSettings(
            rules=[AlertRule(name="a", kind="job_failing"), AlertRule(name="a", kind="job_failing")]
        )

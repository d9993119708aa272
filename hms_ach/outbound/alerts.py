"""Alert rules (docs/alerts.md): the ``alerts`` job checks them and writes an ``alert.firing`` event
when a rule starts to hold and an ``alert.resolved`` event when it stops, once per episode.

The events go through the outbox like every other event, so any sink that subscribes to
``alert.*`` delivers them (a webhook to the on-call tool, RabbitMQ, or a ``notify`` sink that
e-mails people with the templates of mappings/notifications/alert_*.yaml), retried and
dead-lettered like the rest. A rule that names ``sinks:`` is sent to people only by those notify
sinks (its payload carries the names); other sinks still get it. Each rule's state is stored
(``alert_state``): a restart neither fires an episode again nor forgets to resolve it, and with
several engines the scheduler's single leader runs the job.

Rule kinds:

* ``error_rate``: the share of a channel's messages answered with an error or a rejection over the
  last ``window_minutes`` is at least ``threshold`` (a fraction), with at least ``min_messages``;
* ``silence``: a channel received nothing for ``minutes``;
* ``dead_letters``: a sink (or every sink) has at least ``threshold`` dead-lettered outbox rows;
* ``queue_depth``: a sink (or every sink) has at least ``threshold`` rows waiting;
* ``job_failing``: the last run of a job (or of any job) failed.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hms_ach.core.types import JobSchedule
from hms_ach.store import alert_queries as q
from hms_ach.store import outbox
from hms_ach.store.port import Tx

log = logging.getLogger("hms_ach.outbound.alerts")

RuleKind = Literal["error_rate", "silence", "dead_letters", "queue_depth", "job_failing"]
_NEEDS = {"error_rate": "channel", "silence": "channel"}


class AlertRule(BaseModel):
    """One rule of ``jobs: alerts: rules:`` in channels.yaml."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, description="Unique name; the events carry it")
    kind: RuleKind = Field(description="error_rate | silence | dead_letters | queue_depth | job_failing")
    channel: str | None = Field(None, description="error_rate, silence: the inbound channel")
    sink: str | None = Field(None, description="dead_letters, queue_depth: the sink (default: every sink)")
    job: str | None = Field(None, description="job_failing: the job (default: any job)")
    threshold: float = Field(
        0.1, ge=0, description="error_rate: a fraction (0.1 = 10%); dead_letters, queue_depth: a row count"
    )
    window_minutes: float = Field(15, gt=0, description="error_rate: the window looked at")
    min_messages: int = Field(10, ge=1, description="error_rate: fewer messages in the window never fire")
    minutes: float = Field(30, gt=0, description="silence: how long without a message fires")
    sinks: list[str] = Field(
        default_factory=list,
        description="notify sinks that send this rule's alerts to people (e-mail); empty: every notify "
        "sink subscribed to alert.*. Webhook and other sinks subscribed to alert.* get every rule's",
    )

    @model_validator(mode="after")
    def _target(self) -> AlertRule:
        needed = _NEEDS.get(self.kind)
        if needed is not None and getattr(self, needed) is None:
            raise ValueError(f"a {self.kind} rule needs `{needed}:`")
        if self.kind in ("dead_letters", "queue_depth") and self.threshold < 1:
            raise ValueError(f"a {self.kind} rule's threshold is a row count (1 or more)")
        return self


class AlertSettings(JobSchedule):
    """``jobs: alerts:`` in channels.yaml."""

    interval_seconds: float | None = Field(60, gt=0, description="How often the rules are checked")
    rules: list[AlertRule] = Field(default_factory=list, description="The alert rules; none by default")

    @model_validator(mode="after")
    def _unique(self) -> AlertSettings:
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"alert rule names must be unique: {', '.join(dup)}")
        return self


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def measure(tx: Tx, rule: AlertRule, now: datetime) -> tuple[bool, str]:
    """Whether ``rule`` holds now, and what was measured (for the event and ``hms-ach jobs``)."""
    if rule.kind == "error_rate":
        total, bad = q.message_counts(tx, rule.channel, now - timedelta(minutes=rule.window_minutes))
        rate = bad / total if total else 0.0
        holds = total >= rule.min_messages and rate >= rule.threshold
        return holds, f"{bad} of {total} messages in {rule.window_minutes:g} min ({rate:.0%})"
    if rule.kind == "silence":
        assert rule.channel is not None  # checked by the model
        last = _aware(q.last_received(tx, rule.channel))
        quiet = (now - last).total_seconds() / 60 if last is not None else None
        holds = quiet is None or quiet >= rule.minutes
        return holds, "no message yet" if quiet is None else f"last message {quiet:.0f} min ago"
    if rule.kind in ("dead_letters", "queue_depth"):
        status = "dead" if rule.kind == "dead_letters" else "pending"
        rows = q.outbox_rows(tx, rule.sink, status)
        return rows >= rule.threshold, f"{rows} {status} outbox rows"
    failing = [name for name, status in q.job_status(tx, rule.job) if status == "error"]
    return bool(failing), ("failing: " + ", ".join(sorted(failing))) if failing else "no job failing"


def check_rules(tx: Tx, rules: list[AlertRule], now: datetime | None = None) -> tuple[int, int]:
    """Measure every rule, store its state and write an event on each change; (firing, changed)."""
    now = now or datetime.now(UTC)
    firing = changed = 0
    for rule in rules:
        holds, value = measure(tx, rule, now)
        before = q.state(tx, rule.name)
        was = before.firing if before is not None else False
        firing += holds
        if holds == was:
            q.save_state(tx, rule.name, holds, before.since if before is not None else now, value, now)
            continue
        changed += 1
        since = _aware(before.since) if before is not None else None
        payload = {
            "alert": rule.name,
            "kind": rule.kind,
            "target": rule.channel or rule.sink or rule.job or "*",
            "value": value,
            "threshold": rule.threshold,
            "at": now.isoformat().replace("+00:00", "Z"),
        }
        if rule.sinks:
            payload["sinks"] = list(rule.sinks)
        if not holds and since is not None:
            payload["duration_seconds"] = round((now - since).total_seconds())
        outbox.enqueue(tx, "alert.firing" if holds else "alert.resolved", payload)
        log.warning(
            "alert.firing" if holds else "alert.resolved",
            extra={"alert": rule.name, "kind": rule.kind, "target": payload["target"]},
        )
        q.save_state(tx, rule.name, holds, now, value, now)
    return firing, changed


class AlertJob:
    """The ``alerts`` job (a :class:`hms_ach.core.types.Job`): :func:`check_rules`."""

    Settings = AlertSettings

    def run(self, tx: Tx, settings: AlertSettings) -> str:
        firing, changed = check_rules(tx, settings.rules)
        return f"{len(settings.rules)} rules, {firing} firing, {changed} changed"

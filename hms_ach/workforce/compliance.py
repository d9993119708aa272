"""The compliance figures of ``GET /api/v1/compliance/status``, by department (docs/workforce-rules.md).

Plain functions over what the store read (:mod:`hms_ach.store.workforce_queries`), no HTTP, no SQL.
Per department, resolved to one Organization (:mod:`hms_ach.workforce.departments`):

* ``active_staff``, ``expired_credentials``, ``expiring_credentials`` and ``credential_alerts``
  (open, by threshold): as of now;
* ``unfilled_shifts``: shifts without an employee, not cancelled and not over, as of now;
* ``hours_worked``, ``overtime_hours``, ``overtime_cost``: the timecards clocking in within the
  period. Minutes are summed as integers and rounded to hours once; overtime is counted over every
  timecard (the weeks before the period count towards its weekly line) and reported for the
  timecards in the period. The cost is the overtime hours times the hourly rate of the role of the
  timecard's linked shift (``workforce.pay_rates``) times ``workforce.overtime_pay_multiplier``;
  overtime with no rate (no linked shift, or a role without a rate) is ``overtime_hours_unpriced``;
* ``offboarded``: ``practitioner.offboarded`` events written within the period, by the department of
  the practitioner.

The rule violations (refused writes by rule code, within the period) are store-wide: a refused
write is stored as an error message, which keeps its rule code but not a department.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Protocol

from hms_ach.workforce.credentials import current_expiries
from hms_ach.workforce.departments import Department, Directory
from hms_ach.workforce.overtime import clock_in, contracts_of, hours, overtime_by_timecard
from hms_ach.workforce.rules import credential_ends, days_left, department_of, iso
from hms_ach.workforce.settings import WorkforceSettings, current


class RaisedAlert(Protocol):
    """An alert the credential-expiry scan raised (one per credential, expiry and threshold)."""

    @property
    def practitioner_id(self) -> str: ...
    @property
    def credential(self) -> str: ...
    @property
    def expires(self) -> str: ...
    @property
    def threshold(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...


class JobRunFacts(Protocol):
    """The last run of a scheduled job."""

    @property
    def status(self) -> str: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def finished_at(self) -> datetime | None: ...
    @property
    def detail(self) -> str | None: ...


#: The counts summed over the departments into the totals.
COUNTS = ("active_staff", "expired_credentials", "expiring_credentials", "unfilled_shifts", "offboarded")
#: Minutes kept per department while counting, shown as hours.
MINUTES = ("hours_worked", "overtime_hours", "overtime_hours_unpriced")
CENT = Decimal("0.01")


@dataclass
class Period:
    """``[start, end)``; None: open on that side."""

    start: datetime | None = None
    end: datetime | None = None

    def holds(self, instant: datetime | None) -> bool:
        if instant is None:
            return False
        instant = instant if instant.tzinfo else instant.replace(tzinfo=UTC)
        return (self.start is None or instant >= self.start) and (self.end is None or instant < self.end)


@dataclass
class Inputs:
    """What the store read for the report."""

    staff: list[dict[str, Any]]
    unfilled: list[dict[str, Any]]
    timecards: list[dict[str, Any]]
    alerts: list[RaisedAlert]
    scan_run: JobRunFacts | None
    organizations: list[dict[str, Any]] = field(default_factory=list)
    #: the Shift records the timecards link to, by reference (``Shift/<id>``)
    linked_shifts: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: the ``practitioner.offboarded`` events: (practitioner reference, written at)
    offboardings: list[tuple[str, datetime]] = field(default_factory=list)
    #: the refused writes: (rule code, stored at)
    violations: list[tuple[str, datetime]] = field(default_factory=list)


@dataclass
class Compliance:
    """The compliance figures: per department, their totals, the rule violations and the credential scan."""

    departments: dict[str, dict[str, Any]]
    totals: dict[str, Any]
    rule_violations: dict[str, int]
    credential_scan: dict[str, Any]


class _Tally:
    """The figures of each department, kept by report key while counting."""

    def __init__(self, directory: Directory):
        self.directory = directory
        self.by: dict[str, dict[str, Any]] = {}
        self.minutes: dict[str, dict[str, int]] = {}
        self.cost: dict[str, Decimal] = {}

    def __call__(self, text: str | None) -> dict[str, Any]:
        found = self.directory.resolve(text)
        entry = self.by.get(found.key)
        if entry is None:
            entry = self.by[found.key] = {
                "organization": found.organization,
                "resolution": found.resolution,
                "names": [],
                **dict.fromkeys(COUNTS, 0),
                "credential_alerts": {},
            }
            self.minutes[found.key] = dict.fromkeys(MINUTES, 0)
            self.cost[found.key] = Decimal(0)
        if text and text not in entry["names"]:
            entry["names"] = sorted([*entry["names"], text])
        return entry

    def key(self, text: str | None) -> str:
        self(text)
        return self.directory.resolve(text).key


def overtime_cost(minutes: int, role: str | None, settings: WorkforceSettings) -> Decimal | None:
    """The pay for ``minutes`` of overtime in ``role``: None when the role has no rate."""
    rate = settings.pay_rates.get(role) if role else None
    if rate is None:
        return None
    return Decimal(minutes) * rate * settings.overtime_pay_multiplier / 60


def money(amount: Decimal) -> float:
    """An amount rounded half up to the cent, as JSON shows it (12.68, never 12.679999)."""
    return float(amount.quantize(CENT, rounding=ROUND_HALF_UP))


def compliance(
    facts: Inputs,
    now: datetime,
    expiring_within_days: int,
    period: Period | None = None,
    department: str | None = None,
    settings: WorkforceSettings | None = None,
) -> Compliance:
    """The figures (see the module docstring), of every department or of the one ``department``
    names (resolved like the records' department texts)."""
    settings = settings or current()
    period = period or Period()
    tally = _Tally(Directory(facts.organizations))
    _staff(tally, facts.staff, now, expiring_within_days)
    for s in facts.unfilled:
        if (
            s.get("practitioner") is None
            and s.get("status") != "cancelled"
            and datetime.fromisoformat(s["end"]) > now
        ):
            tally((s.get("department") or {}).get("display"))["unfilled_shifts"] += 1
    _timecards(tally, facts, period, settings)
    people = {f"Practitioner/{res.get('id')}": res for res in facts.staff}
    for ref, at in facts.offboardings:
        if period.holds(at):
            tally(department_of(people.get(ref) or {}))["offboarded"] += 1
    scan = credential_scan(facts.staff, facts.alerts, facts.scan_run, now, tally)
    violations: dict[str, int] = {}
    for code, at in facts.violations:
        if period.holds(at):
            violations[code] = violations.get(code, 0) + 1
    keys = sorted(tally.by)
    if department is not None:
        wanted = tally.directory.resolve(department)
        keys = [k for k in keys if _same(tally.by[k], k, wanted)]
    departments = {k: _shown(tally, k) for k in keys}
    return Compliance(departments, _totals(tally, keys), dict(sorted(violations.items())), scan)


def _same(entry: dict[str, Any], key: str, wanted: Department) -> bool:
    if wanted.organization is not None:
        return bool(entry["organization"] == wanted.organization)
    return key == wanted.key


def _staff(tally: _Tally, staff: list[dict[str, Any]], now: datetime, within: int) -> None:
    today = now.date()
    for res in staff:
        d = tally(department_of(res))
        if not res.get("active", True):
            continue
        d["active_staff"] += 1
        for end in credential_ends(res):
            left = days_left(end, today)
            if left is None:
                continue
            if left < 0:
                d["expired_credentials"] += 1
            elif left <= within:
                d["expiring_credentials"] += 1


def _timecards(tally: _Tally, facts: Inputs, period: Period, settings: WorkforceSettings) -> None:
    overtime = overtime_by_timecard(facts.timecards, settings, contracts_of(facts.staff))
    for tc in facts.timecards:
        key = tally.key(str(tc["department"]) if tc.get("department") else None)
        if not period.holds(clock_in(tc)):
            continue
        minutes = tally.minutes[key]
        minutes["hours_worked"] += int(tc.get("workedMinutes") or 0)
        extra = overtime.get(str(tc.get("id")), 0)
        minutes["overtime_hours"] += extra
        shift = facts.linked_shifts.get((tc.get("shift") or {}).get("reference") or "") or {}
        cost = overtime_cost(extra, (shift.get("role") or {}).get("text"), settings) if extra else None
        if cost is None:
            minutes["overtime_hours_unpriced"] += extra
        else:
            tally.cost[key] += cost


def _shown(tally: _Tally, key: str) -> dict[str, Any]:
    entry = dict(tally.by[key])
    for name, total in tally.minutes[key].items():
        entry[name] = hours(total)
    entry["overtime_cost"] = money(tally.cost[key])
    return entry


def _totals(tally: _Tally, keys: list[str]) -> dict[str, Any]:
    totals: dict[str, Any] = {k: sum(tally.by[d][k] for d in keys) for k in COUNTS}
    for name in MINUTES:  # minutes summed, then rounded once
        totals[name] = hours(sum(tally.minutes[d][name] for d in keys))
    totals["overtime_cost"] = money(sum((tally.cost[d] for d in keys), Decimal(0)))
    alerts: dict[str, int] = {}
    for d in keys:
        for threshold, n in tally.by[d]["credential_alerts"].items():
            alerts[threshold] = alerts.get(threshold, 0) + n
    totals["credential_alerts"] = dict(sorted(alerts.items()))
    return totals


def credential_scan(
    staff: list[dict[str, Any]],
    alerts: Iterable[RaisedAlert],
    scan_run: JobRunFacts | None,
    now: datetime,
    dept: Callable[[str | None], dict[str, Any]],
) -> dict[str, Any]:
    """What the credential-expiry scan (hms_ach/workforce/credentials.py) found: its last run, and its alerts.

    An alert is open while the practitioner still holds that credential with that end date; one
    whose licence was renewed (a new end date) or removed is counted as raised but not open. Open
    alerts are added to their practitioner's department (``dept``) as ``credential_alerts`` by
    threshold."""
    alerts = list(alerts)
    people = {str(res.get("id")): res for res in staff}
    raised: dict[str, int] = {}
    open_: dict[str, int] = {}
    recent = 0
    for alert in alerts:
        threshold = str(alert.threshold)
        raised[threshold] = raised.get(threshold, 0) + 1
        created = alert.created_at if alert.created_at.tzinfo else alert.created_at.replace(tzinfo=UTC)
        recent += created > now - timedelta(days=1)
        res = people.get(str(alert.practitioner_id))
        if res is None or res.get("active") is False:  # offboarding closes the alerts
            continue
        if (str(alert.credential), str(alert.expires)) not in current_expiries(res):
            continue
        open_[threshold] = open_.get(threshold, 0) + 1
        counts = dept(department_of(res))["credential_alerts"]
        counts[threshold] = counts.get(threshold, 0) + 1
    last = None
    if scan_run is not None:
        last = {
            "status": scan_run.status,
            "started_at": iso(scan_run.started_at) if scan_run.started_at else None,
            "finished_at": iso(scan_run.finished_at) if scan_run.finished_at else None,
            "detail": scan_run.detail,
        }
    last_alert = max((a.created_at for a in alerts), default=None)
    return {
        "last_run": last,
        "alerts_raised": sum(raised.values()),
        "raised_by_threshold": dict(sorted(raised.items())),
        "raised_last_24h": recent,
        "open_by_threshold": dict(sorted(open_.items())),
        "last_alert_at": iso(last_alert) if last_alert else None,
    }


def linked_shift_refs(timecards: Iterable[dict[str, Any]]) -> set[str]:
    """The ``Shift/<id>`` references the timecards link to (their role prices the overtime)."""
    refs = {str((tc.get("shift") or {}).get("reference") or "") for tc in timecards}
    return {r for r in refs if r.startswith("Shift/")}


__all__ = [
    "Compliance",
    "Inputs",
    "JobRunFacts",
    "Period",
    "RaisedAlert",
    "compliance",
    "credential_scan",
    "linked_shift_refs",
    "money",
    "overtime_cost",
]

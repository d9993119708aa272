"""The workforce rules' settings: the ``workforce:`` section of channels.yaml.

Every rule of :mod:`hms_ach.workforce.shift_rules`, :mod:`hms_ach.workforce.timecard_rules` and
:mod:`hms_ach.workforce.overtime` reads its limits from here, whichever path wrote the record
(/api/v1, FHIR, CSV). The composition root hands the loaded section over with :func:`use` (at start
and on every reload); a process that never calls it (a script, a unit test) gets the defaults.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

OvertimeRuleSet = Literal["daily", "weekly", "daily_weekly", "8/80"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(
            f"unknown time zone {name!r}; expected an IANA name such as America/New_York"
        ) from exc
    return name


class ContractOvertime(_Strict):
    """The overtime rule of one contract (a department, or a staff member's contract code)."""

    rule_set: OvertimeRuleSet = Field("daily_weekly", description="Which overtime rule set applies")
    daily_hours: float = Field(8, gt=0, le=24, description="Hours per local day before overtime")
    weekly_hours: float = Field(40, gt=0, le=168, description="Hours per week before overtime")
    period_hours: float = Field(80, gt=0, le=336, description="8/80: hours per 14-day period before overtime")


class OvertimeSettings(ContractOvertime):
    """How overtime is counted (the default contract) and where the days start."""

    default_timezone: str = Field(
        "UTC", description="IANA time zone of the local day for a department not in department_timezones"
    )
    department_timezones: dict[str, str] = Field(
        default_factory=dict,
        description="IANA time zone of each department (by its name): overtime is counted per local day there",
    )
    period_start: date = Field(
        date(2024, 1, 1), description="8/80: the first day of some 14-day pay period (a date, local time)"
    )
    contracts: dict[str, ContractOvertime] = Field(
        default_factory=dict,
        description="Per-contract rules by name: a department's name (its staff's rule), or a contract code an "
        "employee carries (the Practitioner extension urn:hms-ach:fhir:StructureDefinition/overtime-contract), "
        "which wins over the department's",
    )

    @field_validator("default_timezone")
    @classmethod
    def _check_default(cls, value: str) -> str:
        return _zone(value)

    @field_validator("department_timezones")
    @classmethod
    def _check_departments(cls, value: dict[str, str]) -> dict[str, str]:
        for zone in value.values():
            _zone(zone)
        return value

    def timezone(self, department: str | None) -> ZoneInfo:
        """The time zone whose local days count for ``department``."""
        return ZoneInfo(self.department_timezones.get(department or "", self.default_timezone))

    def contract(self, department: str | None, employee_contract: str | None = None) -> ContractOvertime:
        """The overtime rule of an employee of ``department``: the contract the employee carries
        (``employee_contract``) when it is one of :attr:`contracts`, else the department's, else the
        default one."""
        if employee_contract and employee_contract in self.contracts:
            return self.contracts[employee_contract]
        return self.contracts.get(department or "", self)


class SwapSettings(_Strict):
    """Shift swaps."""

    auto_approve_qualified_peers: bool = Field(
        False,
        description="Approve a swap at once when the replacement passes every assignment rule and holds the "
        "same role as the shift (a qualified peer); otherwise a scheduler of the department decides",
    )


#: The Practitioner elements a survivorship rule may name (besides ``identifier:<system>``,
#: ``qualification:<code>`` and ``qualification.verification``).
PRACTITIONER_ELEMENTS = (
    "identifier",
    "active",
    "name",
    "telecom",
    "address",
    "gender",
    "birthDate",
    "photo",
    "qualification",
    "communication",
    "extension",
)


class SurvivorshipSettings(_Strict):
    """One staff record from many sources: who wins each Practitioner element, and who is who
    (docs/survivorship.md)."""

    enabled: bool = Field(
        True,
        description="Merge Practitioner writes element by element by their source (off: each write merges "
        "as its mapping's mode says, and the last source wins)",
    )
    match_systems: list[str] = Field(
        default_factory=lambda: ["http://hl7.org/fhir/sid/us-npi", "urn:hms-ach:id:staff"],
        description="The match policy: identifier systems that name one staff member, tried in this order "
        "when a write's business key finds no Practitioner; the first that names exactly one decides",
    )
    elements: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Element -> its sources (inbound channel names), highest priority first. Elements: "
        + ", ".join(PRACTITIONER_ELEMENTS)
        + ", identifier:<system>, qualification:<code>, qualification.verification. A source not listed "
        "ranks below the listed ones; an element not listed takes the last write",
    )

    @field_validator("elements")
    @classmethod
    def _check_elements(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, sources in value.items():
            base = name.split(":", 1)[0]
            if name == "qualification.verification" or (
                base in PRACTITIONER_ELEMENTS and (":" not in name or base in ("identifier", "qualification"))
            ):
                if len(set(sources)) != len(sources):
                    raise ValueError(f"{name}: a source is listed twice in {sources}")
                continue
            raise ValueError(
                f"unknown element {name!r}; expected one of {', '.join(PRACTITIONER_ELEMENTS)}, "
                "identifier:<system>, qualification:<code> or qualification.verification"
            )
        return value


class WorkforceSettings(_Strict):
    """``workforce:`` in channels.yaml: the rules applied to shifts, swaps and timecards from every source."""

    role_credentials: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Shift role -> the credential types (qualification codes) required, valid on every day "
        "of the shift; the employee must also hold a qualification of the role's own code. A role not "
        "listed is not checked for qualifications",
    )
    max_shift_hours: float = Field(16, gt=0, le=48, description="Longest shift, in hours")
    min_rest_hours: float = Field(
        8, ge=0, le=48, description="Shortest rest between two shifts of one employee, in hours"
    )
    max_weekly_hours: float = Field(
        60,
        gt=0,
        le=168,
        description="Most scheduled hours of one employee in one week (Monday to Sunday, local time in the "
        "department's time zone, as overtime.department_timezones says)",
    )
    max_timecard_hours: float = Field(
        24, gt=0, le=72, description="Longest timecard (clock-in to clock-out), in hours"
    )
    overtime: OvertimeSettings = Field(default_factory=OvertimeSettings, description="Overtime rules")
    swaps: SwapSettings = Field(default_factory=SwapSettings, description="Shift swap rules")
    survivorship: SurvivorshipSettings = Field(
        default_factory=SurvivorshipSettings,
        description="One staff record from many sources: element rules and the match policy",
    )
    pay_rates: dict[str, Annotated[Decimal, Field(gt=0, le=10000)]] = Field(
        default_factory=dict,
        description="Shift role -> straight-time hourly rate, which prices the overtime of the timecards "
        "linked to a shift of that role in the compliance status; a role not listed is left unpriced",
    )
    overtime_pay_multiplier: Decimal = Field(
        Decimal("1.5"), ge=1, le=5, description="Overtime pay = overtime hours x the role's rate x this"
    )

    def required_credentials(self, role: str) -> list[str]:
        """The credential types a shift of ``role`` needs."""
        return self.role_credentials.get(role, [])


_current = WorkforceSettings()


def use(settings: WorkforceSettings) -> None:
    """Apply ``settings`` from now on (the runtime calls it at start and on every reload)."""
    global _current
    _current = settings


def current() -> WorkforceSettings:
    """The settings in force."""
    return _current


__all__ = [
    "ContractOvertime",
    "OvertimeSettings",
    "SurvivorshipSettings",
    "SwapSettings",
    "WorkforceSettings",
    "current",
    "use",
]

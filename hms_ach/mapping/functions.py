"""The functions a mapping rule may call, by name: typed, registered, with examples that run as tests.

A new function is one decorated Python function here. It receives the rule's value (a string, or a
list of strings for ``sources:``) and the rule's ``args``; it returns the new value, or raises
FunctionError (which the engine turns into an AE naming the HL7 location).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class FunctionError(ValueError):
    """The value cannot be converted; the message says what was found and what was expected."""

    code = "102"  # table 0357: data type error


class UnmappedCode(FunctionError):
    """A code the rule's map does not know."""

    code = "103"  # table 0357: table value not found


@dataclass
class FunctionSpec:
    name: str
    fn: Callable[..., Any]
    summary: str
    args: dict[str, str] = field(default_factory=dict)
    examples: list[tuple[Any, dict[str, Any], Any]] = field(default_factory=list)


FUNCTIONS: dict[str, FunctionSpec] = {}


F = TypeVar("F", bound=Callable[..., Any])


def function(
    name: str,
    *,
    args: dict[str, str] | None = None,
    examples: list[tuple[Any, dict[str, Any], Any]] | None = None,
) -> Callable[[F], F]:
    """Register ``fn`` under ``name``. ``examples`` are (input, args, expected) triples run as tests."""

    def register(fn: F) -> F:
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        FUNCTIONS[name] = FunctionSpec(name, fn, summary, dict(args or {}), list(examples or []))
        return fn

    return register


# ---------------------------------------------------------------- dates
_TS = re.compile(
    r"^(?P<y>\d{4})(?P<mo>\d{2})?(?P<d>\d{2})?(?P<h>\d{2})?(?P<mi>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<frac>\d{1,4}))?(?P<tz>[+-]\d{4})?$"
)


def _tz(name: str) -> timezone | ZoneInfo:
    if name.upper() in ("UTC", "Z", ""):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise FunctionError(
            f"unknown time zone {name!r}; expected an IANA name such as America/New_York"
        ) from exc


@function(
    "hl7_datetime",
    args={"timezone": "IANA zone assumed when the value has a time but no offset (default UTC)"},
    examples=[
        ("20261126083000-0500", {}, "2026-11-26T08:30:00-05:00"),
        ("202611260830", {}, "2026-11-26T08:30:00+00:00"),
        ("20261126", {}, "2026-11-26"),
        ("202611", {}, "2026-11"),
        ("20261126083000.1234+0100", {}, "2026-11-26T08:30:00.1234+01:00"),
        ("20260701120000", {"timezone": "America/New_York"}, "2026-07-01T12:00:00-04:00"),
    ],
)
def hl7_datetime(value: str, timezone: str = "UTC") -> str:
    """HL7 DTM/TS to a FHIR dateTime, keeping the precision and the UTC offset."""
    m = _TS.match(value.strip())
    if not m:
        raise FunctionError(
            f"{value!r} is not an HL7 date/time: expected YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ]"
        )
    y, mo, d, h, mi, s = m.groups()[:6]
    try:
        if h is None:
            datetime(int(y), int(mo or 1), int(d or 1))
            return "-".join(p for p in (y, mo, d) if p)
        dt = datetime(int(y), int(mo or 1), int(d or 1), int(h), int(mi or 0), int(s or 0))
    except ValueError as exc:
        raise FunctionError(f"{value!r} is not a valid date/time: {exc}") from exc
    if m["tz"] and not _offset_in_range(m["tz"]):
        raise FunctionError(
            f"{value!r} has the UTC offset {m['tz']}, out of range: expected -1400 to +1400, minutes 00-59"
        )
    fast = _fixed_offset_text(m, y, mo, d, h, mi, s, timezone)
    if fast is not None:
        return fast
    if m["tz"]:
        sign = 1 if m["tz"][0] == "+" else -1
        offset = timedelta(hours=int(m["tz"][1:3]), minutes=int(m["tz"][3:5])) * sign
        dt = dt.replace(tzinfo=_fixed(offset))
    else:
        dt = dt.replace(tzinfo=_tz(timezone))
    text = dt.strftime("%Y-%m-%dT%H:%M:%S")
    if m["frac"]:
        text += "." + m["frac"]
    off = dt.utcoffset() or timedelta(0)
    total = int(off.total_seconds() // 60)
    sign_char = "+" if total >= 0 else "-"
    total = abs(total)
    return f"{text}{sign_char}{total // 60:02d}:{total % 60:02d}"


def _offset_in_range(tz: str) -> bool:
    """A ``+HHMM``/``-HHMM`` offset FHIR can carry: at most 14 hours, minutes 00-59."""
    hours, minutes = int(tz[1:3]), int(tz[3:5])
    return minutes < 60 and hours * 60 + minutes <= 14 * 60


def _fixed_offset_text(
    m: re.Match[str], y: str, mo: str | None, d: str | None, h: str, mi: str | None, s: str | None, zone: str
) -> str | None:
    """The text :func:`hl7_datetime` writes for an already validated value whose offset is fixed
    (its own, or UTC), made from the digits without a datetime's strftime; None for the other
    cases (a named zone, a year before 1000), left to the general code."""
    tz = m["tz"]
    if y[0] == "0":
        return None
    if tz:
        minutes = int(tz[1:3]) * 60 + int(tz[3:5])  # in range: hl7_datetime checked it
        sign = "-" if tz[0] == "-" and minutes else "+"
    elif zone.upper() in ("UTC", "Z", ""):
        minutes, sign = 0, "+"
    else:
        return None
    frac = m["frac"]
    return (
        f"{y}-{mo or '01'}-{d or '01'}T{h}:{mi or '00'}:{s or '00'}"
        f"{'.' + frac if frac else ''}{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    )


def _fixed(offset: timedelta) -> timezone:
    return timezone(offset)


@function(
    "hl7_date",
    examples=[("19750314", {}, "1975-03-14"), ("197503140830", {}, "1975-03-14"), ("1975", {}, "1975")],
)
def hl7_date(value: str) -> str:
    """HL7 DT/DTM to a FHIR date (the time, if any, is dropped)."""
    m = _TS.match(value.strip())
    if not m:
        raise FunctionError(f"{value!r} is not an HL7 date: expected YYYY[MM[DD]]")
    parts = [p for p in (m["y"], m["mo"], m["d"]) if p]
    try:
        datetime(int(m["y"]), int(m["mo"] or 1), int(m["d"] or 1))
    except ValueError as exc:
        raise FunctionError(f"{value!r} is not a valid date: {exc}") from exc
    return "-".join(parts)


@function(
    "date",
    args={"formats": "strptime formats tried in order (default ISO, US m/d/Y, d.m.Y)"},
    examples=[
        ("2027-03-31", {}, "2027-03-31"),
        ("03/31/2027", {}, "2027-03-31"),
        ("31.03.2027", {"formats": ["%d.%m.%Y"]}, "2027-03-31"),
    ],
)
def date(value: str, formats: list[str] | None = None) -> str:
    """A date written by a person or a spreadsheet (CSV files) to a FHIR date."""
    text = value.strip()
    for fmt in formats or ["%Y-%m-%d", "%m/%d/%Y", "%d.%m.%Y", "%Y%m%d"]:
        try:
            return datetime.strptime(text, fmt).date().isoformat()
        except ValueError:
            continue
    raise FunctionError(
        f"{value!r} is not a date in any of the formats {formats or 'YYYY-MM-DD, MM/DD/YYYY'}"
    )


@function(
    "datetime",
    args={"timezone": "IANA zone assumed when the value has no offset (default UTC)"},
    examples=[
        ("2026-12-01T07:00:00-05:00", {}, "2026-12-01T07:00:00-05:00"),
        ("2026-12-01 07:00", {"timezone": "America/New_York"}, "2026-12-01T07:00:00-05:00"),
    ],
)
def iso_datetime(value: str, timezone: str = "UTC") -> str:
    """An ISO 8601 date-time (as CSV files and FHIR write them) to a FHIR dateTime with its offset."""
    try:
        dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise FunctionError(f"{value!r} is not an ISO date-time such as 2026-12-01T07:00:00-05:00") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=_tz(timezone))
    return dt.isoformat()


# ---------------------------------------------------------------- text
@function("trim", examples=[("  a b ", {}, "a b")])
def trim(value: str) -> str:
    """Remove leading and trailing white space."""
    return value.strip()


@function("upper", examples=[("abc", {}, "ABC")])
def upper(value: str) -> str:
    """Upper-case the value."""
    return value.upper()


@function("lower", examples=[("ABC", {}, "abc")])
def lower(value: str) -> str:
    """Lower-case the value."""
    return value.lower()


@function("title", examples=[("O'NEIL-SMITH", {}, "O'Neil-Smith"), ("mary ann", {}, "Mary Ann")])
def title(value: str) -> str:
    """Capitalise each word (names sent in capitals); letters after an apostrophe or hyphen too."""
    return re.sub(r"[^\W\d_]+", lambda m: m.group(0).capitalize(), value.lower())


@function(
    "split",
    args={"separator": "where to split (default space)", "index": "1-based part to keep; omit for all"},
    examples=[("a,b,c", {"separator": ","}, ["a", "b", "c"]), ("a,b,c", {"separator": ",", "index": 2}, "b")],
)
def split(value: str, separator: str = " ", index: int | None = None) -> Any:
    """Split a value into parts (all of them, or the 1-based ``index``-th)."""
    parts = [p for p in value.split(separator)]
    if index is None:
        return parts
    return parts[index - 1] if 0 < index <= len(parts) else ""


@function(
    "join",
    args={"separator": "put between the parts (default space)"},
    examples=[(["a", "", "b"], {"separator": "-"}, "a-b")],
)
def join(value: Any, separator: str = " ") -> str:
    """Join the non-empty parts of a list (``sources:``) into one string."""
    items = value if isinstance(value, list) else [value]
    return separator.join(str(v) for v in items if v not in (None, ""))


@function(
    "concat",
    args={"separator": "put between the parts (default none)"},
    examples=[
        (["urn:x:", "42"], {}, "urn:x:42"),
        (["Smith", "", "John"], {"separator": ", "}, "Smith, John"),
    ],
)
def concat(value: Any, separator: str = "") -> str:
    """Concatenate the non-empty values of ``sources:`` in order."""
    return join(value, separator)


@function(
    "format",
    args={
        "template": "text with {0}, {1}... for the sources (required)",
        "all_required": "true: the result is empty unless every source has a value",
    },
    examples=[
        (["4W", "412", "A"], {"template": "{0}-{1}-{2}"}, "4W-412-A"),
        (["H", ""], {"template": "{0}|{1}", "all_required": True}, ""),
    ],
)
def format_text(value: Any, template: str = "{0}", all_required: bool = False) -> str:
    """Fill a template with the values of ``sources:`` ({0} is the first)."""
    items = value if isinstance(value, list) else [value]
    if all_required and any(v in (None, "") for v in items):
        return ""
    try:
        return str(template.format(*items))
    except (IndexError, KeyError) as exc:
        raise FunctionError(f"template {template!r} needs more values than the {len(items)} given") from exc


@function(
    "human_name",
    args={"use": "the name's use (official, usual...), optional"},
    examples=[
        (
            ["Rivera", "Maria", "Elena", "Mrs", ""],
            {},
            {"family": "Rivera", "given": ["Maria", "Elena"], "prefix": ["Mrs"]},
        ),
        (["Ng", "Al"], {"use": "official"}, {"use": "official", "family": "Ng", "given": ["Al"]}),
    ],
)
def human_name(value: Any, use: str | None = None) -> dict[str, Any]:
    """Build a FHIR HumanName from ``sources: [family, given, middle, prefix, suffix]`` (later ones optional)."""
    parts = (list(value) if isinstance(value, list) else [value]) + [""] * 5
    family, given, middle, prefix, suffix = (str(p or "").strip() for p in parts[:5])
    name: dict[str, Any] = {"use": use} if use else {}
    if family:
        name["family"] = family
    if given or middle:
        name["given"] = [g for g in (given, middle) if g]
    if prefix:
        name["prefix"] = [prefix]
    if suffix:
        name["suffix"] = [suffix]
    return name


@function(
    "address",
    args={"use": "the address's use (home, work...), optional"},
    examples=[
        (
            ["12 Oak St", "Apt 4", "Columbus", "OH", "43004", "USA"],
            {"use": "home"},
            {
                "use": "home",
                "line": ["12 Oak St", "Apt 4"],
                "city": "Columbus",
                "state": "OH",
                "postalCode": "43004",
                "country": "USA",
            },
        )
    ],
)
def address(value: Any, use: str | None = None) -> dict[str, Any]:
    """Build a FHIR Address from ``sources: [line1, line2, city, state, postal code, country]``."""
    parts = (list(value) if isinstance(value, list) else [value]) + [""] * 6
    line1, line2, city, state, postal, country = (str(p or "").strip() for p in parts[:6])
    out: dict[str, Any] = {"use": use} if use else {}
    lines = [x for x in (line1, line2) if x]
    if lines:
        out["line"] = lines
    for key, val in (("city", city), ("state", state), ("postalCode", postal), ("country", country)):
        if val:
            out[key] = val
    return out


@function(
    "lookup",
    args={
        "map": "code -> value, written in the rule (required)",
        "default": "value for codes not in the map; without it an unknown code is an error",
    },
    examples=[
        ("Y", {"map": {"Y": "active", "N": "inactive"}}, "active"),
        ("Q", {"map": {"Y": "active"}, "default": "unknown"}, "unknown"),
    ],
)
def lookup_inline(value: str, map: dict[str, Any] | None = None, default: Any = None) -> Any:  # noqa: A002
    """Translate a code with a small map written in the rule (use `table:` for shared code tables)."""
    table = {str(k).upper(): v for k, v in (map or {}).items()}
    found = table.get(str(value).strip().upper())
    if found is not None:
        return found
    if default is not None:
        return default
    raise UnmappedCode(f"code {value!r} is not in the rule's map ({', '.join(map or {})})")


# ---------------------------------------------------------------- numbers and checks
@function("decimal", examples=[("350.00", {}, 350.0), (" 12 ", {}, 12)])
def decimal(value: str) -> float | int:
    """A number (HL7 NM) as a JSON number."""
    text = value.strip()
    try:
        number = float(text)
    except ValueError as exc:
        raise FunctionError(f"{value!r} is not a number") from exc
    return int(number) if number.is_integer() and "." not in text else number


@function(
    "boolean",
    args={"true": "values meaning true (default Y, YES, T, TRUE, 1, A)"},
    examples=[("Y", {}, True), ("N", {}, False), ("A", {}, True)],
)
def boolean(value: str, true: list[str] | None = None) -> bool:
    """Y/N-style flags to true/false."""
    accepted = [t.upper() for t in (true or ["Y", "YES", "T", "TRUE", "1", "A"])]
    return value.strip().upper() in accepted


def npi_is_valid(npi: str) -> bool:
    """The NPI check digit: Luhn over the number prefixed with 80840."""
    if not re.fullmatch(r"\d{10}", npi):
        return False
    digits = [int(c) for c in "80840" + npi]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@function("npi", examples=[("1234567893", {}, "1234567893")])
def npi(value: str) -> str:
    """Check a National Provider Identifier (10 digits, Luhn check digit) and return it."""
    text = value.strip()
    if not npi_is_valid(text):
        raise FunctionError(f"{value!r} is not a valid NPI: expected 10 digits with a valid check digit")
    return text


# ---------------------------------------------------------------- billing (DFT^P03 charges)
_CPT = re.compile(r"^(\d{5}|\d{4}[FTU])$")
_HCPCS = re.compile(r"^[A-V]\d{4}$")
_ICD10 = re.compile(r"^[A-TV-Z][0-9][0-9A-Z](\.?[0-9A-Z]{1,4})?$")


@function("procedure_code", examples=[("99223", {}, "99223"), ("j1100", {}, "J1100"), ("0001U", {}, "0001U")])
def procedure_code(value: str) -> str:
    """Check a CPT (5 digits, or 4 digits and F/T/U) or HCPCS Level II (letter and 4 digits) code."""
    text = value.strip().upper()
    if not (_CPT.match(text) or _HCPCS.match(text)):
        raise FunctionError(
            f"{value!r} is not a known procedure code: expected CPT (99213, 0001U) or HCPCS (J1100)"
        )
    return text


@function("icd10_code", examples=[("J18.9", {}, "J18.9"), ("e119", {}, "E119")])
def icd10_code(value: str) -> str:
    """Check the format of an ICD-10-CM diagnosis code (letter, digit, 1-5 more; the dot is optional)."""
    text = value.strip().upper()
    if not _ICD10.match(text):
        raise FunctionError(f"{value!r} is not an ICD-10-CM code: expected e.g. J18.9")
    return text


@function("charge_amount", examples=[("350.00", {}, 350.0), ("0", {}, 0.0)])
def charge_amount(value: str) -> float:
    """A money amount that must not be negative (a charge); rounded to cents."""
    number = decimal(value)
    if number < 0:
        raise FunctionError(
            f"amount {value.strip()} is negative: a charge must be 0 or more (send a credit "
            "transaction type instead)"
        )
    return round(float(number), 2)


# ---------------------------------------------------------------- durations (CSV timecards)
@function(
    "minutes_between",
    args={
        "timezone": "IANA zone assumed for times without an offset (default UTC)",
        "max_hours": "a longer period is an error (default 36)",
    },
    examples=[
        (["2026-12-01T07:00:00-05:00", "2026-12-01T15:30:00-05:00"], {}, 510),
        (["2026-11-01 00:00", "2026-11-01 03:00"], {"timezone": "America/New_York"}, 240),
    ],
)
def minutes_between(value: Any, timezone: str = "UTC", max_hours: float = 36) -> int:
    """Whole minutes from the first date-time of ``sources:`` to the second (clock-in to clock-out)."""
    if not isinstance(value, list) or len(value) != 2 or not all(str(v).strip() for v in value):
        raise FunctionError("needs two date-times in `sources:` (start, end)")
    start, end = (datetime.fromisoformat(iso_datetime(str(v), timezone)) for v in value)
    minutes = (end - start).total_seconds() / 60
    if minutes < 0:
        raise FunctionError(f"ends ({value[1]}) before it starts ({value[0]})")
    if minutes > max_hours * 60:
        raise FunctionError(f"lasts more than {max_hours:g} hours ({value[0]} to {value[1]})")
    return int(minutes)

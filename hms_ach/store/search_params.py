"""FHIR R4 search parameters, declared as data.

Each record type of :data:`hms_ach.core.records.RECORD_TYPES` lists its parameters as
``name -> (type, path[, target types])``. A path is a
small FHIRPath subset: dotted element names, with ``|`` joining alternatives
(``"name.family | name.given"``). One declaration serves three readers:

* the write path: :func:`index_rows` walks the path over the resource JSON and turns what it finds
  into ``search_token`` / ``search_string`` / ``search_date`` / ``search_reference`` rows;
* the SQL builder in :mod:`hms_ach.store.search`, which looks the parameter up by name and
  queries the rows of its kind;
* the CapabilityStatement, which lists what is declared here.

``_id`` and ``_lastUpdated`` are declared in :data:`COMMON_PARAMS`; they read columns of the record
table rather than index rows.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import cache, lru_cache
from typing import Any, Literal

from hms_ach.core.records import PATIENT_COMPARTMENT, RECORD_TYPES, THE_PATIENT_ITSELF

ParamType = Literal["token", "string", "date", "reference"]

#: Longest text kept in an index row (the index columns are 255 characters wide).
MAX_INDEX_CHARS = 255
#: Open ends of a Period and the clamp for ranges that would leave the calendar.
FAR_PAST = datetime(1, 1, 1, tzinfo=UTC)
FAR_FUTURE = datetime(9999, 12, 31, tzinfo=UTC)


@dataclass(frozen=True)
class SearchParam:
    """One declared search parameter of one resource type."""

    name: str
    type: ParamType
    paths: tuple[str, ...]
    targets: tuple[str, ...] = ()
    """Reference parameters only: the resource types a reference may point to (empty = any)."""
    column: str | None = None
    """Common parameters only: the record-table column searched instead of index rows."""

    @property
    def expression(self) -> str:
        return " | ".join(self.paths)


#: Parameters every resource type has, searched on record-table columns.
COMMON_PARAMS: dict[str, SearchParam] = {
    "_id": SearchParam("_id", "token", ("id",), column="id"),
    "_lastUpdated": SearchParam("_lastUpdated", "date", ("meta.lastUpdated",), column="last_updated"),
}


def _build() -> dict[str, dict[str, SearchParam]]:
    out: dict[str, dict[str, SearchParam]] = {}
    for rtype, record_type in RECORD_TYPES.items():
        out[rtype] = {}
        for name, decl in record_type.params.items():
            kind, path = decl[0], decl[1]
            targets = decl[2] if len(decl) == 3 else ()
            paths = tuple(p.strip() for p in path.split("|"))
            out[rtype][name] = SearchParam(name, kind, paths, targets)  # type: ignore[arg-type]
    return out


#: resource type -> parameter name -> SearchParam (the declarations, parsed once).
SEARCH_PARAMS: dict[str, dict[str, SearchParam]] = _build()


#: The implicit code system of token parameters on ``code`` elements (a bare code in the resource,
#: bound to one value set): ``gender=http://hl7.org/fhir/administrative-gender|female`` matches the
#: ``"gender": "female"`` stored without a system. (resource type, parameter) -> system.
IMPLICIT_SYSTEMS: dict[tuple[str, str], str] = {
    ("Patient", "gender"): "http://hl7.org/fhir/administrative-gender",
    ("Practitioner", "gender"): "http://hl7.org/fhir/administrative-gender",
    ("Encounter", "status"): "http://hl7.org/fhir/encounter-status",
    ("Location", "status"): "http://hl7.org/fhir/location-status",
    ("Claim", "status"): "http://hl7.org/fhir/fm-status",
    ("Claim", "use"): "http://hl7.org/fhir/claim-use",
    ("Coverage", "status"): "http://hl7.org/fhir/fm-status",
    ("AllergyIntolerance", "type"): "http://hl7.org/fhir/allergy-intolerance-type",
    ("AllergyIntolerance", "category"): "http://hl7.org/fhir/allergy-intolerance-category",
    ("AllergyIntolerance", "criticality"): "http://hl7.org/fhir/allergy-intolerance-criticality",
    ("Observation", "status"): "http://hl7.org/fhir/observation-status",
}


def search_param(resource_type: str, name: str) -> SearchParam | None:
    """The parameter ``name`` of ``resource_type`` (including ``_id``/``_lastUpdated``), or None."""
    return COMMON_PARAMS.get(name) or SEARCH_PARAMS.get(resource_type, {}).get(name)


# ---------------------------------------------------------------------------- path walking
def walk(value: Any, path: str) -> Iterator[Any]:
    """Yield every value reached by following the dotted ``path`` through dicts and lists."""
    yield from reach(value, _steps(path))


def reach(value: Any, steps: tuple[str, ...]) -> list[Any]:
    """Every value reached by following ``steps`` (a dotted path split at its dots) through dicts
    and lists: lists on the way are flattened, a list at the end gives its items, None is never
    given. A list, without a generator per level: :func:`index_rows` reads it for every parameter
    of every record it indexes."""
    level = [value]
    for head in steps:
        found: list[Any] = []
        _reach_items(level, head, found)
        level = found
    out: list[Any] = []
    for v in level:
        if isinstance(v, list):
            out.extend(c for c in v if c is not None)
        else:
            out.append(v)
    return out


def _reach_items(items: list[Any], head: str, found: list[Any]) -> None:
    """Append to ``found`` the ``head`` element of each object in ``items`` (nested lists flattened)."""
    for item in items:
        if isinstance(item, dict):
            child = item.get(head)
            if child is not None:
                found.append(child)
        elif isinstance(item, list):
            _reach_items(item, head, found)


@cache
def _steps(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


# ---------------------------------------------------------------------------- value helpers
@lru_cache(maxsize=8192)
def normalise(text: str) -> str:
    """Lower case with accents removed: the form default and ``:contains`` string searches compare."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def clip(text: str) -> str:
    return text[:MAX_INDEX_CHARS]


_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d+))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@lru_cache(maxsize=8192)
def date_range(text: str) -> tuple[datetime, datetime]:
    """The UTC range ``[start, end)`` a FHIR date, dateTime or instant stands for, by its precision.

    ``2026`` covers the year, ``2026-11-26`` the day, ``...T10:15:30`` one second. A value without
    an offset is taken as UTC. Raises ValueError for text that is not such a value.
    """
    match = _DATE_RE.match(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a FHIR date/dateTime (expected YYYY[-MM[-DD[Thh:mm[:ss][Z|+hh:mm]]]])"
        )
    g = match.groupdict()
    year, month, day = int(g["y"]), int(g["m"] or 1), int(g["d"] or 1)
    hour, minute, second = int(g["H"] or 0), int(g["M"] or 0), int(g["S"] or 0)
    frac = (g["f"] or "")[:6]
    micro = int(frac.ljust(6, "0")) if frac else 0
    tz = UTC
    if g["tz"] and g["tz"] != "Z":
        sign = 1 if g["tz"][0] == "+" else -1
        hh, mm = int(g["tz"][1:3]), int(g["tz"][4:6])
        if hh > 23 or mm > 59:
            raise ValueError(f"{text!r} has an invalid offset")
        tz = timezone(sign * timedelta(hours=hh, minutes=mm))
    try:
        start = datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date: {exc}") from exc
    if year == 0:
        raise ValueError(f"{text!r}: year 0 does not exist")
    if g["f"]:
        step: timedelta | None = timedelta(microseconds=10 ** (6 - len(frac)))
    elif g["S"]:
        step = timedelta(seconds=1)
    elif g["M"]:
        step = timedelta(minutes=1)
    else:
        step = None
    start_utc = _to_utc(start)
    if step is not None:
        return start_utc, _shift(start_utc, step)
    if g["d"]:
        return start_utc, _shift(start_utc, timedelta(days=1))
    if g["m"]:
        nxt = (year + 1, 1) if month == 12 else (year, month + 1)
    else:
        nxt = (year + 1, 1)
    end = FAR_FUTURE if nxt[0] > 9999 else datetime(nxt[0], nxt[1], 1, tzinfo=UTC)
    return start_utc, end


def _to_utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return FAR_PAST if value.year < 5000 else FAR_FUTURE


def _shift(value: datetime, step: timedelta) -> datetime:
    try:
        return min(value + step, FAR_FUTURE)
    except OverflowError:
        return FAR_FUTURE


def parse_reference(text: str) -> tuple[str | None, str]:
    """``Patient/1``, ``http://x/fhir/Patient/1/_history/2`` or a bare ``1`` -> (type or None, id)."""
    text = text.strip()
    parts = [p for p in text.split("?", 1)[0].split("/") if p]
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) >= 2 and parts[-2][:1].isupper():
        return parts[-2], parts[-1]
    return None, text


# ---------------------------------------------------------------------------- extraction per type
def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str | int | float):
        yield None, str(value)
    elif isinstance(value, dict):
        if isinstance(value.get("coding"), list):  # CodeableConcept: each coding
            for coding in value["coding"]:
                yield from _tokens(coding)
        elif "code" in value:  # Coding
            if value.get("code") is not None:
                yield value.get("system"), str(value["code"])
        elif "value" in value:  # Identifier
            if value.get("value") is not None:
                yield value.get("system"), str(value["value"])


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # a complex type (HumanName, Address): its string leaves
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _dates(value: Any) -> Iterator[tuple[datetime, datetime]]:
    if isinstance(value, str):
        try:
            yield date_range(value)
        except ValueError:
            return
    elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
        try:
            start = date_range(value["start"])[0] if value.get("start") else FAR_PAST
            end = date_range(value["end"])[1] if value.get("end") else FAR_FUTURE
        except (ValueError, TypeError):
            return
        yield start, max(start, end)


#: Reference parameter paths whose element is a canonical (``url[|version]``), not a Reference.
CANONICAL_PATHS = frozenset({"questionnaire"})


def _references(value: Any, targets: tuple[str, ...], canonical: bool = False) -> Iterator[tuple[str, str]]:
    if canonical and isinstance(value, str):  # QuestionnaireResponse.questionnaire
        value = {"reference": value.split("|", 1)[0]}
    if not isinstance(value, dict) or not isinstance(value.get("reference"), str):
        return
    rtype, rid = parse_reference(value["reference"])
    if rtype is None or not rid or len(rid) > 64:
        return
    if targets and rtype not in targets:
        return
    yield rtype, rid


def _rows_for(param: SearchParam, value: Any) -> Iterator[dict[str, Any]]:
    if param.type == "token":
        for system, code in _tokens(value):
            yield {"param": param.name, "system": clip(system) if system else None, "value": clip(code)}
    elif param.type == "string":
        for text in _strings(value):
            if text.strip():
                yield {"param": param.name, "norm": clip(normalise(text)), "exact": clip(text)}
    elif param.type == "date":
        for start, end in _dates(value):
            yield {"param": param.name, "start": start, "end": end}
    else:
        for rtype, rid in _references(value, param.targets, param.expression in CANONICAL_PATHS):
            yield {"param": param.name, "target_type": rtype, "target_id": rid}


_Plan = tuple[tuple[SearchParam, tuple[tuple[str, ...], ...]], ...]
_plans: dict[tuple[str, tuple[int, ...]], _Plan] = {}


def _index_plan(resource_type: str) -> _Plan:
    """The parameters of ``resource_type`` with their paths split at the dots, made once per set
    of declarations (a parameter declared at run time, as the reindex tests do, makes a new one)."""
    params = SEARCH_PARAMS.get(resource_type, {})
    key = (resource_type, tuple(map(id, params.values())))
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = tuple((p, tuple(_steps(path) for path in p.paths)) for p in params.values())
    return plan


def index_rows(resource_type: str, resource: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The search-index rows of one resource, by kind (token/string/date/reference), without duplicates."""
    out: dict[str, list[dict[str, Any]]] = {}
    for param, paths in _index_plan(resource_type):
        seen: set[tuple[Any, ...]] | None = None
        for steps in paths:
            top = resource.get(steps[0])  # most parameters read an element the record does not have
            if top is None:
                continue
            for value in reach(top, steps[1:]):
                for row in _rows_for(param, value):
                    key = tuple(row.values())
                    if seen is None:
                        seen = set()
                    if key not in seen:
                        seen.add(key)
                        out.setdefault(param.type, []).append(row)
    return out


def in_patient_compartment(resource_type: str, rid: str, resource: dict[str, Any], patient: str) -> bool:
    """Whether the record ``resource_type/rid`` with content ``resource`` is in the compartment of
    ``Patient/patient``: the same rule as the search condition
    (:func:`hms_ach.store.search_sql.compartment_clause`), applied to one record's content (a read, a
    vread of an older version, or the content of a write)."""
    declared = PATIENT_COMPARTMENT.get(resource_type, ())
    if THE_PATIENT_ITSELF in declared and rid == patient:
        return True
    params = SEARCH_PARAMS.get(resource_type, {})
    for name in declared:
        param = params.get(name)
        if param is None or param.type != "reference":
            continue
        for path in param.paths:
            for value in reach(resource, _steps(path)):
                for row in _rows_for(param, value):
                    if row["target_type"] == "Patient" and row["target_id"] == patient:
                        return True
    return False

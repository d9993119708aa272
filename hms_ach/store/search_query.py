"""The FHIR R4 search request: parameters parsed into a :class:`SearchQuery`, and its paging cursor.

:func:`parse_query` reads request parameters (repeated keys are AND, commas are OR, backslash
escapes ``\\,`` ``\\|`` ``\\$`` as in the spec) and checks them against the declarations in
:mod:`hms_ach.store.search_params`. What the server cannot do as asked raises
:class:`SearchError`, which the API renders as a 400 OperationOutcome; unknown parameters are
ignored with a warning unless strict handling is requested.

Across references: ``_include``/``_revinclude`` (with ``:iterate``) become :class:`Include`
directives; a chained parameter (``subject:Patient.family``) and ``_has``
(``_has:Encounter:subject:status``) become a :class:`Criterion` with a :class:`Link` to the
criterion on the other type. Both are one level deep; what they may name comes from the same
declarations (:func:`revinclude_params`, :func:`chain_targets`) the CapabilityStatement lists.

The cursor (``_cursor``) is opaque to clients: base64url JSON holding the sort keys and id of the
last row served plus a digest of the query it belongs to, so it cannot be replayed on another search.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson

from hms_ach.core.errors import HmsAchError
from hms_ach.core.records import FHIR_SERVED
from hms_ach.store.models import RECORD_TABLES
from hms_ach.store.search_params import (
    FAR_FUTURE,
    FAR_PAST,
    SEARCH_PARAMS,
    SearchParam,
    date_range,
    search_param,
)

DEFAULT_COUNT = 20
MAX_COUNT = 100
MAX_VALUE_CHARS = 1000
MAX_CURSOR_CHARS = 8000
MAX_PARAMETERS = 100
DATE_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
#: ``ap`` widens the value's range by this share of its distance from now (at least a day each way).
APPROXIMATE_SHARE = 0.1
MODIFIERS: dict[str, set[str]] = {
    "token": {"not", "missing"},
    "string": {"exact", "contains", "missing"},
    "date": {"missing"},
    "reference": {"missing"},
}
#: Result parameters we act on, and those accepted without effect.
RESULT_PARAMS = {"_count", "_sort", "_total", "_cursor", "_summary", "_elements"}
#: The ``_summary`` values (the FHIR layer cuts the resources; ``count`` serves no entries).
SUMMARY_VALUES = ("true", "text", "data", "count", "false")
NEUTRAL_PARAMS = {"_format", "_pretty"}
#: ``_include`` / ``_revinclude`` with their ``:iterate`` forms (``:recurse`` is the STU3 name of ``:iterate``).
INCLUDE_KEYS = {
    "_include": (False, False),
    "_include:iterate": (False, True),
    "_include:recurse": (False, True),
    "_revinclude": (True, False),
    "_revinclude:iterate": (True, True),
    "_revinclude:recurse": (True, True),
}
#: At most this many included (``_include``/``_revinclude``) resources per page; past it the page
#: carries a warning OperationOutcome.
MAX_INCLUDED = 1000
#: ``:iterate`` follows references at most this many links away from a match.
MAX_INCLUDE_DEPTH = 3
SORTABLE_TYPES = {"string", "date", "token"}


class SearchError(HmsAchError):
    """A search request the server cannot run as asked; ``code`` is a FHIR issue-type code."""

    def __init__(self, diagnostics: str, code: str = "invalid", expression: str | None = None):
        self.diagnostics = diagnostics
        self.code = code
        self.expression = expression
        super().__init__(diagnostics)


@dataclass
class Criterion:
    """One occurrence of a search parameter: its values are OR-ed, occurrences are AND-ed.

    A chained parameter (``subject:Patient.family=x``) is a criterion on the reference ``param`` with
    a ``chain``; a reverse chain (``_has:Encounter:subject:status=x``) one with ``has``, whose
    ``param`` is the referring type's reference parameter."""

    param: SearchParam
    modifier: str | None
    values: list[str]
    chain: Link | None = None
    has: Link | None = None


@dataclass
class Link:
    """The other end of a chain or ``_has``: the criterion ``inner`` on the records of ``other``."""

    other: str
    inner: Criterion


@dataclass
class SortKey:
    param: SearchParam
    descending: bool = False


@dataclass
class Include:
    """``_include`` (the records ``source``'s ``param`` points at) or, ``reverse``, ``_revinclude``
    (the ``source`` records whose ``param`` points at the records found); ``iterate`` applies it to
    the included records too."""

    source: str
    param: SearchParam
    target: str | None = None
    reverse: bool = False
    iterate: bool = False


@dataclass(frozen=True)
class Access:
    """Which records a search may return (the caller's SMART scopes, decided by the HTTP layer).

    ``types`` maps each record type the caller may see to ``None`` (every record of the type) or a
    patient id (only the records in that patient's compartment, see
    :attr:`hms_ach.core.records.RecordType.patient_compartment`); a type not in it is not visible
    (its ``_include``-d records are left out). ``types=None`` (the default) sees everything, and adds
    no condition to the SQL.
    """

    types: Mapping[str, str | None] | None = None

    def visible(self, resource_type: str) -> bool:
        return self.types is None or resource_type in self.types

    def compartment(self, resource_type: str) -> str | None:
        """The patient whose compartment limits ``resource_type``, or None (not limited)."""
        return None if self.types is None else self.types.get(resource_type)


#: No limit: every record of every type.
EVERYTHING = Access()


@dataclass
class SearchQuery:
    resource_type: str
    criteria: list[Criterion] = field(default_factory=list)
    sort: list[SortKey] = field(default_factory=list)
    includes: list[Include] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    total: str = "auto"
    """``_total``: ``auto`` (no ``_total``) gives it only when it costs nothing (every match on the
    first page; ``_count=0`` and ``_summary=count`` count); ``accurate`` counts every match on every
    page; ``estimate`` counts up to a bound and estimates past it; ``none`` never
    (:func:`hms_ach.store.search.page_total`)."""
    after: list[Any] | None = None
    understood: list[tuple[str, str]] = field(default_factory=list)
    """The parameters acted on, in request order (for the self link and the cursor digest)."""
    warnings: list[str] = field(default_factory=list)
    summary: str | None = None
    """``_summary``: true, text, data, count or false (None: not asked)."""
    elements: list[str] | None = None
    """``_elements``: the top-level element names asked for (None: not asked)."""
    access: Access = EVERYTHING
    """What the caller may see: the matches are limited to ``access.compartment(resource_type)`` and
    the included records to the visible types (each in its compartment), in the SQL."""
    max_included: int = 0
    """At most this many included resources (set from :data:`MAX_INCLUDED` by :func:`parse_query`)."""

    def self_query(self) -> str:
        return urlencode(self.understood)

    def next_query(self, cursor: str) -> str:
        return urlencode([(k, v) for k, v in self.understood if k != "_cursor"] + [("_cursor", cursor)])


def sort_params(resource_type: str) -> list[str]:
    """The parameter names ``_sort`` accepts for ``resource_type``."""
    declared = SEARCH_PARAMS.get(resource_type, {}).values()
    return ["_id", "_lastUpdated"] + [p.name for p in declared if p.type in SORTABLE_TYPES]


def include_params(resource_type: str) -> list[str]:
    """The ``_include`` values accepted for ``resource_type`` (``Type:param``)."""
    return [
        f"{resource_type}:{p.name}"
        for p in SEARCH_PARAMS.get(resource_type, {}).values()
        if p.type == "reference"
    ]


def points_at(param: SearchParam, resource_type: str) -> bool:
    """Whether the reference parameter ``param`` may point at a ``resource_type`` record."""
    return param.type == "reference" and (not param.targets or resource_type in param.targets)


def revinclude_params(resource_type: str) -> list[str]:
    """The ``_revinclude`` values accepted for ``resource_type``: every ``Type:param`` of a served
    type whose reference parameter may point at it (the same links ``_has`` follows)."""
    return [
        f"{source}:{p.name}"
        for source in FHIR_SERVED
        for p in SEARCH_PARAMS.get(source, {}).values()
        if points_at(p, resource_type)
    ]


def chain_targets(param: SearchParam) -> list[str]:
    """The served types a chain through the reference parameter ``param`` may reach."""
    return [t for t in FHIR_SERVED if points_at(param, t)]


# ---------------------------------------------------------------------------- parsing
def split_escaped(text: str, sep: str) -> list[str]:
    """Split on ``sep`` unless preceded by a backslash; the escapes stay for :func:`unescape`."""
    parts, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            current.append(text[i : i + 2])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out)


def parse_query(
    resource_type: str, params: list[tuple[str, str]], *, strict: bool = False, access: Access = EVERYTHING
) -> SearchQuery:
    """Parse request parameters for a search on ``resource_type`` by a caller who may see ``access``;
    raises SearchError on bad input."""
    if resource_type not in RECORD_TABLES:
        raise SearchError(f"resource type {resource_type!r} is not supported", "not-supported")
    if len(params) > MAX_PARAMETERS:
        raise SearchError(f"too many parameters ({len(params)}, at most {MAX_PARAMETERS})", "too-costly")
    query = SearchQuery(resource_type, access=access)
    cursor: str | None = None
    for key, value in params:
        limit = MAX_CURSOR_CHARS if key == "_cursor" else MAX_VALUE_CHARS
        if len(value) > limit or len(key) > 200:
            raise SearchError(
                f"value of {key[:64]!r} is longer than {limit} characters", "too-long", key[:64]
            )
        if "\x00" in value or "\x00" in key:
            raise SearchError(f"parameter {key[:64]!r} contains a NUL character", "invalid", key[:64])
        if key in NEUTRAL_PARAMS or value == "":
            continue
        if key in INCLUDE_KEYS:
            query.includes.extend(_includes(resource_type, key, value))
            query.understood.append((key, value))
            continue
        if key.startswith("_has:") or key == "_has":
            query.criteria.append(_has_criterion(resource_type, key, value, access))
            query.understood.append((key, value))
            continue
        if "." in key and search_param(resource_type, key.partition(".")[0].partition(":")[0]) is not None:
            query.criteria.append(_chain_criterion(resource_type, key, value, access))
            query.understood.append((key, value))
            continue
        name, _, modifier = key.partition(":")
        if name in RESULT_PARAMS and not modifier:
            if name == "_cursor":
                cursor = value
            elif _result_param(query, name, value, strict):
                query.understood.append((key, value))
            continue
        param = search_param(resource_type, name)
        if param is None:
            if key.startswith("_include") or key.startswith("_revinclude") or strict:
                raise SearchError(
                    f"parameter {key!r} is not supported for {resource_type}", "not-supported", key
                )
            query.warnings.append(f"parameter {key!r} is not supported for {resource_type} and was ignored")
            continue
        query.criteria.append(_criterion(param, modifier or None, value, key))
        query.understood.append((key, value))
    if cursor is not None:
        query.after = _decode_cursor(cursor, query)
        query.understood.append(("_cursor", cursor))
    query.max_included = MAX_INCLUDED
    return query


def _includes(resource_type: str, key: str, value: str) -> list[Include]:
    """The directives of one ``_include``/``_revinclude`` parameter: ``Type:param[:target]`` or
    ``*`` (every reference parameter of the searched type, or every one that may point at it)."""
    reverse, iterate = INCLUDE_KEYS[key]
    supported = revinclude_params(resource_type) if reverse else include_params(resource_type)
    if value == "*" and not iterate:
        out = []
        for item in supported:
            source, _, pname = item.partition(":")
            param = search_param(source, pname)
            if param is not None:
                out.append(Include(source, param, None, reverse, False))
        return out
    parts = value.split(":")
    source = parts[0]
    param = search_param(source, parts[1]) if len(parts) in (2, 3) and source in FHIR_SERVED else None
    target = parts[2] if len(parts) == 3 else None
    fits = param is not None and param.type == "reference"
    if fits and param is not None and target is not None:
        fits = target in FHIR_SERVED and points_at(param, target)
    if fits and param is not None and not iterate:
        # without :iterate the directive starts from the matches
        fits = points_at(param, resource_type) if reverse else source == resource_type
    if not fits or param is None:
        what = "a reference parameter of a served type" if iterate else ", ".join(supported) or "none"
        raise SearchError(
            f"{key}={value[:80]!r} is not supported for {resource_type}; expected Type:param[:target]"
            f"{' or *' if not iterate else ''}, supported: {what}",
            "not-supported",
            key,
        )
    return [Include(source, param, target, reverse, iterate)]


def _check_visible(resource_type: str, key: str, access: Access) -> None:
    if not access.visible(resource_type):
        raise SearchError(
            f"{key[:80]!r} searches {resource_type} records, which this token may not read",
            "forbidden",
            key[:80],
        )


def _untyped_chain_target(targets: list[str]) -> str | None:
    """The target of a chain without a type modifier through a reference that may point at a
    Patient or a Group (and no other served type): the Patient (``subject.identifier`` is the
    patient's, as before Group was served; ``subject:Group.`` reaches a Group). None: ambiguous."""
    return "Patient" if sorted(targets) == ["Group", "Patient"] else None


def _chain_criterion(resource_type: str, key: str, value: str, access: Access) -> Criterion:
    """``ref[:Type].param[:modifier]=value``: the records whose reference ``ref`` points at a
    ``Type`` record matching ``param``; one level only."""
    head, _, tail = key.partition(".")
    ref_name, _, type_modifier = head.partition(":")
    ref = search_param(resource_type, ref_name)
    if ref is None or ref.type != "reference":
        raise SearchError(
            f"chained parameter {key[:80]!r}: {ref_name[:64]!r} is not a reference parameter of "
            f"{resource_type}; chain through one of: "
            f"{', '.join(p.name for p in SEARCH_PARAMS.get(resource_type, {}).values() if p.type == 'reference')}",
            "not-supported",
            key[:80],
        )
    if "." in tail:
        raise SearchError(
            f"chained parameter {key[:80]!r} is more than one level deep; chains are supported one level "
            f"deep (e.g. {ref_name}.identifier=...)",
            "not-supported",
            key[:80],
        )
    targets = chain_targets(ref)
    if type_modifier:
        if type_modifier not in targets:
            raise SearchError(
                f"chained parameter {key[:80]!r}: {ref_name} does not point at {type_modifier[:64]!r} here; "
                f"expected one of: {', '.join(targets) or 'none'}",
                "not-supported",
                key[:80],
            )
        target = type_modifier
    elif len(targets) == 1:
        target = targets[0]
    elif (untyped := _untyped_chain_target(targets)) is not None:
        target = untyped
    else:
        raise SearchError(
            f"chained parameter {key[:80]!r} needs a type modifier: {resource_type}.{ref_name} may point "
            f"at {', '.join(targets)}; write e.g. {ref_name}:{targets[0]}.{tail[:64]}",
            "invalid",
            key[:80],
        )
    inner_name, _, inner_modifier = tail.partition(":")
    known = ", ".join(["_id", "_lastUpdated", *SEARCH_PARAMS.get(target, {})])
    link = _link(
        target,
        inner_name,
        inner_modifier or None,
        value,
        key,
        access,
        f"chained parameter {key[:80]!r}",
        f"known: {known}",
    )
    return Criterion(ref, None, [value], chain=link)


def _link(
    other: str,
    name: str,
    modifier: str | None,
    value: str,
    key: str,
    access: Access,
    what: str,
    expected: str,
) -> Link:
    """The far side of a chain or ``_has``: the criterion ``name[:modifier]=value`` on ``other``
    records (which the caller must be allowed to read); ``what`` and ``expected`` word the error."""
    param = search_param(other, name) if "." not in name else None
    if param is None:
        raise SearchError(
            f"{what}: {other} has no search parameter {name[:64]!r}; {expected}", "not-supported", key[:80]
        )
    _check_visible(other, key, access)
    return Link(other, _criterion(param, modifier, value, key))


HAS_FORM = "_has:Type:reference:parameter=value"


def _has_criterion(resource_type: str, key: str, value: str, access: Access) -> Criterion:
    """``_has:Type:ref:param[:modifier]=value``: the records a ``Type`` record matching ``param``
    refers to through ``ref``; one level only."""
    parts = key.split(":")
    if len(parts) not in (4, 5) or not all(parts[1:]):
        nested = len(parts) > 4 and parts[3] == "_has"
        raise SearchError(
            f"{key[:80]!r} is not a _has parameter: "
            + ("_has is supported one level deep; " if nested else "")
            + f"expected {HAS_FORM}",
            "invalid",
            key[:80],
        )
    _, source, ref_name, inner_name = parts[:4]
    inner_modifier = parts[4] if len(parts) == 5 else None
    if source not in FHIR_SERVED:
        raise SearchError(
            f"{key[:80]!r}: {source[:64]!r} is not a served resource type; expected {HAS_FORM}",
            "not-supported",
            key[:80],
        )
    ref = search_param(source, ref_name)
    if ref is None or not points_at(ref, resource_type):
        links = [i.partition(":")[2] for i in revinclude_params(resource_type) if i.startswith(source + ":")]
        raise SearchError(
            f"{key[:80]!r}: {source} has no reference parameter {ref_name[:64]!r} that may point at "
            f"{resource_type}; expected one of: {', '.join(links) or 'none'}",
            "not-supported",
            key[:80],
        )
    expected = f"chains and nested _has are not supported inside _has; expected {HAS_FORM}"
    link = _link(source, inner_name, inner_modifier, value, key, access, repr(key[:80]), expected)
    return Criterion(ref, None, [value], has=link)


def _result_param(query: SearchQuery, name: str, value: str, strict: bool) -> bool:
    """Apply one result parameter; False when it was ignored."""
    rt = query.resource_type
    if name == "_count":
        try:
            count = int(value)
        except ValueError:
            raise SearchError(f"_count must be a whole number, got {value!r}", "invalid", "_count") from None
        if count < 0:
            raise SearchError(f"_count must not be negative, got {count}", "invalid", "_count")
        query.count = min(count, MAX_COUNT)
    elif name == "_sort":
        for item in value.split(","):
            desc = item.startswith("-")
            pname = item[1:] if desc else item
            param = search_param(rt, pname)
            if pname not in sort_params(rt) or param is None:
                raise SearchError(
                    f"cannot sort {rt} by {pname!r}; sortable: {', '.join(sort_params(rt))}",
                    "not-supported",
                    "_sort",
                )
            query.sort.append(SortKey(param, desc))
    elif name == "_total":
        if value not in ("none", "estimate", "accurate"):
            raise SearchError(
                f"_total must be none, estimate or accurate, got {value!r}", "invalid", "_total"
            )
        query.total = value
    elif name == "_summary":
        if value not in SUMMARY_VALUES:
            raise SearchError(
                f"_summary must be one of {', '.join(SUMMARY_VALUES)}, got {value[:40]!r}",
                "invalid",
                "_summary",
            )
        if value == "count":
            query.count = 0
        query.summary = value
    elif name == "_elements":
        names = [n.strip().rsplit(".", 1)[-1] for n in value.split(",") if n.strip()]
        bad = [n for n in names if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]{0,63}", n)]
        if bad:
            raise SearchError(f"_elements: {bad[0][:64]!r} is not an element name", "invalid", "_elements")
        query.elements = names
    return True


def _criterion(param: SearchParam, modifier: str | None, value: str, key: str) -> Criterion:
    if modifier is not None:
        allowed = MODIFIERS[param.type]
        is_type = (
            param.type == "reference"
            and modifier in RECORD_TABLES
            and (not param.targets or modifier in param.targets)
        )
        on_column = param.column is not None and modifier != "missing"
        if on_column or (modifier not in allowed and not is_type):
            raise SearchError(
                f"modifier :{modifier} is not supported on {param.name!r}", "not-supported", key
            )
    if modifier == "missing":
        if value not in ("true", "false"):
            raise SearchError(f"{key} must be true or false, got {value!r}", "invalid", key)
        return Criterion(param, modifier, [value])
    values = [v for v in split_escaped(value, ",") if v != ""]
    for v in values:  # validate dates now, so a bad one is a 400 and not a database error
        if param.type == "date":
            date_value(v, key)
    return Criterion(param, modifier, values)


def date_value(text: str, key: str) -> tuple[str, datetime, datetime]:
    """(prefix, start, end) of one date search value; ``ap`` gets the widened range it matches."""
    head = re.match(r"[a-z]{2}", text)
    prefix = head.group(0) if head else "eq"
    raw = text[2:] if head else text
    if re.search(r" \d{2}:\d{2}$", raw):  # an unencoded '+' of the offset arrives as a space
        raw = raw[:-6] + "+" + raw[-5:]
    if head and prefix not in DATE_PREFIXES:
        raise SearchError(
            f"{key}={text[:40]!r} is not a date search value: expected an optional prefix "
            f"({', '.join(DATE_PREFIXES)}) then YYYY[-MM[-DD[Thh:mm[:ss][Z|+hh:mm]]]]",
            "invalid",
            key,
        )
    try:
        lo, hi = date_range(unescape(raw))
    except ValueError as exc:
        raise SearchError(f"{key}: {exc}", "invalid", key) from None
    if prefix == "ap":
        lo, hi = _approximately(lo, hi)
    return prefix, lo, hi


def _approximately(lo: datetime, hi: datetime) -> tuple[datetime, datetime]:
    """The range ``ap`` matches: ``[lo, hi)`` widened each way by a tenth of its distance from now,
    and by at least a day (the spec leaves the width to the server)."""
    distance = abs(datetime.now(UTC) - lo)
    margin = max(distance * APPROXIMATE_SHARE, timedelta(days=1))
    try:
        wide_lo = lo - margin
    except OverflowError:
        wide_lo = FAR_PAST
    try:
        wide_hi = hi + margin
    except OverflowError:
        wide_hi = FAR_FUTURE
    return max(wide_lo, FAR_PAST), min(wide_hi, FAR_FUTURE)


# ---------------------------------------------------------------------------- cursor
def _digest(query: SearchQuery) -> str:
    keep = [(k, v) for k, v in query.understood if k not in ("_cursor", "_count")]
    return hashlib.sha256(urlencode(keep).encode()).hexdigest()[:16]


def encode_cursor(query: SearchQuery, keys: list[Any]) -> str:
    encoded = [{"t": k.isoformat()} if isinstance(k, datetime) else k for k in keys]
    raw = orjson.dumps({"q": _digest(query), "k": encoded})
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(token: str, query: SearchQuery) -> list[Any]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        keys = [
            datetime.fromisoformat(k["t"]).astimezone(UTC) if isinstance(k, dict) else k for k in data["k"]
        ]
        digest = data["q"]
    except (ValueError, TypeError, KeyError, binascii.Error, orjson.JSONDecodeError):
        raise SearchError("_cursor is not a cursor this server issued", "invalid", "_cursor") from None
    if digest != _digest(query) or len(keys) != len(query.sort) + 1:
        raise SearchError(
            "_cursor belongs to a different search; follow the next link as given", "invalid", "_cursor"
        )
    if not all(isinstance(k, str | datetime) for k in keys):
        raise SearchError("_cursor is not a cursor this server issued", "invalid", "_cursor")
    return keys

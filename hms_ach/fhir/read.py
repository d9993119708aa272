"""The read interactions of ``/fhir``: read, vread, instance history and search.

Records are served as the JSON text the store rendered at write time (:mod:`hms_ach.store.resources`
reads them in one short read transaction); Bundles are assembled around those texts
(:mod:`hms_ach.fhir.bundles`). Every refusal is a :class:`~hms_ach.fhir.outcomes.FhirError`.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import parse_qsl, urlencode

import orjson
from fastapi import Request
from starlette.responses import Response

from hms_ach.auth.scopes import Decision
from hms_ach.core.records import FHIR_SERVED
from hms_ach.fhir.access import UNLIMITED, check_record
from hms_ach.fhir.bundles import bundle, entry, instant
from hms_ach.fhir.outcomes import FHIR_JSON, FhirError, operation_outcome
from hms_ach.fhir.subsetting import NOTHING, SUMMARY_MODES, Subset, cut_text, parse_elements
from hms_ach.store import resources, search, versions
from hms_ach.store.db import Store
from hms_ach.store.search_params import date_range, search_param

MAX_FORM_BYTES = 64 * 1024
HISTORY_DEFAULT_COUNT = 20
ID_RE = _ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PATIENT_REF = re.compile(r'"reference":\s*"(Patient/[A-Za-z0-9\-.]{1,64})"')


class Seen:
    """What a read handed out, for its access record: the references (each record, and the patients
    it refers to) and, for a search, the number of matches."""

    def __init__(self) -> None:
        self.refs: list[str] = []
        self.count: int | None = None

    def clear(self) -> None:
        """Forget what was collected (a search dropped, to be run again)."""
        self.refs.clear()
        self.count = None

    def add(self, resource_type: str, rid: str, text: str | None) -> None:
        self.refs.append(f"{resource_type}/{rid}")
        if text is not None and resource_type != "Patient" and "Patient/" in text:  # most name no patient
            self.refs.extend(_PATIENT_REF.findall(text))


def _http_date(value: datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return format_datetime(value.astimezone(UTC), usegmt=True)


def _not_modified_since(last_updated: datetime, header: str) -> bool:
    """Whether ``last_updated`` is not after the HTTP date ``header`` (compared to the second, as
    HTTP dates are); a header that is not an HTTP date is ignored (RFC 9110 13.1.3)."""
    try:
        since = parsedate_to_datetime(header.strip())
    except (TypeError, ValueError, IndexError):
        return False
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    updated = last_updated if last_updated.tzinfo else last_updated.replace(tzinfo=UTC)
    return updated.replace(microsecond=0) <= since


def fhir_response(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status_code=status, media_type=FHIR_JSON, headers=headers)


def check_served(resource_type: str) -> None:
    """404 unless ``resource_type`` is served at /fhir."""
    if resource_type not in FHIR_SERVED:
        raise FhirError(
            404,
            "not-supported",
            f"resource type {resource_type[:64]!r} is not supported here; supported: {', '.join(FHIR_SERVED)}",
        )


def _not_found(resource_type: str, rid: str) -> FhirError:
    return FhirError(404, "not-found", f"{resource_type}/{rid[:64]} is not known")


def _version_headers(found: resources.StoredVersion) -> dict[str, str]:
    return {"ETag": f'W/"{found.version}"', "Last-Modified": _http_date(found.last_updated)}


# ---------------------------------------------------------------------------- handlers
def read(
    store: Store,
    resource_type: str,
    rid: str,
    if_none_match: str | None,
    decision: Decision = UNLIMITED,
    seen: Seen | None = None,
    if_modified_since: str | None = None,
    subset: Subset = NOTHING,
) -> Response:
    """``GET T/id``; outside the ``decision``'s patient compartment the record is not known (404).
    ``If-None-Match`` (the current ETag) and ``If-Modified-Since`` (not changed since) answer 304;
    when both are sent, If-None-Match decides (RFC 9110 13.1.3)."""
    check_served(resource_type)
    if not _ID_RE.match(rid):
        raise _not_found(resource_type, rid)
    found = resources.read(store, resource_type, rid)
    if found is None:
        raise _not_found(resource_type, rid)
    check_record(decision, resource_type, rid, found.text)
    if seen is not None:
        seen.add(resource_type, rid, found.text)
    headers = _version_headers(found)
    if found.deleted:
        raise FhirError(410, "deleted", f"{resource_type}/{rid} was deleted", headers=headers)
    if if_none_match is not None:
        if if_none_match.strip() == headers["ETag"]:
            return Response(status_code=304, headers=headers)
    elif if_modified_since is not None and _not_modified_since(found.last_updated, if_modified_since):
        return Response(status_code=304, headers=headers)
    return fhir_response(cut_text(found.text, subset).encode(), headers=headers)


def read_subset(params: list[tuple[str, str]]) -> Subset:
    """The ``_summary`` and ``_elements`` of a read (400 for a value that is not one)."""
    summary: str | None = None
    elements: tuple[str, ...] | None = None
    for key, value in params:
        if key == "_summary" and value:
            if value not in SUMMARY_MODES or value == "count":
                raise FhirError(
                    400,
                    "invalid",
                    f"_summary on a read must be true, text, data or false, got {value[:40]!r}",
                    expression="_summary",
                )
            summary = value
        elif key == "_elements" and value:
            elements = parse_elements(value)
    return Subset(summary, elements)


def vread(
    store: Store,
    resource_type: str,
    rid: str,
    vid: str,
    decision: Decision = UNLIMITED,
    seen: Seen | None = None,
) -> Response:
    """``GET T/id/_history/vid``; a version outside the ``decision``'s patient compartment is not
    known (404): membership is decided by that version's own content."""
    check_served(resource_type)
    if not _ID_RE.match(rid) or not vid.isdigit() or len(vid) > 18:
        raise _not_found(resource_type, f"{rid}/_history/{vid}")
    found = resources.vread(store, resource_type, rid, int(vid))
    if found is None:
        raise _not_found(resource_type, f"{rid}/_history/{vid}")
    check_record(decision, resource_type, rid, found.text, f"{rid}/_history/{vid}")
    if seen is not None:
        seen.add(resource_type, rid, found.text)
    headers = _version_headers(found)
    if found.deleted:
        raise FhirError(410, "deleted", f"{resource_type}/{rid} version {vid} is a deletion", headers=headers)
    return fhir_response(found.text.encode(), headers=headers)


def history(
    store: Store,
    base: str,
    resource_type: str,
    rid: str,
    params: dict[str, str],
    decision: Decision = UNLIMITED,
    seen: Seen | None = None,
) -> Response:
    """``GET T/id/_history``; under a patient compartment the record's current version must be in it
    (else 404), and then every version is served."""
    check_served(resource_type)
    if not _ID_RE.match(rid):
        raise _not_found(resource_type, rid)
    if decision.patient is not None:
        current = resources.read(store, resource_type, rid)
        if current is None:
            raise _not_found(resource_type, rid)
        check_record(decision, resource_type, rid, current.text)
    if params.get("_since") or params.get("_at"):
        return history_versions(
            store,
            base,
            f"{resource_type}/{rid}/_history",
            {resource_type: decision.patient},
            rid,
            params,
            seen,
        )
    count = _history_int(params, "_count", HISTORY_DEFAULT_COUNT)
    before = _history_int(params, "_cursor", None)
    count = min(count if count is not None else HISTORY_DEFAULT_COUNT, search.MAX_COUNT)
    page = resources.history(store, resource_type, rid, count, before)
    if page is None:
        raise _not_found(resource_type, rid)
    url = f"{base}/{resource_type}/{rid}/_history"
    links = [("self", f"{url}?_count={count}" + (f"&_cursor={before}" if before is not None else ""))]
    if page.more:
        links.append(("next", f"{url}?_count={count}&_cursor={page.versions[-1].version}"))
    entries = []
    for version in page.versions:
        if decision.patient is not None and not version.deleted:
            try:
                check_record(decision, resource_type, rid, version.text)
            except FhirError:
                continue  # a version from before the record entered the compartment
        if seen is not None:
            seen.add(resource_type, rid, version.text)
        entries.append(
            _history_entry(
                base, resource_type, rid, version.version, version.deleted, version.text, version.last_updated
            )
        )
    return fhir_response(bundle("history", page.newest, links, entries))


def _history_entry(
    base: str, resource_type: str, rid: str, number: int, deleted: bool, text: str, updated: datetime
) -> bytes:
    method = "DELETE" if deleted else ("POST" if number == 1 else "PUT")
    status = "204 No Content" if deleted else ("201 Created" if number == 1 else "200 OK")
    return entry(
        f"{base}/{resource_type}/{rid}",
        None if deleted else text,
        {
            "request": {
                "method": method,
                "url": resource_type if method == "POST" else f"{resource_type}/{rid}",
            },
            "response": {"status": status, "etag": f'W/"{number}"', "lastModified": instant(updated)},
        },
    )


def _history_instant(params: dict[str, str], name: str) -> datetime | None:
    raw = params.get(name)
    if not raw:
        return None
    try:
        lo, _hi = date_range(raw.replace(" ", "+"))
    except ValueError as exc:
        raise FhirError(400, "invalid", f"{name}: {exc}", expression=name) from None
    return lo


def _history_cursor(raw: str | None) -> tuple[datetime, str, str, int] | None:
    if not raw:
        return None
    try:
        when, rtype, rid, number = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        return datetime.fromisoformat(when), str(rtype), str(rid), int(number)
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise FhirError(
            400, "invalid", "_page is not a history cursor this server issued", expression="_page"
        ) from None


def _encode_history_cursor(key: tuple[datetime, str, str, int]) -> str:
    raw = orjson.dumps([key[0].isoformat(), key[1], key[2], key[3]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def history_versions(
    store: Store,
    base: str,
    path: str,
    types: dict[str, str | None],
    rid: str | None,
    params: dict[str, str],
    seen: Seen | None = None,
) -> Response:
    """Type-level (``GET T/_history``), system-level (``GET /_history``) and, with ``_since`` or
    ``_at``, instance-level history: the versions of ``types`` (each mapped to None, or to the patient
    whose compartment limits what the caller may see of it), newest first, ``_count`` per page with a
    ``next`` link. ``_since``: changed at or after; ``_at``: the versions current at that instant."""
    count = _history_int(params, "_count", HISTORY_DEFAULT_COUNT)
    count = min(count if count is not None else HISTORY_DEFAULT_COUNT, search.MAX_COUNT)
    since, at = _history_instant(params, "_since"), _history_instant(params, "_at")
    after = _history_cursor(params.get("_page"))
    query = versions.HistoryQuery(tuple(sorted(types)), rid, since, at, count, after)
    page, nxt = versions.read_history(store, query) if types else ([], None)
    keep = [(k, params[k]) for k in ("_count", "_since", "_at") if params.get(k)]
    url = f"{base}/{path}"
    links = [("self", f"{url}?{urlencode(keep + ([('_page', params['_page'])] if after else []))}")]
    if nxt is not None:
        links.append(("next", f"{url}?{urlencode([*keep, ('_page', _encode_history_cursor(nxt))])}"))
    entries = []
    for v in page:
        patient = types.get(v.resource_type)
        if patient is not None:
            try:
                check_record(Decision(True, patient), v.resource_type, v.id, v.text)
            except FhirError:
                continue  # outside the compartment the caller's grant is limited to
        if seen is not None:
            seen.add(v.resource_type, v.id, v.text)
        entries.append(
            _history_entry(base, v.resource_type, v.id, v.version, v.deleted, v.text, v.last_updated)
        )
    return fhir_response(bundle("history", None, links, entries))


def _history_int(params: dict[str, str], name: str, default: int | None) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 18:
        raise FhirError(
            400, "invalid", f"{name} must be a non-negative whole number, got {raw[:64]!r}", expression=name
        )
    return int(raw)


def search_type(
    store: Store,
    base: str,
    resource_type: str,
    params: list[tuple[str, str]],
    strict: bool,
    access: search.Access = search.EVERYTHING,
    seen: Seen | None = None,
) -> Response:
    """``GET T`` and ``POST T/_search``: the matches and ``_include``-s the caller may see
    (``access``, applied in the SQL)."""
    check_served(resource_type)
    try:
        query = search.parse_query(resource_type, params, strict=strict, access=access)
        page = resources.search(store, query)
    except search.SearchError as exc:
        raise search_failure(exc) from exc
    url = f"{base}/{resource_type}"
    self_query = query.self_query()
    links = [("self", f"{url}?{self_query}" if self_query else url)]
    if page.next_cursor is not None:
        links.append(("next", f"{url}?{query.next_query(page.next_cursor)}"))
    if seen is not None:
        for rid, text in page.matches:
            seen.add(resource_type, rid, text)
        for rtype, rid, text in page.included:
            seen.add(rtype, rid, text)
        seen.count = page.total if page.total is not None else len(page.matches)
    subset = Subset(query.summary, tuple(query.elements) if query.elements is not None else None)
    included = Subset(query.summary)  # _elements is about the matches; _summary about every entry
    entries = [
        entry(f"{url}/{rid}", cut_text(text, subset), {"search": {"mode": "match"}})
        for rid, text in page.matches
    ]
    entries += [
        entry(f"{base}/{rtype}/{rid}", cut_text(text, included), {"search": {"mode": "include"}})
        for rtype, rid, text in page.included
    ]
    entries += _warning_entries(query.warnings, page.warnings)
    return fhir_response(bundle("searchset", page.total, links, entries))


def search_failure(exc: search.SearchError) -> FhirError:
    """The answer to a search the store refused: 403 for a link to records the token may not read
    (a chain or ``_has``), else 400."""
    status = 403 if exc.code == "forbidden" else 400
    return FhirError(status, exc.code, exc.diagnostics, expression=exc.expression)


def _warning_entries(ignored: list[str], bounded: list[str]) -> list[bytes]:
    """The ``outcome`` entry of a searchset: one warning issue for the parameters ignored, one per
    bound hit (included resources left out); none when there is nothing to say."""
    issues = []
    if ignored:
        issues += operation_outcome("not-supported", "; ".join(ignored), severity="warning")["issue"]
    for text in bounded:
        issues += operation_outcome("too-costly", text, severity="warning")["issue"]
    if not issues:
        return []
    outcome = {"resourceType": "OperationOutcome", "issue": issues}
    return [
        entry(f"urn:uuid:{uuid.uuid4()}", orjson.dumps(outcome).decode(), {"search": {"mode": "outcome"}})
    ]


async def form_params(request: Request) -> list[tuple[str, str]]:
    """The form body of ``POST _search`` (size-limited), after the query-string parameters."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise FhirError(413, "too-costly", f"the search form is larger than {MAX_FORM_BYTES} bytes")
    if not body:
        return []
    if ctype != "application/x-www-form-urlencoded":
        raise FhirError(
            415,
            "not-supported",
            f"a _search body must be application/x-www-form-urlencoded, not {ctype[:64] or 'untyped'!r}",
        )
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        raise FhirError(400, "invalid", "the search form is not UTF-8") from None
    return parse_qsl(text, keep_blank_values=True)


def _system_cursor(raw: str | None, types: list[str]) -> tuple[int, str | None]:
    if not raw:
        return 0, None
    try:
        data = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        index, inner = int(data["t"]), data["c"]
    except (ValueError, TypeError, KeyError, binascii.Error, orjson.JSONDecodeError):
        raise FhirError(
            400, "invalid", "_page is not a cursor this server issued", expression="_page"
        ) from None
    if not 0 <= index < len(types) or not (inner is None or isinstance(inner, str)):
        raise FhirError(400, "invalid", "_page belongs to a different search", expression="_page")
    return index, inner


def _encode_system_cursor(index: int, inner: str | None) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"t": index, "c": inner})).decode().rstrip("=")


def search_system(
    store: Store,
    base: str,
    types: list[str],
    params: list[tuple[str, str]],
    strict: bool,
    access: search.Access = search.EVERYTHING,
    seen: Seen | None = None,
) -> Response:
    """``GET /fhir?_type=A,B&...``: the same search on each of ``types`` in turn, one page of
    ``_count`` across them (the ``next`` link carries the type and that type's cursor, so paging
    never skips or repeats). ``Bundle.total``, as for one type, only when asked (``_total=accurate``
    or ``estimate``: the sum of the types' totals; ``_count=0``) or free (every match on the first
    page). A parameter must be
    declared by every type searched (``_id`` and ``_lastUpdated`` are)."""
    own = [(k, v) for k, v in params if k not in ("_type", "_page", "_cursor", "_count")]
    for key, _value in own:
        name = key.partition(":")[0]
        if name.startswith("_"):
            continue
        lacking = [t for t in types if search_param(t, name) is None]
        if lacking and len(lacking) < len(types):  # unknown to every type: a warning as usual
            raise FhirError(
                400,
                "not-supported",
                f"parameter {key[:64]!r} is not declared for {', '.join(lacking)}; a system search "
                "takes the parameters every type searched declares",
                expression=key[:64],
            )
    count_text = next((v for k, v in params if k == "_count" and v), None)
    try:
        count = min(int(count_text), search.MAX_COUNT) if count_text is not None else search.DEFAULT_COUNT
    except ValueError:
        raise FhirError(
            400, "invalid", f"_count must be a whole number, got {count_text!r}", expression="_count"
        ) from None
    if count < 0:
        raise FhirError(400, "invalid", "_count must not be negative", expression="_count")
    index, inner = _system_cursor(next((v for k, v in params if k == "_page"), None), types)
    matches: list[tuple[str, str, str]] = []
    included: list[tuple[str, str, str]] = []
    asked_total = next((v for k, v in params if k == "_total"), "auto")
    only_total = count == 0 or ("_summary", "count") in params  # the total is the whole answer
    counting = asked_total in ("accurate", "estimate") or (only_total and asked_total != "none")
    counted = [*own, ("_count", "0")]  # _total stays in own: estimate is bounded per type
    free = asked_total == "auto" and not only_total and index == 0 and not inner
    total: int | None = 0 if counting else None
    warnings: list[str] = []
    bounded: list[str] = []
    subset = NOTHING
    next_cursor: str | None = None
    for i, rtype in enumerate(types):
        room = count - len(matches)
        asked = [*own, ("_count", str(max(room, 0)))]
        if i == index and inner:
            asked.append(("_cursor", inner))
        try:
            query = search.parse_query(rtype, asked, strict=strict, access=access)  # checks every type
            if total is not None and counting:
                counted_page = resources.search(store, search.parse_query(rtype, counted, access=access))
                bounded += [w for w in counted_page.warnings if w not in bounded]
                total = None if counted_page.total is None else total + counted_page.total
            if i < index or next_cursor is not None:
                continue  # served on an earlier page, or left for the next one
            if room <= 0:
                next_cursor = _encode_system_cursor(i, None)
                continue
            page = resources.search(store, query)
        except search.SearchError as exc:
            exc.diagnostics = f"{rtype}: {exc.diagnostics}"
            raise search_failure(exc) from exc
        subset = Subset(query.summary, tuple(query.elements) if query.elements is not None else None)
        warnings += [w for w in query.warnings if w not in warnings]
        matches += [(rtype, rid, text) for rid, text in page.matches]
        included += page.included
        bounded += page.warnings
        if page.next_cursor is not None:
            next_cursor = _encode_system_cursor(i, page.next_cursor)
    if free and next_cursor is None:
        total = len(matches)  # no total asked, and every match is on this first page: its length, free
    served = {(rtype, rid) for rtype, rid, _ in matches}
    unique = []
    for rtype, rid, text in included:  # a record included from several types is served once
        if (rtype, rid) not in served:
            served.add((rtype, rid))
            unique.append((rtype, rid, text))
    included = unique
    keep = [(k, v) for k, v in params if k not in ("_page", "_cursor")]
    links = [("self", f"{base}?{urlencode(keep)}")]
    if next_cursor is not None and count > 0:
        links.append(("next", f"{base}?{urlencode([*keep, ('_page', next_cursor)])}"))
    if seen is not None:
        for rtype, rid, text in matches + included:
            seen.add(rtype, rid, text)
        seen.count = total if total is not None else len(matches)
    entries = [
        entry(f"{base}/{rtype}/{rid}", cut_text(text, subset), {"search": {"mode": "match"}})
        for rtype, rid, text in matches
    ]
    entries += [
        entry(
            f"{base}/{rtype}/{rid}", cut_text(text, Subset(subset.summary)), {"search": {"mode": "include"}}
        )
        for rtype, rid, text in included
    ]
    entries += _warning_entries(warnings, bounded)
    return fhir_response(bundle("searchset", total, links, entries))

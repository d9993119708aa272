"""``GET Patient/[id]/$everything`` and ``GET Encounter/[id]/$everything``.

What belongs is derived from :data:`~hms_ach.core.records.RECORD_TYPES`, never listed by hand, so a
new record type with a ``patient`` (or ``subject``) reference parameter is included as soon as it
has its row there:

* **Patient**: the patient itself, then per served type the records whose compartment parameters
  (:attr:`~hms_ach.core.records.RecordType.patient_compartment`, plus any reference parameter named
  ``patient`` or ``subject`` that may point at a Patient) point at it.
* **Encounter**: the encounter, every record one of whose reference parameters points at it, and
  the records the encounter itself refers to (its patient, practitioners, locations...).

The answer is a ``searchset`` Bundle, one type after another (in :data:`FHIR_SERVED` order) and by
id within a type; the ``next`` link carries the type and the last id served, so paging never skips
or repeats a record. ``_since`` keeps records changed at or after an instant, ``_type`` the listed
types, ``_count`` sets the page size. Only what the caller may search is served (a type outside
its scopes is left out, a ``patient/`` grant limits every type to its compartment), and every record
served is recorded as an access.
"""

from __future__ import annotations

from datetime import datetime
from urllib.parse import urlencode

from starlette.responses import Response

from hms_ach.auth.scopes import Decision
from hms_ach.core.records import FHIR_SERVED, RECORD_TYPES, THE_PATIENT_ITSELF
from hms_ach.fhir import read as reads
from hms_ach.fhir.access import check_record, not_found
from hms_ach.fhir.bundles import bundle, entry
from hms_ach.fhir.outcomes import FhirError
from hms_ach.fhir.read import _encode_system_cursor, _system_cursor
from hms_ach.store import export_queries, resources, search
from hms_ach.store.db import Store
from hms_ach.store.export_queries import Pointing, Slice
from hms_ach.store.search_params import date_range

#: The types whose ``$everything`` is served.
FOCAL_TYPES = ("Patient", "Encounter")
#: The operations' canonical definitions (declared in the CapabilityStatement).
DEFINITIONS = {
    "Patient": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
    "Encounter": "http://hl7.org/fhir/OperationDefinition/Encounter-everything",
}
_PATIENT_PARAM_NAMES = ("patient", "subject")


def patient_params(resource_type: str) -> tuple[str, ...]:
    """The reference parameters by which a ``resource_type`` record belongs to a patient's records:
    its declared compartment parameters and any reference parameter named ``patient`` or
    ``subject`` that may point at a Patient."""
    rt = RECORD_TYPES[resource_type]
    names = {p for p in rt.patient_compartment if p != THE_PATIENT_ITSELF}
    for name, decl in rt.params.items():
        targets = decl[2] if len(decl) == 3 else ()
        if decl[0] == "reference" and name in _PATIENT_PARAM_NAMES and (not targets or "Patient" in targets):
            names.add(name)
    return tuple(sorted(names))


def reference_params(resource_type: str) -> tuple[str, ...]:
    """Every reference parameter of ``resource_type``."""
    return tuple(sorted(n for n, d in RECORD_TYPES[resource_type].params.items() if d[0] == "reference"))


def patient_slices(rid: str, types: list[str], access: search.Access, since: datetime | None) -> list[Slice]:
    """The slices of ``Patient/rid``'s ``$everything``, in ``types`` order."""
    out = []
    for rtype in types:
        if rtype == "Patient":
            out.append(Slice(rtype, since, ids=(rid,), patient=access.compartment(rtype)))
            continue
        params = patient_params(rtype)
        if params:
            pointing = (Pointing(params, "Patient", (rid,)),)
            out.append(Slice(rtype, since, pointing=pointing, patient=access.compartment(rtype)))
    return out


def encounter_slices(
    rid: str,
    referenced: list[tuple[str, str]],
    types: list[str],
    access: search.Access,
    since: datetime | None,
) -> list[Slice]:
    """The slices of ``Encounter/rid``'s ``$everything`` (``referenced``: what the encounter refers
    to), in ``types`` order."""
    targets: dict[str, list[str]] = {}
    for ttype, tid in referenced:
        targets.setdefault(ttype, []).append(tid)
    out = []
    for rtype in types:
        ids = tuple(targets.get(rtype, ())) + ((rid,) if rtype == "Encounter" else ())
        params = reference_params(rtype)
        pointing = (Pointing(params, "Encounter", (rid,)),) if params else ()
        if ids or pointing:
            out.append(Slice(rtype, since, ids=ids, pointing=pointing, patient=access.compartment(rtype)))
    return out


def _since(params: list[tuple[str, str]]) -> datetime | None:
    raw = next((v for k, v in params if k == "_since" and v), None)
    if raw is None:
        return None
    try:
        lo, _hi = date_range(raw.replace(" ", "+"))
    except ValueError as exc:
        raise FhirError(400, "invalid", f"_since: {exc}; expected an instant", expression="_since") from None
    return lo


def _count(params: list[tuple[str, str]]) -> int:
    raw = next((v for k, v in params if k == "_count" and v), None)
    if raw is None:
        return search.DEFAULT_COUNT
    if not raw.isdigit() or len(raw) > 9 or int(raw) < 1:
        raise FhirError(
            400, "invalid", f"_count must be a whole number >= 1, got {raw[:40]!r}", expression="_count"
        )
    return min(int(raw), search.MAX_COUNT)


def asked_types(params: list[tuple[str, str]]) -> list[str] | None:
    """The ``_type`` list (400 for a type not served), or None when not given."""
    named = [t.strip() for k, v in params if k == "_type" for t in v.split(",") if t.strip()]
    if not named:
        return None
    for rtype in named:
        reads.check_served(rtype)
    return list(dict.fromkeys(named))


def everything(
    store: Store,
    base: str,
    focal: str,
    rid: str,
    params: list[tuple[str, str]],
    decision: Decision,
    access: search.Access,
    seen: reads.Seen,
) -> Response:
    """The ``$everything`` page of ``focal/rid`` asked by ``params``: 404 when the record is not
    known, deleted or outside the caller's compartment (``decision``); ``access`` limits every
    type. The records served are added to ``seen``."""
    if not reads.ID_RE.match(rid):
        raise not_found(focal, rid)
    found = resources.read(store, focal, rid)
    if found is None or found.deleted:
        raise not_found(focal, rid)
    check_record(decision, focal, rid, found.text)
    since, count = _since(params), _count(params)
    wanted = asked_types(params)
    types = [t for t in FHIR_SERVED if access.visible(t) and (wanted is None or t in wanted)]
    if focal == "Patient":
        slices = patient_slices(rid, types, access, since)
    else:
        with resources.reading(store) as conn:
            referenced = export_queries.references_of(conn, focal, rid)
        slices = encounter_slices(rid, referenced, types, access, since)
    # the cursor of a system search: (index of the slice, last id served there)
    raw_page = next((v for k, v in params if k == "_page"), None)
    index, after = _system_cursor(raw_page, [s.resource_type for s in slices])
    served: list[tuple[str, str, str]] = []
    next_cursor: str | None = None
    with resources.reading(store) as conn:
        for i in range(index, len(slices)):
            room = count - len(served)
            rows = export_queries.page(conn, slices[i], after if i == index else None, room + 1)
            served += [(slices[i].resource_type, r_id, text) for r_id, text in rows[:room]]
            if len(rows) > room:  # this type has more than fits: the next page resumes inside it
                next_cursor = _encode_system_cursor(i, served[-1][1])
                break
            if len(served) == count and i + 1 < len(slices):
                next_cursor = _encode_system_cursor(i + 1, None)
                break
    keep = [(k, v) for k, v in params if k in ("_since", "_type", "_count") and v]
    url = f"{base}/{focal}/{rid}/$everything"
    page_param = [("_page", v) for k, v in params if k == "_page" and v][:1]
    links = [("self", f"{url}?{urlencode(keep + page_param)}" if keep or page_param else url)]
    if next_cursor is not None:
        links.append(("next", f"{url}?{urlencode([*keep, ('_page', next_cursor)])}"))
    for rtype, r_id, text in served:
        seen.add(rtype, r_id, text)
    seen.count = len(served)
    entries = [
        entry(f"{base}/{rtype}/{r_id}", text, {"search": {"mode": "match"}}) for rtype, r_id, text in served
    ]
    return reads.fhir_response(bundle("searchset", None, links, entries))

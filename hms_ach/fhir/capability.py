"""The CapabilityStatement served at ``/fhir/metadata``, generated from the record types.

What it declares comes from the code that serves it: the served and writable types
(:data:`~hms_ach.core.records.RECORD_TYPES`), their search parameters (with the types each reference
chains to), ``_include``, ``_revinclude``, ``_has`` and ``_sort`` choices (:mod:`hms_ach.store.search`), the AuditEvent search and, when a ``fhir_rest`` channel is
configured, the write interactions and transaction/batch; ``rest.security`` (SMART on FHIR, with the
``oauth-uris`` extension in oidc mode) comes from the authenticator (:func:`security_of`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from typing import Any

from hms_ach.auth.authenticate import Authenticator
from hms_ach.auth.smart import capability_security
from hms_ach.core.records import FHIR_SERVED, RECORD_TYPES
from hms_ach.fhir import operations
from hms_ach.fhir.bundles import instant
from hms_ach.fhir.validation import WRITE_TYPES
from hms_ach.store import search
from hms_ach.store.search_params import COMMON_PARAMS, SEARCH_PARAMS

FHIR_VERSION = "4.0.1"
INTERACTIONS = ("read", "vread", "history-instance", "history-type", "search-type")
#: Served when a fhir_rest channel (hms_ach/channels/fhir_rest.py) is configured.
WRITE_INTERACTIONS = ("create", "update", "patch", "delete")
_WRITE_FLAGS: dict[str, Any] = {
    "conditionalCreate": True,
    "conditionalUpdate": True,
    "conditionalDelete": "not-supported",
}
WRITE_DOC = (
    "Writes are mapped into the canonical record (the elements a mapping does not read are not kept). "
    "Update needs the record to exist (updateCreate: false), the body's id to be the URL's (400 when "
    "it is missing or differs) and honours If-Match (412 on a mismatch); "
    "a conditional update (PUT ?identifier=system|value) creates when nothing matches, and refuses (400) "
    "a body id that is not the matched record's. If-None-Exist "
    "and conditional update accept identifier=[system|]value only. Delete stores a deleted version: "
    "reads then answer 410 and history keeps every version. PATCH takes a JSON Patch "
    "(application/json-patch+json) or a JSON Merge Patch (application/merge-patch+json; FHIRPath "
    "Patch is not supported), honours If-Match and is "
    "validated and stored like an update."
)


def _software_version() -> str:
    try:
        return importlib_metadata.version("hms-ach")
    except importlib_metadata.PackageNotFoundError:
        return "0.0.0"


#: AuditEvent search (hms_ach/fhir/audit_events.py): read-only, read and search-type.
AUDIT_PARAMS: list[dict[str, str]] = [
    {
        "name": "entity",
        "type": "reference",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-entity",
        "documentation": "The changed record, as Type/id; a bare type (Practitioner) matches every record of it",
    },
    {
        "name": "agent",
        "type": "token",
        "documentation": "Who made the change: a channel name from channels.yaml, or api / api/<client>; "
        "matched exactly or as the prefix before '/'; for an access, the caller's sub. Unlike the "
        "base AuditEvent-agent parameter this is a name, not a reference",
    },
    {
        "name": "date",
        "type": "date",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-date",
        "documentation": "The recorded instant, with the eq/ge/gt/le/lt prefixes; repeat it for a range",
    },
    {
        "name": "_lastUpdated",
        "type": "date",
        "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
        "documentation": "The recorded instant (an entry is never changed after it is recorded), with "
        "the eq/ge/gt/le/lt prefixes",
    },
    {
        "name": "patient",
        "type": "reference",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-patient",
        "documentation": "Patient/id or id: the changes of that Patient, and the accesses that returned "
        "it or a record referring to it",
    },
    {
        "name": "subtype",
        "type": "token",
        "definition": "http://hl7.org/fhir/SearchParameter/AuditEvent-subtype",
        "documentation": "create, update, delete (changes); read, vread, search-type, history (accesses)",
    },
]


def _search_param(rtype: str, p: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": p.name,
        "type": p.type,
        "documentation": f"{p.type} search on {rtype}.{p.expression}"
        + (f" (references to {', '.join(p.targets)})" if p.targets else ""),
    }
    custom = RECORD_TYPES[rtype].custom_params.get(p.name)
    if custom is not None:
        entry["definition"] = f"urn:hms-ach:fhir:SearchParameter/{rtype}-{p.name}"
        entry["documentation"] = custom
    if p.type == "reference":
        entry["documentation"] += _chain_doc(p)
    return entry


def _chain_doc(p: Any) -> str:
    """What a reference parameter chains to (``search.chain_targets``), for its documentation."""
    targets = search.chain_targets(p)
    if not targets:
        return ""
    form = (
        f"{p.name}.<parameter>"
        if len(targets) == 1
        else f"{p.name}:<Type>.<parameter> (the type is required)"
    )
    return f"; chains one level to {', '.join(targets)}: {form}"


def _search_links_doc(rtype: str) -> str:
    """The resource documentation of the reference searches of ``rtype``: ``_has`` forms and the
    ``:iterate`` bounds, from the same declarations the search parses."""
    has = [f"_has:{value}:<parameter>" for value in search.revinclude_params(rtype)]
    return (
        (f". _has (one level): {', '.join(has)}" if has else "")
        + f". _include:iterate and _revinclude:iterate take Type:param of any served type (at most "
        f"{search.MAX_INCLUDE_DEPTH} links from a match); at most {search.MAX_INCLUDED} included "
        "resources per page (then a warning OperationOutcome)"
    )


def security_of(authenticator: Authenticator | None) -> dict[str, Any] | None:
    """``rest.security`` for the engine's authenticator (``app.state.authenticator``); None when
    authentication is off or unknown."""
    if authenticator is None:
        return None
    return capability_security(authenticator.settings, authenticator.discovery())


def capability_statement(
    base: str, writes: bool = False, security: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The CapabilityStatement, generated from the record tables and search-parameter declarations.

    ``writes``: a ``fhir_rest`` channel is configured, so the write interactions of
    :mod:`hms_ach.channels.fhir_rest` are served (without one they answer 405 and are not declared).
    """
    resources = []
    for rtype in FHIR_SERVED:
        writable = writes and rtype in WRITE_TYPES
        codes = list(INTERACTIONS) + (list(WRITE_INTERACTIONS) if writable else [])
        entry: dict[str, Any] = {
            "type": rtype,
            "interaction": [{"code": code} for code in codes],
            "versioning": "versioned-update" if writable else "versioned",
            "readHistory": True,
            "updateCreate": False,
        }
        if writable:
            entry.update(_WRITE_FLAGS)
        includes = search.include_params(rtype)
        if includes:
            entry["searchInclude"] = [*includes, "*"]
        revincludes = search.revinclude_params(rtype)
        if revincludes:
            entry["searchRevInclude"] = [*revincludes, "*"]
        entry["searchParam"] = [_search_param(rtype, p) for p in SEARCH_PARAMS.get(rtype, {}).values()]
        entry["documentation"] = (
            f"_sort accepts: {', '.join(search.sort_params(rtype))}" + _search_links_doc(rtype)
        ) + (
            ". " + WRITE_DOC
            if writable
            else ". Read-only: made by hms-ach (claims at discharge, coverage from IN1)"
            if rtype not in WRITE_TYPES
            else ""
        )
        resources.append(entry)
    if writes and "Basic" in WRITE_TYPES:
        resources.append(
            {
                "type": "Basic",
                "interaction": [{"code": "create"}, {"code": "update"}],
                "versioning": "versioned-update",
                "readHistory": False,
                "updateCreate": False,
                "conditionalCreate": True,
                "conditionalUpdate": True,
                "conditionalDelete": "not-supported",
                "documentation": "Write-only: a Basic whose code is shift (urn:hms-ach:code:basic-type) is stored as a "
                "Shift record (read it through /api/v1/shifts); update takes the Shift id. A shift is "
                "cancelled with status cancelled, not deleted.",
            }
        )
    resources.append(
        {
            "type": "AuditEvent",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "documentation": "Read-only, rendered from the hash-chained audit trail (one entry per record version) "
            "and the access records; paging by _cursor, _count at most 200. Every fullUrl of a search "
            "is readable by id (audit-N, access-N). No history of single entries.",
            "searchParam": AUDIT_PARAMS,
        }
    )
    rest: dict[str, Any] = {
        "mode": "server",
        "documentation": (
            f"Search pages hold {search.DEFAULT_COUNT} entries by default and at most "
            f"{search.MAX_COUNT}; paging is by cursor. Bundle.total is given only when asked (or free: a first "
            "page holding every match carries its length): _total=accurate counts on every page, "
            f"_total=estimate counts up to {search.ESTIMATE_BOUND} and estimates past that. "
            "Prefer: handling=strict makes unknown parameters an error. Every parameter takes :missing; "
            "date parameters take the eq, ne, gt, lt, ge, le, sa, eb and ap prefixes (ap: the value's range "
            "widened by a tenth of its distance from now, at least a day); a token on a code element "
            "(gender, status...) matches system|code through the element's implicit system. Every read "
            "answers HEAD; a read honours If-None-Match and If-Modified-Since (304). Writes honour "
            "Prefer: return=minimal|representation|OperationOutcome (transactions and batches too) and "
            "Accept (406 unless JSON). _summary (true, text, data, count, false) and _elements work on "
            "searches and reads; a cut-down resource is tagged SUBSETTED. Instance, type and system "
            "history take _since, _at and _count."
        ),
        "resource": resources,
        "searchParam": [
            {"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"},
            {
                "name": "_lastUpdated",
                "type": "date",
                "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
            },
        ]
        if set(COMMON_PARAMS) == {"_id", "_lastUpdated"}
        else [],
    }
    if security is not None:
        rest["security"] = security
    per_type, system_operations = operations.declared()  # $everything, Bulk Data $export
    for item in resources:
        if item["type"] in per_type:
            item["operation"] = per_type[item["type"]]
    rest["operation"] = system_operations
    rest["interaction"] = [
        {
            "code": "search-system",
            "documentation": "GET /fhir?_type=A,B&...: the same search on each type in turn (every type "
            "the token may search when _type is absent), paged across them; a parameter must be "
            "declared by every type searched",
        },
        {
            "code": "history-system",
            "documentation": "GET /fhir/_history: the versions of every type the token may see, newest "
            "first; _since, _at, _count (paging by the next link)",
        },
    ]
    if writes:
        rest["interaction"] += [
            {
                "code": "transaction",
                "documentation": "POST /fhir with a transaction Bundle: all entries or none; "
                "urn:uuid references between entries are resolved",
            },
            {
                "code": "batch",
                "documentation": "POST /fhir with a batch Bundle: each entry succeeds or fails on its own "
                "(a malformed or invalid entry answers with its own 4xx and an OperationOutcome); GET entries "
                "(Type/id, Type?query) are answered after the writes",
            },
        ]
    return {
        "resourceType": "CapabilityStatement",
        "id": "hms-ach",
        "status": "active",
        "date": instant(datetime.now(UTC)),
        "publisher": "hms-ach",
        "kind": "instance",
        "software": {"name": "hms-ach", "version": _software_version()},
        "implementation": {"description": "hms-ach FHIR R4 API", "url": base},
        "fhirVersion": FHIR_VERSION,
        "format": ["json"],
        "rest": [rest],
    }

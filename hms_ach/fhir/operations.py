"""The routes of the FHIR operations: ``$everything`` (:mod:`hms_ach.fhir.everything`) and Bulk Data
``$export`` (:mod:`hms_ach.fhir.export`). :func:`install` adds them to the ``/fhir`` router before
the read routes, whose ``/{type}/{id}`` pattern would otherwise take ``/Patient/$export``.

Each answer, a refusal included, is recorded as an access: ``$everything`` as a ``search-type`` of
the focal type with every record served, an export kick-off and each file download as ``export``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from starlette.responses import Response

from hms_ach.fhir import access, audit_events, everything, export
from hms_ach.fhir import read as reads
from hms_ach.fhir.outcomes import FhirError
from hms_ach.store.db import Store


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/fhir"


def _everything(store: Store, request: Request, focal: str, rid: str) -> Response:
    seen = reads.Seen()
    try:
        decision = access.require(request, focal, "read")
        scope = access.search_access(access.policy_of(request))
        params = list(request.query_params.multi_items())
        answer = everything.everything(store, _base(request), focal, rid, params, decision, scope, seen)
    except FhirError as exc:
        refs = seen.refs or [f"{focal}/{rid[:64]}"]
        audit_events.record_access(request, "search-type", focal, exc.status, refs)
        raise
    audit_events.record_access(request, "search-type", focal, 200, seen.refs, seen.count)
    return answer


def _recorded(request: Request, rtype: str, work: Callable[[], Response]) -> Response:
    """Run ``work`` (a kick-off), recording it (or its refusal) as an ``export`` access."""
    try:
        answer = work()
    except FhirError as exc:
        audit_events.record_access(request, "export", rtype, exc.status)
        raise
    audit_events.record_access(request, "export", rtype, answer.status_code)
    return answer


async def _posted_kick_off(
    request: Request, store: Store, kind: str, rtype: str, group_id: str | None = None
) -> Response:
    """A POST kick-off: the body read here, then parsed and run like the GET one (both recorded)."""
    body = await request.body()
    return await run_in_threadpool(
        _recorded,
        request,
        rtype,
        lambda: export.kick_off(request, store, kind, export.post_params(request, body), group_id),
    )


def install(router: APIRouter, store: Store, negotiated: list[Any]) -> None:
    """Add the operation routes to ``router`` (the ``/fhir`` one)."""

    @router.get("/Patient/{rid}/$everything", dependencies=negotiated)
    def patient_everything(rid: str, request: Request) -> Response:
        return _everything(store, request, "Patient", rid)

    @router.get("/Encounter/{rid}/$everything", dependencies=negotiated)
    def encounter_everything(rid: str, request: Request) -> Response:
        return _everything(store, request, "Encounter", rid)

    @router.get("/$export", dependencies=negotiated)
    def system_export(request: Request) -> Response:
        return _recorded(request, "", lambda: export.kick_off(request, store, "system"))

    @router.get("/Patient/$export", dependencies=negotiated)
    def patient_export(request: Request) -> Response:
        return _recorded(request, "Patient", lambda: export.kick_off(request, store, "patient"))

    @router.post("/$export", dependencies=negotiated)
    async def system_export_post(request: Request) -> Response:
        return await _posted_kick_off(request, store, "system", "")

    @router.post("/Patient/$export", dependencies=negotiated)
    async def patient_export_post(request: Request) -> Response:
        return await _posted_kick_off(request, store, "patient", "Patient")

    @router.get("/Group/{gid}/$export", dependencies=negotiated)
    def group_export(gid: str, request: Request) -> Response:
        return _recorded(request, "Group", lambda: export.kick_off(request, store, "group", None, gid))

    @router.post("/Group/{gid}/$export", dependencies=negotiated)
    async def group_export_post(gid: str, request: Request) -> Response:
        return await _posted_kick_off(request, store, "group", "Group", gid)

    @router.get("/$export-status/{export_id}")
    async def export_status(export_id: str, request: Request) -> Response:
        return await run_in_threadpool(export.status, request, store, export_id)

    @router.delete("/$export-status/{export_id}")
    async def export_cancel(export_id: str, request: Request) -> Response:
        return await run_in_threadpool(export.cancel, request, store, export_id)

    @router.get("/$export-file/{export_id}/{name}")
    async def export_file(export_id: str, name: str, request: Request) -> Response:
        try:
            return await run_in_threadpool(export.download, request, store, export_id, name)
        except FhirError as exc:  # a refused download is recorded too (the success is, with its count)
            audit_events.record_access(request, "export", "", exc.status)
            raise


def declared() -> tuple[dict[str, list[dict[str, str]]], list[dict[str, str]]]:
    """The operations the CapabilityStatement declares: per resource type, and system-wide (each
    with its canonical OperationDefinition)."""
    per_type: dict[str, list[dict[str, str]]] = {
        focal: [{"name": "everything", "definition": url}] for focal, url in everything.DEFINITIONS.items()
    }
    per_type["Patient"].append({"name": "export", "definition": export.DEFINITIONS["patient"]})
    per_type["Group"] = [{"name": "export", "definition": export.DEFINITIONS["group"]}]
    return per_type, [{"name": "export", "definition": export.DEFINITIONS["system"]}]

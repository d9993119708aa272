"""The copies of the search and read routes put in front of every other /fhir route
(``hms_ach.fhir.routes._busiest_first``) choose, for every path and method, the endpoint and path
parameters the routes in their declared order chose without them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from starlette.routing import Match

from hms_ach.app.access_log import route_template
from hms_ach.fhir.routes import _FhirType, fhir_router

PATHS = [
    "/fhir",
    "/fhir/",
    "/fhir/metadata",
    "/fhir/_history",
    "/fhir/$export",
    "/fhir/$export-status/abc",
    "/fhir/$export-file/abc/Patient.ndjson",
    "/fhir/AuditEvent",
    "/fhir/AuditEvent/42",
    "/fhir/AuditEventX",
    "/fhir/AuditEventX/1",
    "/fhir/Patient",
    "/fhir/Patient/",
    "/fhir/Patient/p-1.2",
    "/fhir/Patient/$export",
    "/fhir/Patient/_history",
    "/fhir/Patient/_search",
    "/fhir/Patient/p1/_history",
    "/fhir/Patient/p1/_history/2",
    "/fhir/Patient/p1/$everything",
    "/fhir/Encounter/e1/$everything",
    "/fhir/Group/g1/$export",
    "/fhir/Practitioner",
    "/fhir/Practitioner/" + "x" * 64,
    "/fhir/Practitioner/" + "x" * 65,
    "/fhir/Practitioner/bad$id",
    "/fhir/Practitioner/has%20space",
    "/fhir/Foo",
    "/fhir/Foo/1",
    "/fhir/patient",
    "/fhir/patient/1",
    "/fhir/P",
    "/fhir/Patient/1/extra/segments",
]
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _choice(routes: list[Any], path: str, method: str) -> tuple[Any, Any, dict[str, Any]]:
    """(match kind, endpoint, path params) of the route Starlette's order picks: the first full
    match, else the first partial one (a 405)."""
    scope = {"type": "http", "path": path, "root_path": "", "method": method, "headers": []}
    partial = None
    for route in routes:
        match, child = route.matches(scope)
        endpoint = getattr(route.endpoint, "declared", route.endpoint)  # a copy: what it calls
        if match == Match.FULL:
            return match, endpoint, child.get("path_params", {})
        if match == Match.PARTIAL and partial is None:
            partial = (match, endpoint, child.get("path_params", {}))
    return partial or (Match.NONE, None, {})


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_busiest_routes_first_change_no_choice(dialect: str) -> None:
    router = fhir_router(SimpleNamespace(dialect=dialect, bounded_reads=dialect == "sqlite"))  # type: ignore[arg-type]
    routes: list[Any] = list(router.routes)
    copies = [r for r in routes if isinstance(r.param_convertors.get("resource_type"), _FhirType)]
    assert len(copies) == 2 and router.routes[:2] == copies
    declared = [r for r in router.routes if r not in copies]
    for path in PATHS:
        for method in METHODS:
            chosen = _choice(router.routes, path, method)
            before = _choice(declared, path, method)
            if chosen[0] == Match.PARTIAL:  # a 405: the same verdict (which route's Allow differs)
                assert before[0] == Match.PARTIAL, (path, method)
                continue
            assert chosen == before, (path, method)
    # the search and read are answered by the copies, logged under the plain template
    assert _choice(router.routes, "/fhir/Practitioner", "GET")[1] is copies[0].endpoint.declared
    assert _choice(router.routes[:1], "/fhir/Practitioner", "GET")[0] == Match.FULL
    logged = [route_template({"route": r}) for r in copies]
    assert logged == ["/fhir/{resource_type}", "/fhir/{resource_type}/{rid}"]
    assert not any(r.include_in_schema for r in copies)

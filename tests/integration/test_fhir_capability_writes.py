"""Capability self-test of the write side (issue 15, item 6): driven by ``GET /fhir/metadata`` alone,
every declared write interaction (create, update, patch, delete, and the conditional forms the
resource entry declares) and every declared operation is exercised once per type that declares it,
on scratch resources, and must answer as declared; a conditional form declared ``not-supported`` must
be refused. The read side (search parameters, includes, reads, history) is the conformance crawl's
(tests/integration/test_fhir_conformance.py).

The test fails when the CapabilityStatement declares something it has no exercise for (a new type,
interaction or operation), so a declaration cannot outgrow what is checked. SQLite always,
PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import httpx

from hms_ach.app.runtime import Engine
from tests.integration.engine_helpers import FHIR_JSON, basic_shift, nurse
from tests.integration.test_fhir_bulk_export import ASYNC, read_files, wait_done
from tests.integration.test_fhir_everything import create

SCRATCH = "urn:test:scratch"
AMB = {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}
JSON_PATCH = {"content-type": "application/json-patch+json"}
#: Per type: an element the writes change (one the write mapping keeps; an update that changes nothing
#: makes no new version) and three values, for the update, the conditional update and the patch.
CHANGES: dict[str, tuple[str, tuple[Any, Any, Any]]] = {
    "Patient": ("/gender", ("male", "other", "unknown")),
    "Practitioner": ("/gender", ("male", "other", "unknown")),
    "Organization": ("/name", ("Scratch Clinic 2", "Scratch Clinic 3", "Scratch Clinic 4")),
    "Location": ("/name", ("Scratch Ward 2", "Scratch Ward 3", "Scratch Ward 4")),
    "Encounter": ("/status", ("in-progress", "finished", "cancelled")),
    "PractitionerRole": ("/active", (False, True, False)),
    "Basic": ("/extension/1/valueCode", ("confirmed", "swapped", "cancelled")),
    "Task": ("/status", ("accepted", "in-progress", "on-hold")),
    "Questionnaire": ("/status", ("retired", "active", "retired")),
    "QuestionnaireResponse": ("/status", ("amended", "completed", "amended")),
    "Group": ("/name", ("Scratch cohort 2", "Scratch cohort 3", "Scratch cohort 4")),
    "Communication": ("/status", ("in-progress", "completed", "stopped")),
}


def changed(rtype: str, body: dict[str, Any], step: int) -> dict[str, Any]:
    """``body`` with its ``CHANGES`` element set to the value of ``step`` (0 update, 1 conditional
    update, 2 patch)."""
    assert rtype in CHANGES, f"{rtype} declares writes but this test has no change for it: add one"
    path, values = CHANGES[rtype]
    out = copy.deepcopy(body)
    *parents, last = path.strip("/").split("/")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = values[step]
    return out


@dataclass
class World:
    """The engine's client, the records scratch bodies refer to, and what was exercised."""

    http: httpx.AsyncClient
    patient: str = ""
    practitioner: str = ""
    counter: int = 0
    exercised: set[tuple[str, str]] = field(default_factory=set)

    def number(self) -> str:
        self.counter += 1
        return f"S{self.counter}"


def scratch(world: World, rtype: str) -> dict[str, Any]:
    """A new, valid body of ``rtype`` with an identifier of its own (``SCRATCH`` system, or the staff
    and shift systems the Practitioner and Basic mappings key on)."""
    n = world.number()
    ident = [{"system": SCRATCH, "value": n}]
    bodies: dict[str, Callable[[], dict[str, Any]]] = {
        "Patient": lambda: {"resourceType": "Patient", "identifier": ident, "gender": "female"},
        "Practitioner": lambda: nurse(n),
        "Organization": lambda: {
            "resourceType": "Organization",
            "identifier": ident,
            "name": "Scratch Clinic",
        },
        "Location": lambda: {"resourceType": "Location", "identifier": ident, "name": "Scratch Ward"},
        "Encounter": lambda: {
            "resourceType": "Encounter",
            "identifier": ident,
            "status": "finished",
            "class": AMB,
            "subject": {"reference": f"Patient/{world.patient}"},
        },
        "PractitionerRole": lambda: {
            "resourceType": "PractitionerRole",
            "identifier": ident,
            "active": True,
            "practitioner": {"reference": f"Practitioner/{world.practitioner}"},
        },
        "Basic": lambda: basic_shift(n, world.practitioner, *shift_day(world.counter)),
        "Task": lambda: {
            "resourceType": "Task",
            "identifier": ident,
            "status": "requested",
            "intent": "order",
        },
        "Questionnaire": lambda: {"resourceType": "Questionnaire", "identifier": ident, "status": "active"},
        "QuestionnaireResponse": lambda: {  # identifier is 0..1 here
            "resourceType": "QuestionnaireResponse",
            "identifier": ident[0],
            "status": "completed",
        },
        "Communication": lambda: {
            "resourceType": "Communication",
            "identifier": ident,
            "status": "completed",
            "payload": [{"contentString": "Scratch comment"}],
        },
        "Group": lambda: {
            "resourceType": "Group",
            "identifier": ident,
            "type": "person",
            "actual": True,
            "name": "Scratch cohort",
            "member": [{"entity": {"reference": f"Patient/{world.patient}"}}],
        },
    }
    assert rtype in bodies, f"{rtype} declares writes but this test has no scratch body for it: add one"
    return bodies[rtype]()


def shift_day(n: int) -> tuple[str, str]:
    """Start and end of a shift on a day of its own (shifts of one employee may not overlap)."""
    day = date(2026, 12, 1) + timedelta(days=n)
    return f"{day.isoformat()}T07:00:00Z", f"{day.isoformat()}T15:00:00Z"


def identifier_query(body: dict[str, Any]) -> str:
    ident = body["identifier"] if isinstance(body["identifier"], dict) else body["identifier"][0]
    return f"identifier={ident['system']}|{ident['value']}"


def is_outcome(resp: httpx.Response, status: int | range, what: str) -> None:
    ok = resp.status_code == status if isinstance(status, int) else resp.status_code in status
    assert ok, f"{what}: {resp.status_code}, expected {status}: {resp.text[:300]}"
    assert resp.json()["resourceType"] == "OperationOutcome", f"{what}: not an OperationOutcome"


def version(resp: httpx.Response, what: str, status: int = 200) -> int:
    assert resp.status_code == status, f"{what}: {resp.status_code}, expected {status}: {resp.text[:300]}"
    return int(resp.json()["meta"]["versionId"])


# ---------------------------------------------------------------------------- per type
async def exercise_type(world: World, entry: dict[str, Any]) -> None:
    """Every write interaction of one resource entry, in an order that keeps the scratch alive until
    its delete: create (conditional), update (If-Match, conditional), patch (If-Match), the instance
    operations, conditional delete, delete."""
    http, rtype = world.http, entry["type"]
    codes = {i["code"] for i in entry.get("interaction") or []}
    readable = "read" in codes
    if not codes & {"create", "update", "patch", "delete"} and not entry.get("operation"):
        return  # read-only: the conformance crawl's
    body = scratch(world, rtype)
    rid = ""
    if "create" in codes:
        resp = await http.post(f"/{rtype}", json=body, headers=FHIR_JSON)
        assert version(resp, f"create {rtype}", 201) == 1
        rid = resp.json()["id"]
        assert resp.headers["location"].split("/_history/")[0].endswith(f"/{rtype}/{rid}"), resp.headers
        world.exercised.add((rtype, "create"))
    if entry.get("conditionalCreate") is True:
        again = await http.post(
            f"/{rtype}", json=body, headers={**FHIR_JSON, "if-none-exist": identifier_query(body)}
        )
        assert again.status_code == 200 and again.json()["id"] == rid, (
            f"conditional create {rtype}: {again.text}"
        )
        world.exercised.add((rtype, "conditionalCreate"))
    current = 1
    if "update" in codes:
        new = {**changed(rtype, body, 0), "id": rid}
        stale = await http.put(f"/{rtype}/{rid}", json=new, headers={**FHIR_JSON, "if-match": 'W/"99"'})
        is_outcome(stale, 412, f"update {rtype} with a stale If-Match")
        resp = await http.put(
            f"/{rtype}/{rid}", json=new, headers={**FHIR_JSON, "if-match": f'W/"{current}"'}
        )
        current = version(resp, f"update {rtype}")
        assert current == 2
        world.exercised.add((rtype, "update"))
    if entry.get("conditionalUpdate") is True:
        new = changed(rtype, body, 1)
        resp = await http.put(f"/{rtype}?{identifier_query(body)}", json=new, headers=FHIR_JSON)
        assert version(resp, f"conditional update {rtype} (a match)") == current + 1
        assert resp.json()["id"] == rid
        current += 1
        other = scratch(world, rtype)
        made = await http.put(f"/{rtype}?{identifier_query(other)}", json=other, headers=FHIR_JSON)
        assert version(made, f"conditional update {rtype} (no match)", 201) == 1
        assert made.json()["id"] != rid
        world.exercised.add((rtype, "conditionalUpdate"))
    if "patch" in codes:
        path, values = CHANGES[rtype]
        value = values[2]
        assert "/" not in path[1:], f"{rtype}: the patch checks a top-level element"
        ops = [{"op": "replace", "path": path, "value": value}]
        stale = await http.patch(f"/{rtype}/{rid}", json=ops, headers={**JSON_PATCH, "if-match": 'W/"1"'})
        is_outcome(stale, 412, f"patch {rtype} with a stale If-Match")
        resp = await http.patch(
            f"/{rtype}/{rid}", json=ops, headers={**JSON_PATCH, "if-match": f'W/"{current}"'}
        )
        assert version(resp, f"patch {rtype}") == current + 1
        assert resp.json()[path[1:]] == value, f"patch {rtype}: {resp.text[:300]}"
        current += 1
        world.exercised.add((rtype, "patch"))
    if readable and rid:
        read = await http.get(f"/{rtype}/{rid}")
        assert version(read, f"read {rtype} after the writes") == current
    for operation in entry.get("operation") or []:
        await INSTANCE_OPERATIONS[operation["name"]](world, rtype, rid)
        world.exercised.add((rtype, f"${operation['name']}"))
    if entry.get("conditionalDelete") == "not-supported" and rid:
        refused = await http.delete(f"/{rtype}?{identifier_query(body)}")
        is_outcome(refused, range(400, 500), f"conditional delete of {rtype} (declared not-supported)")
        assert (await http.get(f"/{rtype}/{rid}")).status_code == 200 if readable else True
        world.exercised.add((rtype, "conditionalDelete"))
    if "delete" in codes:
        gone = await http.delete(f"/{rtype}/{rid}")
        assert gone.status_code in (200, 204), f"delete {rtype}: {gone.status_code} {gone.text[:300]}"
        is_outcome(await http.get(f"/{rtype}/{rid}"), 410, f"read of a deleted {rtype}")
        world.exercised.add((rtype, "delete"))


# ---------------------------------------------------------------------------- operations
async def everything(world: World, rtype: str, rid: str) -> None:
    resp = await world.http.get(f"/{rtype}/{rid}/$everything")
    assert resp.status_code == 200, f"{rtype}/$everything: {resp.text[:300]}"
    bundle = resp.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert f"{rtype}/{rid}" in {
        f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]
    }


async def export(world: World, rtype: str, rid: str) -> None:
    """A kick-off at the level the entry declares it (system when ``rtype`` is empty; a Group's on
    the scratch Group, whose member is the world's patient), run to its manifest, every line read
    back through fhir.resources."""
    path = f"/{rtype}/$export" if rtype else "/$export"
    if rtype == "Group":
        path = f"/Group/{rid}/$export"
    resp = await world.http.get(path, headers=ASYNC)
    assert resp.status_code == 202, f"{path}: {resp.text[:300]}"
    done = await wait_done(world.http, resp.headers["content-location"])
    assert done.status_code == 200, f"{path}: {done.text[:300]}"
    files = await read_files(world.http, done.json())
    assert files.get("Patient"), f"{path}: no Patient exported"


INSTANCE_OPERATIONS: dict[str, Callable[[World, str, str], Awaitable[None]]] = {
    "everything": everything,
    "export": export,
}


# ---------------------------------------------------------------------------- system level
async def bundle_of(world: World, kind: str) -> None:
    body = scratch(world, "Patient")
    request = {"method": "POST", "url": "Patient"}
    bundle = {"resourceType": "Bundle", "type": kind, "entry": [{"resource": body, "request": request}]}
    resp = await world.http.post("", json=bundle, headers=FHIR_JSON)
    assert resp.status_code == 200, f"{kind}: {resp.text[:300]}"
    answer = resp.json()
    assert answer["type"] == f"{kind}-response"
    assert answer["entry"][0]["response"]["status"].startswith("201"), answer


SYSTEM_WRITES: dict[str, Callable[[World, str], Awaitable[None]]] = {
    "transaction": bundle_of,
    "batch": bundle_of,
}


async def test_every_declared_write_and_operation_answers_as_declared(
    fhir_engine: Engine, http: httpx.AsyncClient
) -> None:
    world = World(http)
    world.patient = await create(
        http, {"resourceType": "Patient", "identifier": [{"system": SCRATCH, "value": "P0"}]}
    )
    world.practitioner = await create(http, nurse("N0"))
    statement = (await http.get("/metadata")).json()
    rest = statement["rest"][0]
    declared: set[tuple[str, str]] = set()
    for entry in rest["resource"]:
        rtype = entry["type"]
        codes = {i["code"] for i in entry.get("interaction") or []}
        declared |= {(rtype, c) for c in codes & {"create", "update", "patch", "delete"}}
        declared |= {
            (rtype, flag) for flag in ("conditionalCreate", "conditionalUpdate") if entry.get(flag) is True
        }
        if entry.get("conditionalDelete") == "not-supported":
            declared.add((rtype, "conditionalDelete"))
        declared |= {(rtype, f"${o['name']}") for o in entry.get("operation") or []}
        unknown = [o["name"] for o in entry.get("operation") or [] if o["name"] not in INSTANCE_OPERATIONS]
        assert not unknown, f"{rtype} declares operations this test does not exercise: {unknown}"
        await exercise_type(world, entry)
    for operation in rest.get("operation") or []:
        assert operation["name"] in INSTANCE_OPERATIONS, f"system operation {operation['name']} not exercised"
        await INSTANCE_OPERATIONS[operation["name"]](world, "", "")
        declared.add(("system", f"${operation['name']}"))
        world.exercised.add(("system", f"${operation['name']}"))
    for interaction in rest.get("interaction") or []:
        code = interaction["code"]
        if code in SYSTEM_WRITES:
            await SYSTEM_WRITES[code](world, code)
            declared.add(("system", code))
            world.exercised.add(("system", code))
    assert declared == world.exercised, f"declared, not exercised: {sorted(declared - world.exercised)}"
    # the ones this engine declares today, so a silently shrunk statement fails too
    assert {
        ("Patient", "patch"),
        ("Basic", "create"),
        ("Patient", "$everything"),
        ("Encounter", "$everything"),
    } <= declared
    assert {
        ("Patient", "$export"),
        ("Group", "$export"),
        ("system", "$export"),
        ("system", "transaction"),
        ("system", "batch"),
    } <= declared
    assert len(declared) >= 40, sorted(declared)

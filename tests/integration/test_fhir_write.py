"""The fhir_rest channel against a running engine (uvicorn on a loopback port): create, update,
conditional create/update, delete, transaction and batch Bundles, optimistic locking and every kind
of bad input. SQLite always, PostgreSQL when HMS_ACH_TEST_POSTGRES_URL is set."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from hms_ach.store.db import Store
from hms_ach.store.models import RECORD_TABLES, InboundMessage
from tests.integration.engine_helpers import FHIR_JSON, READ_INTERACTIONS, ROOT, STAFF, basic_shift, nurse

Practitioner = RECORD_TABLES["Practitioner"]

NPI = "http://hl7.org/fhir/sid/us-npi"


def count(store: Store, model: Any) -> int:
    with store.reader.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(model)).scalar_one())


def assert_outcome(resp: httpx.Response, status: int, expression: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    assert body["resourceType"] == "OperationOutcome", body
    if expression:
        assert any(expression in e for e in body["issue"][0].get("expression", [])), body
    return body


async def test_create_read_update_delete(http: httpx.AsyncClient, store: Store) -> None:
    resp = await http.post("/Practitioner", json=nurse(), headers=FHIR_JSON)
    assert resp.status_code == 201, resp.text
    created = resp.json()
    rid = created["id"]
    assert resp.headers["etag"] == 'W/"1"'
    assert resp.headers["location"].endswith(f"/Practitioner/{rid}/_history/1")
    assert (await http.get(f"/Practitioner/{rid}")).json()["name"][0]["family"] == "Osei"

    # a plain create of the same identifier is a conflict, not a second record
    assert_outcome(await http.post("/Practitioner", json=nurse(), headers=FHIR_JSON), 409)

    # update with the right version, then a stale If-Match gets 412
    changed = nurse(family="Osei-Mensah", id=rid)
    resp = await http.put(f"/Practitioner/{rid}", json=changed, headers={**FHIR_JSON, "If-Match": 'W/"1"'})
    assert resp.status_code == 200, resp.text
    assert resp.headers["etag"] == 'W/"2"'
    assert_outcome(
        await http.put(f"/Practitioner/{rid}", json=changed, headers={**FHIR_JSON, "If-Match": 'W/"1"'}), 412
    )
    # the same content again makes no new version
    resp = await http.put(f"/Practitioner/{rid}", json=changed, headers=FHIR_JSON)
    assert resp.headers["etag"] == 'W/"2"'

    # conditional update by identifier
    resp = await http.put(
        f"/Practitioner?identifier={STAFF}|E2001", json=nurse(family="Mensah"), headers=FHIR_JSON
    )
    assert resp.status_code == 200 and resp.json()["id"] == rid
    # ... which creates when nothing matches
    resp = await http.put(f"/Practitioner?identifier={STAFF}|E2002", json=nurse("E2002"), headers=FHIR_JSON)
    assert resp.status_code == 201

    # delete: a tombstone version; read says 410, history keeps every version
    assert (await http.delete(f"/Practitioner/{rid}", headers={"If-Match": 'W/"1"'})).status_code == 412
    assert (await http.delete(f"/Practitioner/{rid}")).status_code == 204
    assert_outcome(await http.get(f"/Practitioner/{rid}"), 410)
    history = (await http.get(f"/Practitioner/{rid}/_history")).json()
    assert history["total"] == 4
    assert history["entry"][0]["request"]["method"] == "DELETE"
    search = (await http.get("/Practitioner", params={"identifier": f"{STAFF}|E2001"})).json()
    assert search["total"] == 0

    # every accepted write is in the message store with its raw body
    with store.reader.connect() as conn:
        rows = conn.execute(
            select(  # type: ignore[call-overload]  # sqlmodel types these attributes as values, not columns
                InboundMessage.content_type, InboundMessage.channel, InboundMessage.status, InboundMessage.raw
            ).order_by(InboundMessage.id)
        ).all()
    assert rows[0].content_type == "fhir+json" and rows[0].channel == "fhir_in"
    assert json.loads(rows[0].raw)["name"][0]["family"] == "Osei"
    assert {r.status for r in rows} >= {"processed", "error"}


async def test_twenty_parallel_conditional_creates_make_one_record(
    http: httpx.AsyncClient, store: Store
) -> None:
    body = nurse("E3001", identifier=[{"system": NPI, "value": "1356702989"}])
    headers = {**FHIR_JSON, "If-None-Exist": f"identifier={NPI}|1356702989"}
    responses = await asyncio.gather(
        *(http.post("/Practitioner", json=body, headers=headers) for _ in range(20))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 19 + [201], [r.text for r in responses if r.status_code not in (200, 201)]
    assert len({r.json()["id"] for r in responses}) == 1
    assert count(store, Practitioner) == 1


async def test_conditional_create_on_a_non_key_identifier(http: httpx.AsyncClient) -> None:
    body = nurse(
        "E3002", identifier=[{"system": NPI, "value": "1245319599"}, {"system": STAFF, "value": "E3002"}]
    )
    headers = {**FHIR_JSON, "If-None-Exist": f"identifier={STAFF}|E3002"}
    first = await http.post("/Practitioner", json=body, headers=headers)
    second = await http.post("/Practitioner", json=body, headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]


def onboarding_bundle() -> dict[str, Any]:
    bundle: dict[str, Any] = json.loads((ROOT / "samples" / "fhir" / "onboard_nurse_bundle.json").read_text())
    return bundle


async def test_sample_transaction_bundle_then_find_the_nurse(http: httpx.AsyncClient) -> None:
    resp = await http.post("", json=onboarding_bundle(), headers=FHIR_JSON)
    assert resp.status_code == 200, resp.text
    result = resp.json()
    assert result["type"] == "transaction-response"
    assert all(e["response"]["status"] in ("201 Created", "200 OK") for e in result["entry"])
    found = (await http.get("/Practitioner", params={"identifier": f"{STAFF}|E2001"})).json()
    assert found["total"] == 1
    nurse_res = found["entry"][0]["resource"]
    assert len(nurse_res["qualification"]) == 2
    roles = (
        await http.get("/PractitionerRole", params={"practitioner": f"Practitioner/{nurse_res['id']}"})
    ).json()
    assert roles["total"] == 1
    role = roles["entry"][0]["resource"]
    assert role["organization"]["reference"].startswith("Organization/")
    assert not role["organization"]["reference"].startswith("Organization/urn")
    # posting the same bundle again changes nothing and makes no duplicates
    again = await http.post("", json=onboarding_bundle(), headers=FHIR_JSON)
    assert again.status_code == 200, again.text
    assert (await http.get("/Practitioner", params={"identifier": f"{STAFF}|E2001"})).json()["total"] == 1
    # the custom search parameter finds her by the validity of her licences
    by_period = (await http.get("/Practitioner", params={"qualification-period": "gt2027-06-01"})).json()
    assert by_period["total"] == 1
    meta = (await http.get("/metadata")).json()
    prac = next(r for r in meta["rest"][0]["resource"] if r["type"] == "Practitioner")
    assert "qualification-period" in {p["name"] for p in prac["searchParam"]}


async def test_transaction_is_all_or_nothing(http: httpx.AsyncClient, store: Store) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:a1",
                "resource": nurse("E4001"),
                "request": {"method": "POST", "url": "Practitioner"},
            },
            {
                "fullUrl": "urn:uuid:a2",
                "resource": {
                    "resourceType": "PractitionerRole",
                    "identifier": [{"system": "urn:r", "value": "R1"}],
                    "practitioner": {"reference": "urn:uuid:a1"},
                    "organization": {"reference": "Organization/does-not-exist"},
                },
                "request": {"method": "POST", "url": "PractitionerRole"},
            },
        ],
    }
    assert_outcome(await http.post("", json=bundle, headers=FHIR_JSON), 422, "organization")
    assert count(store, Practitioner) == 0
    # the refused request is still in the message store, with its reason
    with store.reader.connect() as conn:
        row = conn.execute(select(InboundMessage.status, InboundMessage.error)).first()  # type: ignore[call-overload]
    assert row is not None
    assert row.status == "error" and "does-not-exist" in row.error


async def test_batch_applies_each_entry_on_its_own(http: httpx.AsyncClient, store: Store) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"resource": nurse("E5001"), "request": {"method": "POST", "url": "Practitioner"}},
            {"resource": nurse("E5001"), "request": {"method": "POST", "url": "Practitioner"}},
        ],
    }
    resp = await http.post("", json=bundle, headers=FHIR_JSON)
    assert resp.status_code == 200, resp.text
    statuses = [e["response"]["status"] for e in resp.json()["entry"]]
    assert statuses == ["201 Created", "409"]
    assert resp.json()["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert count(store, Practitioner) == 1


@pytest.mark.parametrize(
    ("case", "status", "expression"),
    [
        ("broken_reference", 400, "practitioner"),
        ("duplicate_full_url", 400, "fullUrl"),
        ("unknown_type_in_bundle", 404, None),
        ("bad_gender", 422, "Practitioner.gender"),
        ("bad_encounter_status", 422, "Encounter.status"),
        ("missing_encounter_class", 400, "Encounter.class"),
        ("not_a_bundle", 400, None),
    ],
)
async def test_bad_bundles_give_an_outcome_and_change_nothing(
    http: httpx.AsyncClient,
    store: Store,
    case: str,
    status: int,
    expression: str | None,
) -> None:
    role = {"resourceType": "PractitionerRole", "practitioner": {"reference": "urn:uuid:missing"}}
    entries: dict[str, list[dict[str, Any]]] = {
        "broken_reference": [
            {
                "fullUrl": "urn:uuid:r1",
                "resource": role,
                "request": {"method": "POST", "url": "PractitionerRole"},
            }
        ],
        "duplicate_full_url": [
            {
                "fullUrl": "urn:uuid:x",
                "resource": nurse("E1"),
                "request": {"method": "POST", "url": "Practitioner"},
            },
            {
                "fullUrl": "urn:uuid:x",
                "resource": nurse("E2"),
                "request": {"method": "POST", "url": "Practitioner"},
            },
        ],
        "unknown_type_in_bundle": [
            {"resource": {"resourceType": "Spaceship"}, "request": {"method": "POST", "url": "Spaceship"}}
        ],
        "bad_gender": [
            {"resource": nurse(gender="robot"), "request": {"method": "POST", "url": "Practitioner"}}
        ],
        "bad_encounter_status": [
            {
                "resource": {"resourceType": "Encounter", "status": "bogus", "class": {"code": "IMP"}},
                "request": {"method": "POST", "url": "Encounter"},
            }
        ],
        "missing_encounter_class": [
            {
                "resource": {"resourceType": "Encounter", "status": "planned"},
                "request": {"method": "POST", "url": "Encounter"},
            }
        ],
        "not_a_bundle": [],
    }
    body: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [nurse_entry("E9"), *entries[case]],
    }
    if case == "not_a_bundle":
        body = nurse()
    assert_outcome(await http.post("", json=body, headers=FHIR_JSON), status, expression)
    assert count(store, Practitioner) == 0


def nurse_entry(number: str) -> dict[str, Any]:
    return {
        "fullUrl": f"urn:uuid:{number}",
        "resource": nurse(number),
        "request": {"method": "POST", "url": "Practitioner"},
    }


async def test_bad_requests(http: httpx.AsyncClient, store: Store) -> None:
    xml = "<Practitioner xmlns='http://hl7.org/fhir'/>"
    assert_outcome(
        await http.post("/Practitioner", content=xml, headers={"content-type": "application/fhir+xml"}), 415
    )
    big = nurse(
        text={
            "status": "generated",
            "div": "<div xmlns='http://www.w3.org/1999/xhtml'>" + "x" * 70000 + "</div>",
        }
    )
    assert_outcome(await http.post("/Practitioner", json=big, headers=FHIR_JSON), 413)
    assert_outcome(await http.post("/Practitioner", content=b"{not json", headers=FHIR_JSON), 400)
    assert_outcome(await http.post("/Spaceship", json={"resourceType": "Spaceship"}, headers=FHIR_JSON), 404)
    assert_outcome(await http.post("/Patient", json=nurse(), headers=FHIR_JSON), 400)
    assert_outcome(await http.put("/Practitioner/nope", json=nurse(id="nope"), headers=FHIR_JSON), 404)
    assert_outcome(
        await http.post("/Patient", json={"resourceType": "Patient", "gender": "robot"}, headers=FHIR_JSON),
        422,
        "Patient.gender",
    )
    assert_outcome(
        await http.post("/Practitioner", json=nurse(), headers={**FHIR_JSON, "If-None-Exist": "name=x"}), 400
    )
    assert count(store, Practitioner) == 0


# ---------------------------------------------------------------------------- the CapabilityStatement
async def test_capability_statement_declares_what_the_server_does(http: httpx.AsyncClient) -> None:
    """Every write interaction and flag the metadata declares is tried here, and answers as declared."""
    from fhir.resources.R4B.capabilitystatement import CapabilityStatement

    from hms_ach.core.records import FHIR_SERVED, FHIR_WRITABLE

    resp = await http.get("/metadata")
    assert resp.status_code == 200
    cs = CapabilityStatement.model_validate(resp.json())
    assert cs.rest
    rest = cs.rest[0]
    assert {i.code for i in rest.interaction or []} == {
        "transaction",
        "batch",
        "history-system",
        "search-system",
    }
    resources = {r.type: r for r in rest.resource or []}
    assert set(resources) == {*FHIR_SERVED, "Basic", "AuditEvent"}
    for rtype in sorted(set(FHIR_SERVED) - set(FHIR_WRITABLE)):  # served, never written through /fhir
        assert {i.code for i in resources[rtype].interaction or []} == READ_INTERACTIONS
        assert resources[rtype].conditionalCreate is None and resources[rtype].versioning == "versioned"
    for rtype in FHIR_WRITABLE:
        res = resources[rtype]
        assert {i.code for i in res.interaction or []} == {
            *READ_INTERACTIONS,
            "create",
            "update",
            "patch",
            "delete",
        }, rtype
        assert (res.conditionalCreate, res.conditionalUpdate, res.updateCreate) == (True, True, False)
        assert res.conditionalDelete == "not-supported" and res.versioning == "versioned-update"
    assert {i.code for i in resources["Basic"].interaction or []} == {"create", "update"}
    audit_res = resources["AuditEvent"]
    assert [i.code for i in audit_res.interaction or []] == ["read", "search-type"]
    assert {(p.name, p.type) for p in audit_res.searchParam or []} == {
        ("entity", "reference"),
        ("agent", "token"),
        ("date", "date"),
        ("_lastUpdated", "date"),
        ("patient", "reference"),
        ("subtype", "token"),
    }
    qual = next(p for p in resources["Practitioner"].searchParam or [] if p.name == "qualification-period")
    assert qual.type == "date" and qual.definition and "qualification.period" in (qual.documentation or "")

    # create, then conditional create (If-None-Exist) finds it instead of making a second
    licence = [{"code": {"text": "RN licence"}, "period": {"start": "2024-01-01", "end": "2026-12-31"}}]
    created = await http.post("/Practitioner", json=nurse("E3001", qualification=licence), headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    again = await http.post(
        "/Practitioner",
        json=nurse("E3001"),
        headers={**FHIR_JSON, "If-None-Exist": f"identifier={STAFF}|E3001"},
    )
    assert again.status_code == 200 and again.json()["id"] == rid
    # update (versioned-update: a stale If-Match is refused) ...
    upd = await http.put(
        f"/Practitioner/{rid}",
        json=nurse("E3001", family="Boateng", id=rid, qualification=licence),
        headers={**FHIR_JSON, "If-Match": 'W/"1"'},
    )
    assert upd.status_code == 200 and upd.headers["etag"] == 'W/"2"'
    assert_outcome(
        await http.put(
            f"/Practitioner/{rid}", json=nurse("E3001", id=rid), headers={**FHIR_JSON, "If-Match": 'W/"1"'}
        ),
        412,
    )
    # ... which never creates (updateCreate false), while a conditional update does
    assert_outcome(
        await http.put("/Practitioner/no-such-id", json=nurse("E3002", id="no-such-id"), headers=FHIR_JSON),
        404,
    )
    cond = await http.put(f"/Practitioner?identifier={STAFF}|E3002", json=nurse("E3002"), headers=FHIR_JSON)
    assert cond.status_code == 201
    # the custom qualification-period parameter
    found = (await http.get("/Practitioner", params={"qualification-period": "gt2026-06-30"})).json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [rid]
    none = (await http.get("/Practitioner", params={"qualification-period": "gt2027-01-01"})).json()
    assert not none.get("entry")
    # delete; conditional delete is not supported
    assert (await http.delete(f"/Practitioner/{cond.json()['id']}")).status_code == 204
    assert (await http.get(f"/Practitioner/{cond.json()['id']}")).status_code == 410
    assert (await http.delete(f"/Practitioner?identifier={STAFF}|E3001")).status_code in (404, 405)
    assert (await http.get(f"/Practitioner/{rid}")).status_code == 200
    # system-level transaction and batch
    for kind in ("transaction", "batch"):
        bundle = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [
                {"resource": nurse(f"E31{kind[:2]}"), "request": {"method": "POST", "url": "Practitioner"}}
            ],
        }
        out = await http.post("", json=bundle, headers=FHIR_JSON)
        assert out.status_code == 200 and out.json()["type"] == f"{kind}-response", out.text
    # Basic (a shift): create and update by the shift's id
    shift = basic_shift("CS-1", rid)
    made = await http.post("/Basic", json=shift, headers=FHIR_JSON)
    assert made.status_code == 201, made.text
    shift_id = made.json()["id"]
    shift["extension"][1]["valueCode"] = "confirmed"
    changed = await http.put(f"/Basic/{shift_id}", json={**shift, "id": shift_id}, headers=FHIR_JSON)
    assert changed.status_code == 200, changed.text
    # answered as the Basic it was sent as, never as the canonical Shift record
    basic = changed.json()
    assert basic["resourceType"] == "Basic" and basic["id"] == shift_id
    assert {"url": "urn:hms-ach:fhir:StructureDefinition/shift-status", "valueCode": "confirmed"} in basic[
        "extension"
    ]
    assert (await http.get(f"/Basic/{shift_id}")).status_code in (400, 404)  # write-only, as declared
    # AuditEvent: search with its declared parameters; others are ignored, or refused when strict
    events = (
        await http.get(
            "/AuditEvent",
            params=[("entity", f"Practitioner/{rid}"), ("agent", "fhir_in"), ("date", "ge2020-01-01")],
        )
    ).json()
    assert len(events["entry"]) == 2  # the create and the update
    strict = {"prefer": "handling=strict"}
    assert_outcome(await http.get("/AuditEvent", params={"outcome": "x"}, headers=strict), 400)

"""Findings, policies, the escalation queue and signatures of review cases (issue 18), on SQLite and
PostgreSQL.

A reviewer answers the clinical-review form without signing: the ``signature-required`` policy
fails, the case escalates into the supervisor's queue and a signed ``case.escalated`` webhook
reaches a loopback receiver. The reviewer signs: the case resolves and the signature verifies. The
findings rewritten over FHIR afterwards: the signature no longer holds. fhirpy reads the findings
and finds their Provenance by target.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B.provenance import Provenance as R4BProvenance
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse as R4BResponse
from fhirpy import AsyncFHIRClient
from joserfc.jwk import ECKey

from hms_ach.store.db import Store
from tests.integration.engine_helpers import FHIR_JSON, auth_headers
from tests.integration.outbound_helpers import Receiver, wait_for
from tests.integration.test_review_cases import _engine, add_reviewer

pytestmark = pytest.mark.timeout(240)

#: The shipped findings form (mappings/workflows/forms/clinical-review-findings.json), published at start.
FORM_ID = "clinical-review-findings"
OUTCOME = {"system": "urn:hms-ach:code:review-outcome", "code": "appropriate"}


def _answers(score: Any = 7, attest: bool = True) -> dict[str, Any]:
    value = {"valueInteger": score} if isinstance(score, int) else {"valueString": score}
    return {
        "resourceType": "QuestionnaireResponse",
        "status": "completed",
        "item": [
            {"linkId": "outcome", "answer": [{"valueCoding": OUTCOME}]},
            {"linkId": "score", "answer": [value]},
            {"linkId": "physician-attestation", "answer": [{"valueBoolean": attest}]},
        ],
    }


async def test_unsigned_findings_escalate_and_signed_ones_resolve(tmp_path: Path, store: Store) -> None:
    receiver = Receiver()
    engine = await _engine(tmp_path, store, await receiver.start())
    try:
        base = f"http://127.0.0.1:{engine.http_port}"
        admin = auth_headers(engine)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            now = datetime.now(UTC)
            pid = await add_reviewer(
                http, admin, "F1", now.date() + timedelta(days=365), now - timedelta(hours=1)
            )
            form_id = FORM_ID
            patient = {"resourceType": "Patient", "identifier": [{"system": "urn:test:mrn", "value": "F1"}]}
            r = await http.post("/fhir/Patient", json=patient, headers={**admin, **FHIR_JSON})
            assert r.status_code == 201, r.text
            focus = (
                f"Patient/{r.json()['id']}"  # a stored focus: the findings' subject, written back over FHIR
            )
            supervisor = auth_headers(engine, roles=("supervisor",))
            body = {"case_type": "clinical-review", "case_id": "REV-F1", "focus": focus}
            r = await http.post("/api/v1/review/cases", json=body, headers=supervisor)
            assert r.status_code == 201 and r.json()["assignee"] == pid, r.text
            case = r.json()["id"]
            reviewer = auth_headers(engine, roles=("reviewer",), employee_id=pid)
            stranger = auth_headers(engine, roles=("reviewer",), employee_id="someone-else")

            # a wrong answer type: 422 naming the linkId, nothing stored
            r = await http.post(f"/api/v1/review/{case}/findings", json=_answers("seven"), headers=reviewer)
            assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
            assert [e["location"] for e in r.json()["errors"]] == ["item[linkId=score]"]
            # not a valid R4 QuestionnaireResponse: 422 naming the element
            r = await http.post(
                f"/api/v1/review/{case}/findings", json={**_answers(), "status": "finished"}, headers=reviewer
            )
            assert r.status_code == 422, r.text
            assert "status" in r.json()["errors"][0]["location"], r.text
            # only the case's reviewer (or a supervisor) submits
            r = await http.post(f"/api/v1/review/{case}/findings", json=_answers(), headers=stranger)
            assert r.status_code == 403, r.text

            # unsigned findings: signature-required fails, the case escalates
            r = await http.post(f"/api/v1/review/{case}/findings", json=_answers(), headers=reviewer)
            assert r.status_code == 201, r.text
            out = r.json()
            assert out["state"] == "escalated" and out["moved_through"] == [
                "escalated"
            ]  # triage -> escalated
            assert [v["policy"] for v in out["violations"]] == ["signature-required"]
            assert out["counts"] == {"error": 1, "warning": 0, "information": 0}
            findings = out["findings"]
            qr = (await http.get(f"/fhir/{findings}", headers=admin)).json()
            assert qr["questionnaire"] == f"Questionnaire/{form_id}"
            assert qr["author"] == {"reference": f"Practitioner/{pid}"}
            assert qr["subject"] == {"reference": focus}
            task = (await http.get(f"/fhir/Task/{case}", headers=admin)).json()
            assert task["output"][-1]["valueReference"] == {"reference": findings}

            # in the supervisor's queue (an auditor may read it; a reviewer may not)
            r = await http.get("/api/v1/review/queue", headers=supervisor)
            assert r.status_code == 200, r.text
            (item,) = r.json()["items"]
            assert item["id"] == case and item["state"] == "escalated"
            assert [v["policy"] for v in item["violations"]] == ["signature-required"]
            assert "signature-required" in item["reason"]
            assert (await http.get("/api/v1/review/queue", headers=reviewer)).status_code == 403
            auditor = auth_headers(engine, roles=("auditor",))
            assert (await http.get("/api/v1/review/queue", headers=auditor)).status_code == 200

            # signed: the policies pass, the case resolves, the signature verifies
            r = await http.post(f"/api/v1/review/{case}/sign", headers=reviewer)
            assert r.status_code == 200, r.text
            signed = r.json()
            assert signed["state"] == "resolved" and signed["violations"] == []
            r = await http.get(f"/api/v1/review/{case}/signatures", headers=reviewer)
            (check,) = r.json()["items"]
            assert check["valid"] is True, check
            assert check["signer"] == f"Practitioner/{pid}"
            assert check["provenance"] == signed["provenance"]
            assert (await http.get("/api/v1/review/queue", headers=supervisor)).json()["items"] == []

            # a closed case takes no more findings
            r = await http.post(f"/api/v1/review/{case}/findings", json=_answers(), headers=reviewer)
            assert r.status_code == 409, r.text

            # over FHIR: fhirpy reads the findings and finds their signature by target
            client = AsyncFHIRClient(
                f"{base}/fhir",
                authorization=admin["authorization"],
                extra_headers={"Accept": "application/fhir+json"},
            )
            qid = findings.split("/")[1]
            response = await client.reference("QuestionnaireResponse", qid).to_resource()
            R4BResponse.model_validate(response.serialize())  # type: ignore[no-untyped-call]
            exts = {e["url"]: e["valueReference"]["reference"] for e in response["extension"]}
            assert exts["urn:hms-ach:fhir:StructureDefinition/case"] == f"Task/{case}"
            assert exts["urn:hms-ach:fhir:StructureDefinition/signature"] == signed["provenance"]
            provs = await client.resources("Provenance").search(target=findings).fetch()
            assert [f"Provenance/{p['id']}" for p in provs] == [signed["provenance"]]
            R4BProvenance.model_validate(provs[0].serialize())  # type: ignore[no-untyped-call]

            # the findings rewritten over FHIR: the signature no longer holds
            served: dict[str, Any] = response.serialize()  # type: ignore[no-untyped-call]
            tampered = {k: v for k, v in served.items() if k != "meta"}
            tampered["item"][1]["answer"] = [{"valueInteger": 2}]
            r = await http.put(f"/fhir/{findings}", json=tampered, headers={**admin, **FHIR_JSON})
            assert r.status_code == 200, r.text
            r = await http.get(f"/api/v1/review/{case}/signatures", headers=supervisor)
            (check,) = r.json()["items"]
            assert check["valid"] is False and "changed after they were signed" in check["reason"]

        await wait_for(lambda: "case.resolved" in receiver.names(), timeout=60)
        assert receiver.bad_signatures == 0
        names = receiver.names()
        assert names.index("case.findings_submitted") < names.index("case.escalated")
        escalated = receiver.events[names.index("case.escalated")]["data"]
        assert escalated["resource"] == f"Task/{case}"
        assert escalated["reason"] == "policy signature-required (error)"
        submitted = receiver.events[names.index("case.findings_submitted")]["data"]
        assert submitted["violations"] == {"error": 1, "warning": 0, "information": 0}
        assert receiver.events[names.index("case.signed")]["data"]["signer"] == f"Practitioner/{pid}"
    finally:
        await engine.stop()
        await receiver.stop()


async def test_findings_signed_at_once_resolve_with_a_warning_and_an_out_of_range_score_is_refused(
    tmp_path: Path, store: Store
) -> None:
    receiver = Receiver()
    engine = await _engine(tmp_path, store, await receiver.start())
    try:
        admin = auth_headers(engine)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{engine.http_port}", timeout=30) as http:
            body = {"case_type": "clinical-review", "case_id": "REV-F2", "focus": "Encounter/e2"}
            supervisor = auth_headers(engine, roles=("supervisor",), employee_id="sup-1")
            r = await http.post("/api/v1/review/cases", json=body, headers=supervisor)
            assert r.status_code == 201 and r.json()["assignee"] is None, r.text  # queued: no reviewer
            case = r.json()["id"]
            # the supervisor's own key is registered: the signature is theirs, not on their behalf
            own = ECKey.generate_key("P-256", private=True)
            folder = engine.config.data_dir / "signer_keys"
            folder.mkdir(mode=0o700)
            (folder / "sup-1.pem").write_bytes(own.as_pem(private=True))
            (folder / "sup-1.pem").chmod(0o600)
            # a score outside the form's 0..10: refused by the form, nothing stored
            r = await http.post(
                f"/api/v1/review/{case}/findings",
                params={"sign": "true"},
                json=_answers(11),
                headers=supervisor,
            )
            assert r.status_code == 422 and [e["location"] for e in r.json()["errors"]] == [
                "item[linkId=score]"
            ]
            r = await http.post(
                f"/api/v1/review/{case}/findings",
                params={"sign": "true"},
                json=_answers(7, attest=False),
                headers=supervisor,
            )
            assert r.status_code == 201, r.text
            out = r.json()
            # signed at once: only the attestation warning, so the case resolves
            assert out["state"] == "resolved" and out["provenance"] is not None
            assert {(v["policy"], v["severity"]) for v in out["violations"]} == {("attestation", "warning")}
            r = await http.get(f"/api/v1/review/{case}/signatures", headers=supervisor)
            assert [(c["valid"], c["kid"]) for c in r.json()["items"]] == [(True, own.thumbprint())]
            prov = (await http.get(f"/fhir/{out['provenance']}", headers=admin)).json()
            assert prov["signature"][0]["who"] == {"reference": "Practitioner/sup-1"}
            assert "onBehalfOf" not in prov["signature"][0] and len(prov["agent"]) == 1
            # signing without findings, and an unknown case
            other = {**body, "case_id": "REV-F3"}
            r = await http.post("/api/v1/review/cases", json=other, headers=supervisor)
            r = await http.post(f"/api/v1/review/{r.json()['id']}/sign", headers=supervisor)
            assert r.status_code == 409 and "no findings" in r.json()["detail"]
            r = await http.post("/api/v1/review/nope/findings", json=_answers(), headers=supervisor)
            assert r.status_code == 404
    finally:
        await engine.stop()
        await receiver.stop()

"""ChargeItem end to end: an ADT opens the visit, a DFT^P03 posts two charges over MLLP, and
``/fhir/ChargeItem`` serves them (valid R4, searchable by encounter, patient, code and entered-date).

The record type is one RECORD_TYPES row, its search parameters and its mapping YAML
(mappings/resources/chargeitem_ft1.yaml); nothing in fhir/ names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from fhir.resources.R4B.chargeitem import ChargeItem as R4BChargeItem

from hms_ach.app.http import create_app
from hms_ach.store.db import Store
from hms_ach.store.search_params import SEARCH_PARAMS
from tests.integration.engine_helpers import auth_headers, local_authenticator, mllp_channel
from tests.integration.outbound_helpers import make_engine, send_mllp

CPT = "http://www.ama-assn.org/go/cpt"


def _entries(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    assert bundle["resourceType"] == "Bundle", bundle
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") != "include"]


async def test_dft_p03_charges_are_served_as_charge_items(tmp_path: Path, store: Store) -> None:
    engine = make_engine(tmp_path, store.url, "  []\n")
    await engine.start()
    try:
        codes = await send_mllp(mllp_channel(engine).port, ["adt_a01.hl7", "dft_p03.hl7"])
        assert codes == ["AA", "AA"]
    finally:
        await engine.stop()

    auth = local_authenticator(tmp_path / "data")
    transport = httpx.ASGITransport(app=create_app(store, authenticator=auth))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost/fhir", headers=auth_headers(auth)
    ) as http:

        async def search(**params: str) -> list[dict[str, Any]]:
            r = await http.get("/ChargeItem", params=params)
            assert r.status_code == 200, r.text
            return _entries(r.json())

        (encounter,) = _entries((await http.get("/Encounter")).json())
        enc_ref = f"Encounter/{encounter['id']}"
        pat_ref = encounter["subject"]["reference"]

        items = await search(encounter=enc_ref)
        assert sorted(i["identifier"][0]["value"] for i in items) == ["T880001", "T880002"]
        for item in items:
            R4BChargeItem.model_validate(item)  # a valid R4 ChargeItem
            assert item["status"] == "billable"
            assert item["subject"]["reference"] == pat_ref
            assert item["context"]["reference"] == enc_ref
            assert item["performer"][0]["actor"]["reference"].startswith("Practitioner/")
        by_code = {i["code"]["coding"][0]["code"]: i for i in items}
        assert by_code["99223"]["priceOverride"] == {"value": 350.0, "currency": "USD"}
        assert by_code["71046"]["priceOverride"] == {"value": 125.0, "currency": "USD"}
        assert by_code["99223"]["occurrenceDateTime"] == "2026-11-26T09:30:00-05:00"
        ids = {i["id"] for i in items}

        # the R4 name of the visit parameter, and the other parameters the issue asks for
        assert {i["id"] for i in await search(context=enc_ref)} == ids
        assert {i["id"] for i in await search(patient=pat_ref)} == ids
        assert [i["id"] for i in await search(code=f"{CPT}|99223")] == [by_code["99223"]["id"]]
        assert [i["id"] for i in await search(code="71046")] == [by_code["71046"]["id"]]
        assert {i["id"] for i in await search(**{"entered-date": "2026-11-27"})} == ids
        assert await search(**{"entered-date": "lt2026-11-27"}) == []
        assert {i["id"] for i in await search(occurrence="2026-11-26")} == ids
        assert await search(encounter="Encounter/not-a-visit") == []

        read = await http.get(f"/ChargeItem/{by_code['99223']['id']}")
        assert read.status_code == 200 and read.json()["code"]["coding"][0]["system"] == CPT
        assert (await http.post("/ChargeItem", json={"resourceType": "ChargeItem"})).status_code in (404, 405)

        declared = {r["type"]: r for r in (await http.get("/metadata")).json()["rest"][0]["resource"]}
        charge_item = declared["ChargeItem"]
        assert {i["code"] for i in charge_item["interaction"]} == {
            "read",
            "vread",
            "history-instance",
            "history-type",
            "search-type",
        }
        params = {p["name"] for p in charge_item["searchParam"]}
        assert {"patient", "encounter", "context", "code", "entered-date"} <= params
        assert params == set(SEARCH_PARAMS["ChargeItem"])
        assert "Charge" not in declared  # the 837's canonical Charge stays unserved

"""``hms-ach reindex``: a search parameter declared after records were stored finds them once the
index is rebuilt; deleted records keep no index rows; reindexing is idempotent."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from hms_ach.app.cli import app
from hms_ach.core.records import RECORD_TYPES, MappingResult, RecordWrite
from hms_ach.store import search
from hms_ach.store.db import Store
from hms_ach.store.models import INDEX_TABLES, RECORD_TABLES
from hms_ach.store.reindex import UnknownRecordTypeError, reindex
from hms_ach.store.repository import Repository
from hms_ach.store.search_params import SEARCH_PARAMS, SearchParam

MRN = "urn:hms-ach:id:GENHOSP"
CITIES = {"100001": "Dublin", "100002": "Columbus", "100003": "Dublin", "100004": "Dublin"}


def _patient(mrn: str, city: str) -> RecordWrite:
    content: dict[str, Any] = {
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": f"Family{mrn}"}],
        "address": [{"city": city}],
    }
    return RecordWrite(mrn, "Patient", MRN, mrn, content)


@pytest.fixture
def ids(store: Store) -> dict[str, str]:
    """Four patients (100004 deleted afterwards, its index rows left as they were)."""
    with store.writer.begin() as conn:
        outcomes = Repository(conn).apply(MappingResult(records=[_patient(m, c) for m, c in CITIES.items()]))
    found = {mrn: o.id for mrn, o in zip(CITIES, outcomes, strict=True)}
    table = RECORD_TABLES["Patient"].__table__  # type: ignore[attr-defined]
    with store.writer.begin() as conn:
        conn.execute(update(table).where(table.c.id == found["100004"]).values(deleted=True))
    return found


def _find(store: Store, rtype: str, name: str, value: str) -> set[str]:
    with store.reader.connect() as conn:
        page = search.execute(conn, search.parse_query(rtype, [(name, value)]))
    return {rid for rid, _ in page.matches}


def _rows(store: Store, resource_id: str | None = None) -> int:
    total = 0
    with store.reader.connect() as conn:
        for model in INDEX_TABLES.values():
            t = model.__table__  # type: ignore[attr-defined]
            stmt = select(func.count()).select_from(t)
            if resource_id is not None:
                stmt = stmt.where(t.c.resource_id == resource_id)
            total += int(conn.execute(stmt).scalar_one())
    return total


def _declare_city(monkeypatch: pytest.MonkeyPatch) -> None:
    """Declare Patient ``address-city`` at runtime, as a new RECORD_TYPES parameter would be."""
    monkeypatch.setitem(RECORD_TYPES["Patient"].params, "address-city", ("string", "address.city"))
    monkeypatch.setitem(
        SEARCH_PARAMS["Patient"], "address-city", SearchParam("address-city", "string", ("address.city",))
    )


def test_a_new_parameter_finds_the_records_stored_before_it(
    store: Store, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _declare_city(monkeypatch)
    assert _find(store, "Patient", "address-city", "Dublin") == set()  # declared, but nothing indexed yet
    assert _rows(store, ids["100004"]) > 0  # deleted without its index rows being cleared

    (count,) = reindex(store, ["Patient"], batch_size=2)

    assert (count.resource_type, count.records, count.cleared) == ("Patient", 3, 1)
    assert count.batches == 3  # 2 + 2 records, then an empty batch ends the type
    assert _find(store, "Patient", "address-city", "Dublin") == {ids["100001"], ids["100003"]}
    assert _find(store, "Patient", "address-city", "columbus") == {ids["100002"]}
    assert _find(store, "Patient", "family", "Family100001") == {ids["100001"]}  # the old ones still work
    assert _rows(store, ids["100004"]) == 0


def test_reindexing_every_type_is_idempotent(store: Store, ids: dict[str, str]) -> None:
    before = _rows(store, ids["100001"])
    seen: list[str] = []
    counts = reindex(store, progress=lambda c: seen.append(c.resource_type))
    assert [c.resource_type for c in counts] == seen == list(RECORD_TYPES)
    patient = next(c for c in counts if c.resource_type == "Patient")
    assert (patient.records, patient.cleared) == (3, 1)
    assert all(c.records == 0 for c in counts if c.resource_type != "Patient")
    assert _rows(store, ids["100001"]) == before
    total = _rows(store)
    reindex(store)
    assert _rows(store) == total


def test_an_unknown_type_is_refused_before_anything_is_written(store: Store) -> None:
    with pytest.raises(UnknownRecordTypeError, match="Spaceship: not a record type"):
        reindex(store, ["Patient", "Spaceship"])


def test_the_cli_command_prints_counts_per_type(
    store: Store, ids: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _declare_city(monkeypatch)
    result = CliRunner().invoke(app, ["reindex", "--database", store.url, "--type", "Patient"])
    assert result.exit_code == 0, result.output
    assert "Patient" in result.output and "3 record(s) reindexed, 1 deleted" in result.output
    assert "reindexed 3 record(s) of 1 type(s)" in result.output
    assert _find(store, "Patient", "address-city", "Dublin") == {ids["100001"], ids["100003"]}

    refused = CliRunner().invoke(app, ["reindex", "--database", store.url, "--type", "Nope"])
    assert refused.exit_code == 2 and "Nope: not a record type" in refused.output

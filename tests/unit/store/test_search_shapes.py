"""A search's SQL is built once per shape and run with each search's own values: searches of one
shape with other values find their own matches (never the first search's), and the shape's SQL is
built only the first time."""

from __future__ import annotations

from typing import Any

import pytest

from hms_ach.core.records import MappingResult, RecordWrite
from hms_ach.store import search, search_sql
from hms_ach.store.db import Store
from hms_ach.store.repository import Repository

MRN = "urn:hms-ach:id:GENHOSP"
PEOPLE = [  # mrn, family, birth date, gender
    ("200001", "Okafor", "1961-03-03", "male"),
    ("200002", "Okada", "1975-11-20", "female"),
    ("200003", "Brennan", "1961-07-14", "female"),
    ("200004", "Lindqvist", "1990-01-01", "male"),
]


def _patient(mrn: str, family: str, born: str, gender: str) -> RecordWrite:
    content: dict[str, Any] = {
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": family}],
        "birthDate": born,
        "gender": gender,
    }
    return RecordWrite(mrn, "Patient", MRN, mrn, content)


@pytest.fixture
def ids(store: Store) -> dict[str, str]:
    with store.writer.begin() as conn:
        outcomes = Repository(conn).apply(MappingResult(records=[_patient(*p) for p in PEOPLE]))
    return {p[0]: o.id for p, o in zip(PEOPLE, outcomes, strict=True)}


def _found(store: Store, params: list[tuple[str, str]]) -> set[str]:
    with store.reader.connect() as conn:
        page = search.execute(conn, search.parse_query("Patient", [*params, ("_total", "accurate")]))
    assert page.total == len(page.matches)
    return {rid for rid, _ in page.matches}


# each case: searches of ONE shape (same parameters, modifiers and value forms), other values
CASES = [
    ("token system|code", [[("identifier", f"{MRN}|{m}")] for m in ("200001", "200003", "999999")]),
    ("token code", [[("identifier", m)] for m in ("200002", "200004")]),
    ("token on a column", [[("_id", "200001")], [("_id", "200003,200004")], [("_id", "200002")]]),
    ("string prefix", [[("family", v)] for v in ("Oka", "Bren", "Lind", "Zz")]),
    ("string exact", [[("family:exact", v)] for v in ("Okafor", "Okada", "okada")]),
    ("string contains", [[("family:contains", v)] for v in ("ka", "nna", "qvi")]),
    ("date eq", [[("birthdate", v)] for v in ("1961", "1961-03", "1990-01-01")]),
    ("date ge", [[("birthdate", f"ge{v}")] for v in ("1970", "1990-01-02")]),
    (
        "token and date",
        [[("gender", g), ("birthdate", f"lt{d}")] for g, d in (("male", "1970"), ("female", "1980"))],
    ),
]


def _expected(ids: dict[str, str], params: list[tuple[str, str]]) -> set[str]:
    def matches(person: tuple[str, str, str, str]) -> bool:
        mrn, family, born, gender = person
        for name, value in params:
            if name == "identifier" and value.split("|")[-1] != mrn:
                return False
            if name == "_id" and mrn not in value.split(","):
                return False
            if name == "family" and not family.lower().startswith(value.lower()):
                return False
            if name == "family:exact" and family != value:
                return False
            if name == "family:contains" and value.lower() not in family.lower():
                return False
            if name == "gender" and gender != value:
                return False
            if name == "birthdate":
                prefix, day = (value[:2], value[2:]) if value[:2] in ("ge", "lt") else ("eq", value)
                ok = {"eq": born.startswith(day), "ge": born >= day, "lt": born < day}[prefix]
                if not ok:
                    return False
        return True

    return {ids[p[0]] for p in PEOPLE if matches(p)}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_searches_of_one_shape_find_their_own_matches(store: Store, ids: dict[str, str], case: Any) -> None:
    _, searches = case
    before = len(search_sql._shapes)
    for params in [*searches, *reversed(searches)]:  # again in reverse: no value leaks into a later search
        assert _found(store, _request(ids, params)) == _expected(ids, params), params
    assert len(search_sql._shapes) - before <= 1  # one shape, built once (the cache may start again)


def _request(ids: dict[str, str], params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request of a case: ``_id`` lists MRNs, sent as the records' ids."""
    return [(n, ",".join(ids[m] for m in v.split(",")) if n == "_id" else v) for n, v in params]

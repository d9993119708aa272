"""Domain errors of the store become HTTP statuses and OperationOutcomes in fhir/outcomes.py only."""

from __future__ import annotations

import pytest

from hms_ach.fhir.outcomes import http_error
from hms_ach.store.errors import (
    AlreadyExists,
    Conflict,
    DomainError,
    Gone,
    Invalid,
    MultipleMatches,
    NotFound,
    RuleViolation,
    UniqueViolation,
    VersionConflict,
)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Invalid("bad criterion"), 400, "invalid"),
        (Invalid("no such entry", code="not-found"), 400, "not-found"),
        (NotFound("Patient/1"), 404, "not-found"),
        (Conflict("Patient/1 already has the identifier s|v"), 409, "duplicate"),
        (AlreadyExists("Patient/1", "s|v"), 409, "duplicate"),
        (UniqueViolation("UniqueViolation"), 409, "conflict"),
        (Gone("Patient/1 was deleted"), 410, "deleted"),
        (VersionConflict("Patient/1", 1, 2), 412, "conflict"),
        (MultipleMatches("Patient", 2), 412, "multiple-matches"),
        (RuleViolation("overlap"), 422, "business-rule"),
        (RuleViolation("not there", code="not-found", expression="Encounter.subject"), 422, "not-found"),
    ],
)
def test_each_domain_error_has_one_status(error: DomainError, status: int, code: str) -> None:
    answer = http_error(error)
    assert (answer.status, answer.code, answer.diagnostics) == (status, code, error.message)
    assert answer.expression == error.expression


def test_the_messages_say_what_and_where() -> None:
    assert str(NotFound("Patient/1")) == "Patient/1 is not known"
    assert str(AlreadyExists("Patient/1", "s|v")) == "Patient/1 already has the identifier s|v"
    assert str(VersionConflict("Patient/1", 1, 2)) == "Patient/1 is at version 2, not 1"
    assert str(UniqueViolation("IntegrityError")) == "a unique constraint refused the write (IntegrityError)"

"""hms_ach/auth/errors.py (named apart from a future tests/unit/core/test_errors.py: test basenames must be unique): RFC 6750
challenges: status, WWW-Authenticate and the OperationOutcome issue code of each error."""

from __future__ import annotations

import pytest

from hms_ach.auth import AuthError, challenge
from hms_ach.auth.errors import fhir_issue_code, insufficient_scope, invalid_request, invalid_token
from hms_ach.auth.keys import KeysUnavailableError


@pytest.mark.parametrize(
    ("error", "status", "issue"),
    [
        (AuthError(None, "no token"), 401, "login"),
        (invalid_request("two tokens"), 400, "invalid"),
        (invalid_token("expired"), 401, "security"),
        (insufficient_scope("no write scope", "user/Patient.u"), 403, "forbidden"),
        (KeysUnavailableError("provider down"), 503, "exception"),
    ],
)
def test_status_and_issue_code(error: AuthError, status: int, issue: str) -> None:
    assert challenge(error)[0] == error.status == status
    assert fhir_issue_code(error) == issue


def test_insufficient_scope_names_the_scope_needed() -> None:
    _, headers = challenge(insufficient_scope("reading Patient needs a read scope", "user/Patient.r"))
    assert headers == {
        "WWW-Authenticate": 'Bearer realm="hms-ach", error="insufficient_scope", '
        'error_description="reading Patient needs a read scope", scope="user/Patient.r"'
    }


def test_descriptions_cannot_break_out_of_the_quoted_string() -> None:
    _, headers = challenge(invalid_token('bad "kid" \\ here\r\nSet-Cookie: x=1'))
    value = headers["WWW-Authenticate"]
    assert "\r" not in value and "\n" not in value and "\\" not in value
    assert value.endswith('error_description="bad ?kid? ? here??Set-Cookie: x=1"')

"""Why a request was not let in, in RFC 6750's words, and what the HTTP answer says.

:class:`AuthError` carries the RFC 6750 section 3.1 error code and a fixed description written by
this package (never a token's contents nor a library's exception text), so it can go into the
``WWW-Authenticate`` header, a log line, an OperationOutcome or a problem document as it is.
:func:`challenge` turns one into the status and headers of the answer.
"""

from __future__ import annotations

import re
from typing import Literal

from hms_ach.core.errors import HmsAchError

BearerErrorCode = Literal["invalid_request", "invalid_token", "insufficient_scope"]

#: The status RFC 6750 section 3.1 gives each error code; no code at all (no credentials) is 401.
STATUS_OF: dict[BearerErrorCode | None, int] = {
    None: 401,
    "invalid_request": 400,
    "invalid_token": 401,
    "insufficient_scope": 403,
}

#: Retry-After of a 503 (the issuer's keys could not be fetched).
RETRY_AFTER_SECONDS = 5

#: The realm of every challenge.
REALM = "hms-ach"

# RFC 6750 section 3: error_description and scope use %x20-21 / %x23-5B / %x5D-7E (no '"', no '\').
_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")


class AuthError(HmsAchError):
    """A request without acceptable credentials.

    ``code`` is ``None`` when the request carried no credentials at all (RFC 6750 section 3.1: then
    the challenge has no error code), else one of ``invalid_request``, ``invalid_token`` and
    ``insufficient_scope``. ``description`` is for the client and the logs; it never quotes the token.
    ``scope`` (insufficient_scope only) names the scope that would be needed.
    """

    def __init__(self, code: BearerErrorCode | None, description: str, scope: str | None = None):
        self.code: BearerErrorCode | None = code
        self.description = description
        self.scope = scope
        super().__init__(f"{code}: {description}" if code else description)

    @property
    def status(self) -> int:
        return STATUS_OF[self.code]


def missing_credentials() -> AuthError:
    return AuthError(None, "no bearer token: send Authorization: Bearer <token>")


def invalid_request(description: str) -> AuthError:
    return AuthError("invalid_request", description)


def invalid_token(description: str) -> AuthError:
    return AuthError("invalid_token", description)


def insufficient_scope(description: str, scope: str | None = None) -> AuthError:
    return AuthError("insufficient_scope", description, scope)


#: The FHIR IssueType code of an OperationOutcome answering each error (http://hl7.org/fhir/issue-type).
FHIR_ISSUE_CODE: dict[BearerErrorCode | None, str] = {
    None: "login",
    "invalid_request": "invalid",
    "invalid_token": "security",
    "insufficient_scope": "forbidden",
}


def fhir_issue_code(error: AuthError) -> str:
    """The OperationOutcome ``issue.code`` for ``error`` on ``/fhir`` (``exception`` when the
    issuer's keys cannot be fetched: a 503)."""
    return "exception" if error.status == 503 else FHIR_ISSUE_CODE[error.code]


def _quoted(value: str) -> str:
    return '"' + _UNSAFE.sub("?", value) + '"'


def challenge(error: AuthError) -> tuple[int, dict[str, str]]:
    """The HTTP status and headers that answer ``error``: 401/400/403 with
    ``WWW-Authenticate: Bearer realm="hms-ach", error="...", error_description="..."`` (RFC 6750 section 3);
    503 (the issuer's keys cannot be fetched) also carries ``Retry-After``."""
    parts = [f"realm={_quoted(REALM)}"]
    if error.code is not None:
        parts.append(f"error={_quoted(error.code)}")
        parts.append(f"error_description={_quoted(error.description)}")
        if error.scope:
            parts.append(f"scope={_quoted(error.scope)}")
    headers = {"WWW-Authenticate": "Bearer " + ", ".join(parts)}
    if error.status == 503:
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return error.status, headers

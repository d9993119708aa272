"""Redaction of secrets before they reach a log line, stdout or stderr.

:func:`redact_url` hides the password of a URL (a database URL such as
``postgresql://user:secret@host/db`` becomes ``postgresql://user:***@host/db``) and the values of
query parameters that carry secrets (``password=``, ``sslpassword=``, ``token=``...).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
_SECRET_KEYS = re.compile(r"pass|secret|token|key|auth", re.IGNORECASE)
# user:password@ up to the last '@' (a password may hold '@' or '/'; over-masking is the safe side)
_USERINFO = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:@/]*):(?P<password>.*)@(?=[^@]*$)", re.DOTALL
)


def redact_url(url: str) -> str:
    """``url`` with its password and secret query values replaced by ``***``; other text unchanged.

    Works on URLs that ``urllib`` cannot split too (a password holding ``/`` or ``@``): the
    user-info part runs up to the last ``@``.
    """
    text = str(url)
    match = _USERINFO.match(text)
    if match is not None:
        text = f"{match['scheme']}{match['user']}:{MASK}@{text[match.end() :]}"
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.query:
        return text
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    if not any(_SECRET_KEYS.search(k) for k, _ in pairs):
        return text
    query = urlencode([(k, MASK if _SECRET_KEYS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(query=query))


def error_kind(exc: BaseException) -> str:
    """What went wrong, for a log line, without the exception's text (which can hold field values
    or bound SQL parameters): the exception type, and the SQLSTATE of a database error if any."""
    orig = getattr(exc, "orig", None)  # a SQLAlchemy DBAPIError wraps the driver's error
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)
    name = type(exc).__name__ + (f"({type(orig).__name__})" if orig is not None else "")
    return f"{name} {sqlstate}" if sqlstate else name

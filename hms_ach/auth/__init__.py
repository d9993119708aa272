"""Authentication and authorization of the HTTP API: an OAuth 2.0 resource server.

One module per concept:

* :mod:`~hms_ach.auth.settings`: ``auth:`` in channels.yaml (``AuthSettings``), its environment
  overrides and the loopback check of ``mode: off``;
* :mod:`~hms_ach.auth.local_issuer`: the embedded issuer's key (data directory), JWKS and tokens;
* :mod:`~hms_ach.auth.keys`: where verification keys come from (a fixed set, or an OpenID provider's
  discovery document and JWKS);
* :mod:`~hms_ach.auth.verifier`: bearer JWT verification;
* :mod:`~hms_ach.auth.authenticate`: ``Authorization`` header -> :class:`Caller`, the entry point;
* :mod:`~hms_ach.auth.errors`: :class:`AuthError` (RFC 6750 codes) and the challenge headers;
* :mod:`~hms_ach.auth.caller`: the :class:`Caller` model (``request.state.caller``);
* :mod:`~hms_ach.auth.scopes`: SMART App Launch scopes and the ``/fhir`` policy;
* :mod:`~hms_ach.auth.roles`: the ``/api/v1`` roles as data;
* :mod:`~hms_ach.auth.smart`: ``/.well-known/smart-configuration`` and ``rest.security``.

The package imports only :mod:`hms_ach.core` and third-party libraries (never fastapi nor the store),
so any layer may use it; docs/security.md shows how the HTTP layer wires it.
"""

from hms_ach.auth.authenticate import UNAUTHENTICATED, Authenticator, bearer_token, create_authenticator
from hms_ach.auth.caller import REQUEST_STATE_ATTRIBUTE, Caller
from hms_ach.auth.errors import AuthError, challenge
from hms_ach.auth.roles import ACTIONS, ROLE_RULES, Grant
from hms_ach.auth.scopes import ParsedScopes, ScopePolicy, SmartScope, parse_scopes
from hms_ach.auth.settings import AuthSettings, check_off_mode, with_environment
from hms_ach.auth.smart import capability_security, openapi_security, smart_configuration

__all__ = [
    "ACTIONS",
    "REQUEST_STATE_ATTRIBUTE",
    "ROLE_RULES",
    "UNAUTHENTICATED",
    "AuthError",
    "AuthSettings",
    "Authenticator",
    "Caller",
    "Grant",
    "ParsedScopes",
    "ScopePolicy",
    "SmartScope",
    "bearer_token",
    "capability_security",
    "challenge",
    "check_off_mode",
    "create_authenticator",
    "openapi_security",
    "parse_scopes",
    "smart_configuration",
    "with_environment",
]

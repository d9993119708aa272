"""The one entry point the HTTP layer calls: ``Authorization`` header in, :class:`Caller` out.

:class:`Authenticator` knows nothing of FastAPI: a dependency or middleware passes it the header and
the peer address, stores the Caller in ``request.state.caller`` and turns an :class:`AuthError` into
an answer with :func:`hms_ach.auth.errors.challenge` (see docs/security.md).

:func:`create_authenticator` builds it from the settings: ``local`` loads (or on first start creates)
the signing key in the data directory; ``oidc`` reads the provider's discovery document and JWKS on
first use (or at :meth:`Authenticator.start`); ``off`` lets every request in as :data:`UNAUTHENTICATED`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Any

from hms_ach.auth.caller import Caller, caller_from_claims
from hms_ach.auth.errors import AuthError, invalid_request
from hms_ach.auth.keys import KeySource, OidcKeySource, StaticKeySource
from hms_ach.auth.local_issuer import LocalSigningKey, load_or_create_key, public_jwks
from hms_ach.auth.roles import ROLES
from hms_ach.auth.scopes import parse_scopes
from hms_ach.auth.settings import AuthSettings
from hms_ach.auth.verifier import TokenVerifier

#: RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")

#: The caller of every request when ``auth.mode`` is ``off`` (only possible on loopback): every
#: scope and role, marked ``authenticated=False`` so that logs and the audit trail can tell.
UNAUTHENTICATED = Caller(
    sub="anonymous",
    scopes=parse_scopes("system/*.cruds"),
    roles=frozenset(ROLES),
    authenticated=False,
)


def bearer_token(authorization: str | None, max_bytes: int) -> str:
    """The token of an ``Authorization: Bearer <token>`` header (RFC 6750 section 2.1).

    No header, an empty one or another scheme: AuthError without an error code (401 with a bare
    challenge, RFC 6750 section 3.1). ``Bearer`` with no token or a malformed one: ``invalid_request``
    (400). A token over ``max_bytes``: ``invalid_token`` (401), unread.
    """
    if authorization is None or not authorization.strip():
        raise AuthError(None, "no bearer token: send Authorization: Bearer <token>")
    if len(authorization) > max_bytes + 64:
        raise AuthError("invalid_token", f"the token is longer than {max_bytes} bytes")
    scheme, _, rest = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError(None, "only Bearer tokens are accepted: send Authorization: Bearer <token>")
    token = rest.strip()
    if not token:
        raise invalid_request("the Authorization header has no token after Bearer")
    if not _B64TOKEN.match(token):
        raise invalid_request("the bearer token has characters RFC 6750 does not allow")
    return token


class Authenticator:
    """Turns the ``Authorization`` header of a request into a :class:`Caller` (see the module docstring)."""

    def __init__(
        self,
        settings: AuthSettings,
        verifier: TokenVerifier | None,
        keys: KeySource | None = None,
        local_key: LocalSigningKey | None = None,
    ):
        if settings.mode != "off" and verifier is None:
            raise ValueError(f"auth mode {settings.mode} needs a verifier")
        self.settings = settings
        self._verifier = verifier
        self._keys = keys
        self.local_key = local_key
        self._callers: OrderedDict[str, Caller] = OrderedDict()  # by token, least recently used first

    async def authenticate(self, authorization: str | None, source_address: str | None) -> Caller:
        """The caller of a request with this ``Authorization`` header, from ``source_address``.

        Raises AuthError (see :func:`hms_ach.auth.errors.challenge` for the answer); in ``off`` mode
        returns :data:`UNAUTHENTICATED` (with the source address) whatever the header says.
        """
        if self._verifier is None:
            return Caller(
                sub=UNAUTHENTICATED.sub,
                scopes=UNAUTHENTICATED.scopes,
                roles=UNAUTHENTICATED.roles,
                source_address=source_address,
                authenticated=False,
            )
        token = bearer_token(authorization, self.settings.max_token_bytes)
        claims = await self._verifier.verify(token)  # checks the token every time (a cache hit is cheap)
        # The caller a token makes depends on its bytes only: built once per token (its scopes
        # parsed once), then only the source address differs between its requests.
        caller = self._callers.get(token)
        if caller is None:
            caller = caller_from_claims(claims, self.settings.roles_claim, None)
            self._callers[token] = caller
            while len(self._callers) > max(1, self.settings.verified_token_cache_entries):
                self._callers.popitem(last=False)
        else:
            self._callers.move_to_end(token)
        return replace(caller, source_address=source_address) if source_address is not None else caller

    @property
    def key_source(self) -> KeySource | None:
        """Where the verification keys come from (None in off mode)."""
        return self._keys

    def jwks(self) -> dict[str, Any] | None:
        """The JWKS to publish at ``/.well-known/jwks.json`` (the local issuer's public key), or None
        when the engine issues no tokens (oidc: the provider publishes its own)."""
        return public_jwks(self.local_key) if self.local_key is not None else None

    def discovery(self) -> dict[str, Any] | None:
        """The OpenID provider's discovery document (oidc, once read), else None."""
        return self._keys.discovery if isinstance(self._keys, OidcKeySource) else None

    async def start(self) -> None:
        """Read the provider's discovery document and keys now (oidc); failures are logged, and
        retried when the first token arrives."""
        if isinstance(self._keys, OidcKeySource):
            await self._keys.refresh()

    async def aclose(self) -> None:
        if isinstance(self._keys, OidcKeySource):
            await self._keys.aclose()


def create_authenticator(settings: AuthSettings, data_dir: Path) -> Authenticator:
    """The authenticator of ``settings`` (already with the environment applied: see
    :func:`hms_ach.auth.settings.with_environment`). In ``local`` mode this creates the signing key
    in ``data_dir`` on first start (raises KeyFileError when it cannot)."""
    if settings.mode == "off":
        return Authenticator(settings, None)
    if settings.mode == "local":
        local_key = load_or_create_key(data_dir)
        keys: KeySource = StaticKeySource(public_jwks(local_key))
        return Authenticator(settings, TokenVerifier(settings, keys), keys, local_key)
    oidc = OidcKeySource(settings)
    return Authenticator(settings, TokenVerifier(settings, oidc), oidc)

"""Bearer JWT verification (RFC 6750, RFC 7519, RFC 8725 "JWT best current practices").

Steps, each answered with ``invalid_token`` and a fixed description when it fails:

1. the token is at most ``auth.max_token_bytes`` long and is a JWS compact serialization (three
   base64url segments; an encrypted JWT, a JSON serialization or anything else is refused unread);
2. its header is read (by joserfc) without trusting it: ``alg`` must be one of the pinned algorithms
   (ES256 alone for the local issuer; ``none`` and ``HS*`` can never be configured); a ``crit`` header
   is refused (no extension is understood); ``kid``, if any, is only a key to look up;
3. the key comes from the configured key source only, never from the token's ``jku``, ``x5u``,
   ``jwk`` or ``x5c`` headers;
4. joserfc checks the signature with that key, for that one algorithm;
5. the claims: ``iss`` is the configured issuer, ``aud`` holds the configured audience, ``exp`` and
   ``sub`` are present, ``exp`` is not past and ``nbf`` and ``iat`` are not in the future (all with
   ``auth.leeway_seconds`` of skew).

Descriptions never quote the token or a library's exception text.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from joserfc import jws, jwt
from joserfc.errors import (
    BadSignatureError,
    ExceededSizeError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)

from hms_ach.auth.errors import invalid_token
from hms_ach.auth.keys import KeySource
from hms_ach.auth.settings import AuthSettings

_COMPACT_JWS = re.compile(rb"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_MAX_KID_CHARS = 256
_CLAIM_WORDS = {
    "iss": "the token is from another issuer",
    "aud": "the token is for another audience",
    "nbf": "the token is not valid yet (nbf)",
    "iat": "the token was issued in the future (iat)",
    "exp": "the token has a malformed expiry (exp)",
    "sub": "the token has a malformed subject (sub)",
    "jti": "the token has a malformed id (jti)",
}


class _Registry(jws.JWSRegistry):
    """joserfc's JWS registry with room for the headers real providers send (x5t, x5c) and tolerance
    for header members it does not know (they are ignored; ``crit`` is still enforced)."""

    max_header_length = 4096
    max_payload_length = 65536


class TokenVerifier:
    """Verifies bearer tokens against one issuer (see the module docstring)."""

    def __init__(self, settings: AuthSettings, keys: KeySource, clock: Callable[[], float] = time.time):
        self._settings = settings
        self._keys = keys
        self._clock = clock
        self._algorithms = settings.effective_algorithms
        self._issuer = settings.effective_issuer
        self._audience = settings.effective_audience
        # SHA-256 of a verified token -> (its claims, the wall-clock time it may be used until)
        self._verified: OrderedDict[bytes, tuple[dict[str, Any], float]] = OrderedDict()

    @property
    def settings(self) -> AuthSettings:
        return self._settings

    async def verify(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``; raises AuthError (``invalid_token``) when it is not acceptable.

        A token verified before is answered from memory (``auth.verified_token_cache_entries``, least
        recently used first out) while its ``exp`` (plus the leeway) has not passed, and for no longer
        than ``auth.jwks_cache_seconds`` after it was verified. Only the exact same bytes hit: the key
        is the token's SHA-256, so a changed token is verified from scratch.
        """
        raw = token.encode("utf-8", errors="replace")
        if len(raw) > self._settings.max_token_bytes:
            raise invalid_token(f"the token is longer than {self._settings.max_token_bytes} bytes")
        if not _COMPACT_JWS.match(raw):
            raise invalid_token("not a signed JWT (JWS compact serialization)")
        capacity = self._settings.verified_token_cache_entries
        digest = hashlib.sha256(raw).digest()
        now = self._clock()
        hit = self._verified.get(digest)
        if hit is not None:
            if now < hit[1]:
                self._verified.move_to_end(digest)
                return dict(hit[0])
            del self._verified[digest]
            if now >= float(hit[0]["exp"]) + self._settings.leeway_seconds:
                raise invalid_token("the token has expired")
        claims = await self._verify(raw, int(now))
        if capacity > 0:
            until = min(
                float(claims["exp"]) + self._settings.leeway_seconds, now + self._settings.jwks_cache_seconds
            )
            self._verified[digest] = (claims, until)
            while len(self._verified) > capacity:
                self._verified.popitem(last=False)
        return dict(claims)

    async def _verify(self, raw: bytes, now: int) -> dict[str, Any]:
        registry = _Registry(algorithms=self._algorithms, strict_check_header=False)
        try:
            header = jws.extract_compact(raw, registry=registry).headers()
        except ExceededSizeError as exc:
            raise invalid_token("the token header or payload is too large") from exc
        except (JoseError, ValueError, TypeError) as exc:
            raise invalid_token("the token header cannot be read") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise invalid_token(f"signature algorithm not accepted (accepted: {', '.join(self._algorithms)})")
        if "crit" in header:
            raise invalid_token("the token has critical header extensions, none of which is supported")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > _MAX_KID_CHARS):
            raise invalid_token("the token's key id (kid) is malformed")
        key = await self._keys.key_for(kid, alg)
        try:
            decoded = jwt.decode(raw, key, algorithms=[alg], registry=registry)
        except BadSignatureError as exc:
            raise invalid_token("the token signature does not verify") from exc
        except (JoseError, ValueError, TypeError) as exc:
            raise invalid_token("the token cannot be verified (malformed)") from exc
        claims = dict(decoded.claims)
        self._check_claims(claims, now)
        return claims

    def _check_claims(self, claims: dict[str, Any], now: int) -> None:
        claims_registry = jwt.JWTClaimsRegistry(
            now=now,
            leeway=self._settings.leeway_seconds,
            iss={"essential": True, "value": self._issuer},
            aud={"essential": True, "value": self._audience},
            exp={"essential": True},
            sub={"essential": True},
        )
        try:
            claims_registry.validate(claims)
        except ExpiredTokenError as exc:
            raise invalid_token("the token has expired") from exc
        except MissingClaimError as exc:
            missing = ", ".join(sorted(c for c in ("iss", "aud", "exp", "sub") if claims.get(c) is None))
            raise invalid_token(
                f"the token lacks required claims: {missing or 'iss, aud, exp, sub'}"
            ) from exc
        except InvalidClaimError as exc:
            raise invalid_token(_CLAIM_WORDS.get(exc.claim, "the token has a malformed claim")) from exc
        except (JoseError, ValueError, TypeError) as exc:
            raise invalid_token("the token claims cannot be read") from exc

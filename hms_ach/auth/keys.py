"""Where the verifier finds the public key of a token: a fixed key set (the local issuer), or an OpenID
provider's JWKS found through its discovery document.

:class:`OidcKeySource`

* reads ``{issuer}/.well-known/openid-configuration`` (whose ``issuer`` must be the configured one,
  as OpenID Connect Discovery 1.0 section 4.3 requires) and then its ``jwks_uri``;
* accepts https URLs, and http only on a loopback host (a provider on the same machine, as in tests);
* bounds every request: ``auth.http_timeout_seconds`` for the whole request, ``auth.max_document_bytes``
  for the body (read no further), no redirects;
* keeps the keys for ``auth.jwks_cache_seconds``; a token with a ``kid`` it does not know fetches the
  JWKS again, at most once per ``auth.jwks_refresh_min_interval_seconds`` (so a stream of tokens with
  made-up key ids cannot make it hammer the provider), with concurrent requests sharing one fetch;
* when a refresh fails it keeps serving the keys it has, and a token it has no key for is answered 503
  (the failure is the provider's, not the client's).

Keys are taken only from the configured source: a token's own ``jku``, ``x5u``, ``jwk`` or ``x5c``
headers are never fetched nor trusted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet

from hms_ach.auth.errors import AuthError, invalid_token
from hms_ach.auth.settings import AuthSettings, https_or_loopback_url
from hms_ach.core.redact import error_kind

log = logging.getLogger("hms_ach.auth")

DISCOVERY_PATH = "/.well-known/openid-configuration"
#: JWK members that only a private key has: a published key with one of them is not used.
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
#: Key types a signature may be verified with (never "oct": a shared secret is not a public key).
_PUBLIC_KEY_TYPES = frozenset({"EC", "RSA", "OKP"})


class KeySource(Protocol):
    async def key_for(self, kid: str | None, alg: str) -> Key:
        """The key that verifies a token with header ``kid`` and ``alg``; raises AuthError."""
        ...


class KeysUnavailableError(AuthError):
    """The issuer's keys cannot be fetched, so the token cannot be checked: 503, not 401."""

    def __init__(self, description: str):
        super().__init__("invalid_token", description)

    @property
    def status(self) -> int:
        return 503


class DocumentError(Exception):
    """A discovery document or JWKS could not be fetched or is not usable; the text is ours."""


def _select(keys: Mapping[str, Key], kid: str | None, alg: str) -> Key | None:
    if kid is None:
        candidates = [k for k in keys.values() if _fits(k, alg)]
        return candidates[0] if len(candidates) == 1 else None
    key = keys.get(kid)
    return key if key is not None and _fits(key, alg) else None


def _fits(key: Key, alg: str) -> bool:
    """A key may verify ``alg`` when its own ``alg`` (if any) is the same and its ``use`` (if any) is sig."""
    declared = key.get("alg")
    use = key.get("use")
    return (declared is None or declared == alg) and (use is None or use == "sig")


def key_map(jwks: Mapping[str, Any]) -> dict[str, Key]:
    """The usable public keys of a JWKS by ``kid`` (a key without one gets its RFC 7638 thumbprint).
    Keys of unknown or secret types, keys with private members and keys with a use other than sig are
    skipped; raises DocumentError when nothing usable is left."""
    raw = jwks.get("keys")
    if not isinstance(raw, list):
        raise DocumentError("the JWKS has no keys list")
    usable = [
        k
        for k in raw
        if isinstance(k, dict)
        and k.get("kty") in _PUBLIC_KEY_TYPES
        and not (_PRIVATE_MEMBERS & k.keys())
        and k.get("use", "sig") == "sig"
    ]
    out: dict[str, Key] = {}
    for item in usable:
        try:
            key_set = KeySet.import_key_set({"keys": [item]})
        except (JoseError, ValueError, TypeError, KeyError):
            continue  # one bad key does not spoil the others
        for key in key_set.keys:
            if key.kid is not None:
                out.setdefault(key.kid, key)
    if not out:
        raise DocumentError("the JWKS has no usable public signing key")
    return out


class StaticKeySource:
    """A fixed key set (the local issuer's public key, or keys given by a test)."""

    def __init__(self, jwks: Mapping[str, Any]):
        self._keys = key_map(jwks)

    async def key_for(self, kid: str | None, alg: str) -> Key:
        key = _select(self._keys, kid, alg)
        if key is None:
            raise invalid_token("unknown signing key (kid) for this issuer")
        return key


async def fetch_json(client: httpx.AsyncClient, url: str, max_bytes: int, timeout_seconds: float) -> Any:
    """GET ``url`` and parse its JSON body: status 200 only, no redirects, the body read no further
    than ``max_bytes``, the whole request within ``timeout_seconds``. Raises DocumentError."""
    if not https_or_loopback_url(url):
        raise DocumentError("only https URLs (or http on a loopback host) are fetched")
    try:
        async with asyncio.timeout(timeout_seconds):
            async with client.stream(
                "GET", url, headers={"Accept": "application/json"}, follow_redirects=False
            ) as response:
                if response.status_code != 200:
                    raise DocumentError(f"HTTP status {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > max_bytes:
                    raise DocumentError(f"larger than {max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > max_bytes:
                        raise DocumentError(f"larger than {max_bytes} bytes")
    except TimeoutError as exc:
        raise DocumentError(f"no complete answer within {timeout_seconds:g} s") from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise DocumentError(f"request failed ({error_kind(exc)})") from exc
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError) as exc:
        raise DocumentError("not JSON") from exc


class OidcKeySource:
    """The keys of an OpenID provider (see the module docstring). Close it with :meth:`aclose`."""

    def __init__(self, settings: AuthSettings, client: httpx.AsyncClient | None = None):
        if not settings.issuer:
            raise ValueError("an oidc key source needs auth.issuer")
        self._settings = settings
        self._issuer = settings.issuer
        self._client = client or httpx.AsyncClient(timeout=settings.http_timeout_seconds)
        self._owns_client = client is None
        self._keys: dict[str, Key] = {}
        self._discovery: dict[str, Any] | None = None
        self._fetched_at: float | None = None  # monotonic time of the last successful JWKS fetch
        self._attempted_at: float | None = None  # monotonic time of the last fetch attempt
        self._generation = 0  # how many refreshes were attempted
        self._lock = asyncio.Lock()
        #: how many times the JWKS was fetched (successfully); for tests and metrics.
        self.fetch_count = 0

    @property
    def discovery(self) -> dict[str, Any] | None:
        """The provider's discovery document, once it was read."""
        return self._discovery

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    def _stale(self, now: float) -> bool:
        return self._fetched_at is None or now - self._fetched_at >= self._settings.jwks_cache_seconds

    def _may_retry(self, now: float) -> bool:
        return (
            self._attempted_at is None
            or now - self._attempted_at >= self._settings.jwks_refresh_min_interval_seconds
        )

    async def key_for(self, kid: str | None, alg: str) -> Key:
        now = time.monotonic()
        key = _select(self._keys, kid, alg)
        if key is not None and not self._stale(now):
            return key
        generation = self._generation
        async with self._lock:
            # a request that waited while another one refreshed uses that refresh's result
            if self._generation == generation and self._may_retry(time.monotonic()):
                await self._refresh()
        key = _select(self._keys, kid, alg)
        if key is not None:
            return key
        if not self._keys:
            raise KeysUnavailableError("the issuer's signing keys cannot be fetched now; try again later")
        raise invalid_token("unknown signing key (kid) for this issuer")

    async def refresh(self) -> None:
        """Fetch the discovery document and the JWKS now (at start-up); failures are logged, not raised."""
        async with self._lock:
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            await self._fetch()
        finally:
            self._attempted_at = time.monotonic()
            self._generation += 1

    async def _fetch(self) -> None:
        s = self._settings
        try:
            doc = await fetch_json(
                self._client,
                self._issuer.rstrip("/") + DISCOVERY_PATH,
                s.max_document_bytes,
                s.http_timeout_seconds,
            )
            if not isinstance(doc, dict):
                raise DocumentError("the discovery document is not a JSON object")
            if doc.get("issuer") != self._issuer:
                raise DocumentError("the discovery document names another issuer")
            jwks_uri = doc.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise DocumentError("the discovery document has no jwks_uri")
            jwks = await fetch_json(self._client, jwks_uri, s.max_document_bytes, s.http_timeout_seconds)
            if not isinstance(jwks, dict):
                raise DocumentError("the JWKS is not a JSON object")
            keys = key_map(jwks)
        except DocumentError as exc:
            log.warning(
                "auth.jwks_refresh_failed",
                extra={"issuer": self._issuer, "reason": str(exc), "keys_kept": len(self._keys)},
            )
            return
        except Exception as exc:  # a document we did not foresee must not fail the request
            log.error(
                "auth.jwks_refresh_failed",
                extra={"issuer": self._issuer, "reason": error_kind(exc), "keys_kept": len(self._keys)},
            )
            return
        self._discovery = doc
        self._keys = keys
        self._fetched_at = time.monotonic()
        self.fetch_count += 1
        log.info("auth.jwks_refreshed", extra={"issuer": self._issuer, "keys": len(keys)})

"""The ``fhir_push`` sink: mirror record changes to a remote FHIR R4 server.

It reads the change feed (``record.changed`` events, one per new record version) and pushes the
record's *current* content, so a retried or late row converges on the latest state:

* ``mode: conditional``: ``PUT {base}/{Type}?identifier=system|value`` with the record's business
  identifier (``PUT {base}/{Type}/{id}`` when the record has none; the remote must then allow
  update-as-create). References to records of the pushed types are rewritten to the remote's ids,
  found with ``GET {Type}?identifier=``; a target the remote does not have yet is pushed first.
* ``mode: transaction``: one transaction Bundle with the record and the records it refers to
  (conditional PUTs, references turned into the entries' ``urn:uuid`` fullUrls), applied by the
  remote all or nothing.
* A deleted record is deleted on the remote (found by identifier); a remote 404/410 is success.

Outcome of an attempt: 2xx is delivered. 429, 5xx, 409, 412, 3xx, timeouts and connection errors
are retried through the outbox's backoff, honouring ``Retry-After``. Any other 4xx is permanent:
the row goes to dead-letter with the remote's OperationOutcome diagnostics as the reason and the
OperationOutcome itself as the stored response. A 401 first fetches a new OAuth2 token once.

Authentication (``auth:``): none, a static bearer token, or OAuth2 client credentials
(``client_secret_basic``, or SMART backend services ``private_key_jwt``: a client assertion signed
by authlib with RS384/ES384, ``exp`` at most 5 minutes ahead and a fresh ``jti`` per request).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from hms_ach.core.records import FHIR_WRITABLE, MIRRORED
from hms_ach.core.redact import redact_url
from hms_ach.core.references import references, rewrite_references
from hms_ach.outbound.sinks import Delivery, DeliveryError, DeliveryResult, SinkSettings
from hms_ach.outbound.webhook import retry_after_seconds
from hms_ach.store import record_reads
from hms_ach.store.db import Store

log = logging.getLogger("hms_ach.outbound.fhir_push")

#: Pushed unless resource_types says otherwise: the FHIR records taken in (not those hms-ach makes
#: itself, such as Claim, Coverage and ChargeItem, which a sink names to get them).
DEFAULT_TYPES = list(FHIR_WRITABLE)
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FHIR_JSON = "application/fhir+json"
#: Retried statuses below 500 (409/412: the remote saw a concurrent change; 429: slow down).
RETRIED_4XX = frozenset({409, 412, 429})
#: How far references are followed to include (transaction) or push first (conditional) their targets.
MAX_REFERENCE_DEPTH = 3
MAX_RELATED_RECORDS = 50
MAX_RESPONSE_CHARS = 4000


class PushAuth(BaseModel):
    """How the sink authenticates to the remote FHIR server."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["none", "bearer", "client_credentials"] = Field(
        "none", description="none | bearer (a static token) | client_credentials (OAuth2 token endpoint)"
    )
    token: SecretStr | None = Field(
        None, description="bearer: the token; use ${VAR} to read it from the environment"
    )
    token_url: str | None = Field(None, description="client_credentials: the OAuth2 token endpoint")
    client_id: str | None = Field(None, description="client_credentials: the registered client id")
    client_secret: SecretStr | None = Field(
        None, description="client_credentials with client_secret_basic: the client secret (${VAR})"
    )
    private_key: SecretStr | None = Field(
        None, description="client_credentials with SMART private_key_jwt: the PEM private key (${VAR})"
    )
    private_key_file: str | None = Field(
        None, description="private_key_jwt: a file holding the PEM private key"
    )
    key_id: str | None = Field(None, description="private_key_jwt: the kid of the key in the client's JWKS")
    algorithm: Literal["RS384", "ES384"] = Field(
        "RS384",
        description="private_key_jwt: the JWS algorithm (SMART backend services allows RS384 and ES384)",
    )
    scope: str = Field("system/*.write", description="client_credentials: the scopes asked for")
    assertion_lifetime_seconds: int = Field(
        300,
        gt=0,
        le=300,
        description="private_key_jwt: exp - iat of the client assertion (SMART: at most 300)",
    )

    @model_validator(mode="after")
    def _complete(self) -> PushAuth:
        if self.type == "bearer" and self.token is None:
            raise ValueError("auth type bearer needs token: (e.g. token: ${FHIR_PUSH_TOKEN})")
        if self.type == "client_credentials":
            missing = [n for n in ("token_url", "client_id") if not getattr(self, n)]
            if missing:
                raise ValueError(f"auth type client_credentials needs {' and '.join(missing)}")
            keys = [
                self.client_secret is not None,
                self.private_key is not None,
                self.private_key_file is not None,
            ]
            if sum(keys) != 1:
                raise ValueError(
                    "auth type client_credentials needs exactly one of client_secret (client_secret_basic),"
                    " private_key or private_key_file (private_key_jwt)"
                )
        return self


@dataclass
class LocalRecord:
    resource_type: str
    id: str
    key_system: str | None
    key_value: str | None
    deleted: bool
    content: dict[str, Any]

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"

    def conditional_url(self) -> str:
        """``Type?identifier=system|value``, or ``Type/id`` for a record without a business identifier."""
        if not self.key_value:
            return self.reference
        token = f"{self.key_system}|{self.key_value}" if self.key_system else self.key_value
        return f"{self.resource_type}?identifier={quote(token, safe='|:/')}"


def outcome_text(body: str) -> str:
    """The diagnostics of an OperationOutcome body, or the body itself (shortened)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300]
    if isinstance(data, dict) and data.get("resourceType") == "OperationOutcome":
        parts = []
        for issue in data.get("issue") or []:
            if isinstance(issue, dict):
                where = ", ".join(str(e) for e in issue.get("expression") or [])
                text = (
                    issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code")
                )
                parts.append(
                    f"{issue.get('severity', 'error')} {issue.get('code', '')}: {text}"
                    + (f" (at {where})" if where else "")
                )
        return "; ".join(parts)[:1000] or "an OperationOutcome without issues"
    return body[:300]


class TokenSource:
    """The Authorization header for the remote: static, or an OAuth2 access token fetched and cached."""

    def __init__(self, auth: PushAuth, timeout: float):
        self.auth = auth
        self.timeout = timeout
        self._token: str | None = None
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self._pem: str | None = None
        if auth.private_key is not None:
            self._pem = auth.private_key.get_secret_value()
        elif auth.private_key_file:
            self._pem = Path(auth.private_key_file).read_text()
        self._key: Any = None

    def invalidate(self) -> None:
        self._token, self._expires = None, 0.0

    def assertion(self) -> str:
        """A SMART backend-services client assertion (signed by authlib; never hand-rolled)."""
        from authlib.oauth2.rfc7523 import private_key_jwt_sign
        from joserfc.jwk import ECKey, RSAKey

        assert self._pem is not None and self.auth.client_id and self.auth.token_url
        if self._key is None:
            self._key = (RSAKey if self.auth.algorithm.startswith("RS") else ECKey).import_key(self._pem)
        header: dict[str, Any] = {"typ": "JWT"}
        if self.auth.key_id:
            header["kid"] = self.auth.key_id
        signed = private_key_jwt_sign(
            self._key,
            client_id=self.auth.client_id,
            token_endpoint=self.auth.token_url,
            alg=self.auth.algorithm,
            claims={"jti": uuid.uuid4().hex},
            header=header,
            expires_in=self.auth.assertion_lifetime_seconds,
        )
        return signed.decode() if isinstance(signed, bytes) else str(signed)

    async def header(self, client: httpx.AsyncClient) -> str | None:
        if self.auth.type == "none":
            return None
        if self.auth.type == "bearer":
            assert self.auth.token is not None
            return f"Bearer {self.auth.token.get_secret_value()}"
        async with self._lock:
            if self._token is None or time.monotonic() > self._expires - 30:
                await self._fetch(client)
            return f"Bearer {self._token}"

    async def _fetch(self, client: httpx.AsyncClient) -> None:
        auth = self.auth
        assert auth.token_url and auth.client_id
        form = {"grant_type": "client_credentials", "scope": auth.scope}
        basic: httpx.BasicAuth | None = None
        if auth.client_secret is not None:
            basic = httpx.BasicAuth(auth.client_id, auth.client_secret.get_secret_value())
        else:
            try:
                form.update(client_assertion_type=JWT_BEARER, client_assertion=self.assertion())
            except Exception as exc:  # noqa: BLE001 - a key that cannot sign is a configuration error
                raise DeliveryError(
                    f"cannot sign the client assertion with the configured private key "
                    f"({type(exc).__name__}: {exc}); expected a PEM {auth.algorithm} key"
                ) from exc
        try:
            response = await client.post(
                auth.token_url,
                data=form,
                auth=basic or httpx.USE_CLIENT_DEFAULT,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise DeliveryError(f"token endpoint {auth.token_url}: {type(exc).__name__}: {exc}") from exc
        try:
            data = response.json()
        except ValueError:
            data = {}
        if response.status_code != 200 or not isinstance(data, dict) or not data.get("access_token"):
            reason = (
                f"{data.get('error', '')} {data.get('error_description', '')}".strip()
                if isinstance(data, dict)
                else ""
            ) or response.text[:200]
            # Retried, not dead-lettered: a credential problem is fixed in the config, then rows flow again.
            raise DeliveryError(
                f"token endpoint {auth.token_url} answered {response.status_code}: "
                f"{reason or 'no access_token'}",
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        self._token = str(data["access_token"])
        try:
            lifetime = float(data.get("expires_in", 300))
        except (TypeError, ValueError):
            lifetime = 300.0
        self._expires = time.monotonic() + max(lifetime, 31.0)
        log.info(
            "fhir_push.token_fetched", extra={"token_url": redact_url(auth.token_url), "expires_in": lifetime}
        )


class FhirPushSink:
    class Config(SinkSettings):
        events: list[str] = Field(
            default_factory=lambda: ["record.changed"],
            description="The change feed; only record.changed is acted on",
        )
        base_url: str = Field(description="The remote FHIR R4 base URL (https://fhir.example.org/r4)")
        mode: Literal["conditional", "transaction"] = Field(
            "conditional",
            description="conditional: one PUT Type?identifier= per record; transaction: a "
            "transaction Bundle with the record and the records it refers to",
        )
        resource_types: list[str] = Field(
            default_factory=lambda: list(DEFAULT_TYPES),
            description="Record types pushed; references to other types are sent unchanged",
        )
        auth: PushAuth = Field(
            default_factory=lambda: PushAuth.model_validate({}), description="Authentication to the remote"
        )
        headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers")

        @model_validator(mode="after")
        def _known_types(self) -> FhirPushSink.Config:
            unknown = [t for t in self.resource_types if t not in MIRRORED]
            if unknown:
                raise ValueError(
                    f"resource_types: {', '.join(unknown)} not known; expected some of {', '.join(MIRRORED)}"
                )
            if not self.base_url.startswith(("http://", "https://")):
                raise ValueError(f"base_url {self.base_url!r} must start with http:// or https://")
            return self

    def __init__(self, settings: Config, store: Store):
        self.settings = settings
        self.store = store
        self.base = settings.base_url.rstrip("/")
        self._client = httpx.AsyncClient(timeout=settings.timeout_seconds, follow_redirects=False)
        self.tokens = TokenSource(settings.auth, settings.timeout_seconds)
        self._remote_ids: dict[str, str] = {}  # local reference -> remote reference (bounded cache)

    async def close(self) -> None:
        await self._client.aclose()

    # ------------------------------------------------------------------ local reads (in a thread)
    def _load(self, refs: list[str]) -> dict[str, LocalRecord]:
        out: dict[str, LocalRecord] = {}
        with self.store.read() as conn:
            for ref in refs:
                row = record_reads.stored(conn, ref)
                if row is None or row.version_id == 0:
                    continue
                out[ref] = LocalRecord(
                    row.resource_type, row.id, row.key_system, row.key_value, row.deleted, row.content
                )
        return out

    def _pushed(self, ref: str) -> bool:
        return ref.partition("/")[0] in self.settings.resource_types

    def _closure(self, ref: str) -> dict[str, LocalRecord]:
        """The record and the records it refers to (pushed types only), breadth first, bounded."""
        found: dict[str, LocalRecord] = {}
        level = [ref]
        for _ in range(MAX_REFERENCE_DEPTH + 1):
            records = self._load([r for r in level if r not in found])
            found.update(records)
            level = [
                t
                for rec in records.values()
                if not rec.deleted
                for _path, t in references(rec.content)
                if self._pushed(t) and t not in found
            ]
            if not level or len(found) >= MAX_RELATED_RECORDS:
                break
        return found

    # ------------------------------------------------------------------ HTTP
    async def _request(self, method: str, url: str, body: Any = None) -> httpx.Response:
        """One request with auth; a 401 fetches a new token and tries once more. Raises DeliveryError."""
        for attempt in (1, 2):
            headers = {**self.settings.headers, "Accept": FHIR_JSON}
            if body is not None:
                headers["Content-Type"] = FHIR_JSON
            auth = await self.tokens.header(self._client)
            if auth:
                headers["Authorization"] = auth
            try:
                response = await self._client.request(
                    method,
                    f"{self.base}/{url}",
                    headers=headers,
                    content=orjson.dumps(body) if body is not None else None,
                )
            except httpx.TimeoutException as exc:
                raise DeliveryError(
                    f"{method} {url}: timeout after {self.settings.timeout_seconds}s"
                ) from exc
            except httpx.HTTPError as exc:
                raise DeliveryError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
            if (
                response.status_code == 401
                and attempt == 1
                and self.settings.auth.type == "client_credentials"
            ):
                self.tokens.invalidate()
                continue
            return response
        raise AssertionError("unreachable")

    def _fail(self, method: str, url: str, response: httpx.Response) -> DeliveryError:
        text = response.text[:MAX_RESPONSE_CHARS]
        status = response.status_code
        permanent = 400 <= status < 500 and status not in RETRIED_4XX
        return DeliveryError(
            f"{method} {url}: HTTP {status}: {outcome_text(text)}",
            permanent=permanent,
            response=text,
            retry_after=retry_after_seconds(response.headers.get("Retry-After")),
        )

    @staticmethod
    def _id_of(response: httpx.Response, rtype: str) -> str | None:
        location = response.headers.get("Location") or response.headers.get("Content-Location") or ""
        parts = location.split("/_history/")[0].rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] == rtype:
            return parts[-1]
        try:
            data = response.json()
        except ValueError:
            return None
        return str(data["id"]) if isinstance(data, dict) and data.get("id") else None

    async def _find(self, rec: LocalRecord) -> str | None:
        """The remote reference of ``rec`` (by identifier), or None if the remote has no such record."""
        if not rec.key_value:
            return rec.reference
        url = rec.conditional_url()
        response = await self._request("GET", url)
        if response.status_code != 200:
            raise self._fail("GET", url, response)
        bundle = response.json()
        matches = [
            e["resource"]["id"]
            for e in bundle.get("entry") or []
            if isinstance(e, dict)
            and (e.get("search") or {}).get("mode", "match") == "match"
            and isinstance(e.get("resource"), dict)
            and e["resource"].get("id")
        ]
        if len(matches) > 1:
            raise DeliveryError(
                f"GET {url}: the remote has {len(matches)} {rec.resource_type} records with this "
                "identifier; expected at most one",
                permanent=True,
            )
        return f"{rec.resource_type}/{matches[0]}" if matches else None

    def _remember(self, local: str, remote: str) -> None:
        if len(self._remote_ids) > 10000:
            self._remote_ids.clear()
        self._remote_ids[local] = remote

    # ------------------------------------------------------------------ conditional mode
    async def _push_one(self, ref: str, records: dict[str, LocalRecord], stack: tuple[str, ...]) -> str:
        """PUT ``ref`` (its reference targets first, if the remote lacks them); returns its remote reference."""
        rec = records[ref]
        mapping: dict[str, str] = {}
        for target in dict.fromkeys(ref for _path, ref in references(rec.content)):
            if target not in records or target in stack or records[target].deleted:
                continue
            remote = self._remote_ids.get(target) or await self._find(records[target])
            if remote is None:
                remote = await self._push_one(target, records, (*stack, ref))
            self._remember(target, remote)
            mapping[target] = remote
        body = rewrite_references({k: v for k, v in rec.content.items() if k != "meta"}, mapping)
        url = rec.conditional_url()
        if rec.key_value:
            body.pop("id", None)
        response = await self._request("PUT", url, body)
        if not 200 <= response.status_code < 300:
            if response.status_code == 422 and mapping:
                for target in mapping:  # a stale cached id: look it up again next time
                    self._remote_ids.pop(target, None)
            raise self._fail("PUT", url, response)
        rid = self._id_of(response, rec.resource_type)
        remote_ref = f"{rec.resource_type}/{rid}" if rid else rec.reference
        self._remember(ref, remote_ref)
        return remote_ref

    async def _delete(self, rec: LocalRecord) -> str:
        remote = self._remote_ids.pop(rec.reference, None) or await self._find(rec)
        if remote is None:
            return "not on the remote"
        response = await self._request("DELETE", remote)
        if response.status_code in (404, 410) or 200 <= response.status_code < 300:
            return f"DELETE {remote}: {response.status_code}"
        raise self._fail("DELETE", remote, response)

    # ------------------------------------------------------------------ transaction mode
    def bundle(self, ref: str, records: dict[str, LocalRecord]) -> dict[str, Any]:
        """A transaction Bundle: ``ref`` and its (live) targets as conditional PUTs linked by urn:uuid."""
        live = {r: rec for r, rec in records.items() if not rec.deleted}
        full_urls = {r: f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, f'hms-ach:{r}')}" for r in live}
        entries = []
        for r, rec in live.items():
            body = rewrite_references({k: v for k, v in rec.content.items() if k != "meta"}, full_urls)
            if rec.key_value:
                body.pop("id", None)
            entries.append(
                {
                    "fullUrl": full_urls[r],
                    "resource": body,
                    "request": {"method": "PUT", "url": rec.conditional_url()},
                }
            )
        entries.sort(key=lambda e: 0 if e["fullUrl"] == full_urls.get(ref) else 1)
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    async def _push_transaction(self, ref: str, records: dict[str, LocalRecord]) -> str:
        bundle = self.bundle(ref, records)
        response = await self._request("POST", "", bundle)
        if not 200 <= response.status_code < 300:
            raise self._fail("POST", "(transaction)", response)
        try:
            statuses = [
                str((e.get("response") or {}).get("status", "?")) for e in response.json().get("entry", [])
            ]
        except (ValueError, AttributeError):
            statuses = []
        return f"transaction of {len(bundle['entry'])}: {', '.join(statuses)}"

    # ------------------------------------------------------------------ the sink
    async def deliver(self, delivery: Delivery) -> DeliveryResult:
        ref = str(delivery.payload.get("resource", ""))
        if delivery.event != "record.changed" or not self._pushed(ref):
            return DeliveryResult(response=f"ignored {delivery.event} {ref}".strip())
        records = await asyncio.to_thread(self._closure, ref)
        rec = records.get(ref)
        if rec is None:
            return DeliveryResult(response=f"{ref} is not stored (nothing to push)")
        if rec.deleted:
            return DeliveryResult(response=await self._delete(rec))
        if self.settings.mode == "transaction":
            return DeliveryResult(response=await self._push_transaction(ref, records))
        remote = await self._push_one(ref, records, ())
        return DeliveryResult(response=f"PUT {rec.conditional_url()} -> {remote}")

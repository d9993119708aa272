"""``auth:`` in channels.yaml: who may call the HTTP API, as a typed model.

* ``mode: local`` (the default): the engine is its own token issuer. It keeps an EC P-256 signing key
  in its data directory and ``hms-ach token`` prints tokens signed with it (ES256 only).
* ``mode: oidc``: tokens come from an OpenID provider found through ``issuer`` (its discovery document);
  ``audience`` is required.
* ``mode: off``: no authentication. Refused unless every listener binds to a loopback address
  (:func:`check_off_mode`).

``HMS_ACH_AUTH_MODE``, ``HMS_ACH_AUTH_ISSUER`` and ``HMS_ACH_AUTH_AUDIENCE`` win over the file
(:func:`with_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hms_ach.core.addresses import is_loopback_host
from hms_ach.core.errors import ConfigError

AuthMode = Literal["local", "oidc", "off"]

#: Signature algorithms a verifier may ever be configured to accept: asymmetric only. ``none`` and the
#: HMAC family (HS256...) are never accepted: with a published public key as the "secret" they are the
#: algorithm-confusion attack.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA", "Ed25519"}
)
#: The one algorithm of the local issuer (EC P-256).
LOCAL_ALGORITHM = "ES256"
#: ``iss`` of the local issuer's tokens when ``auth.issuer`` is not set.
DEFAULT_LOCAL_ISSUER = "urn:hms-ach:local"
#: ``aud`` of the local issuer's tokens when ``auth.audience`` is not set.
DEFAULT_LOCAL_AUDIENCE = "urn:hms-ach:api"

ENV_MODE = "HMS_ACH_AUTH_MODE"
ENV_ISSUER = "HMS_ACH_AUTH_ISSUER"
ENV_AUDIENCE = "HMS_ACH_AUTH_AUDIENCE"


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: AuthMode = Field(
        "local",
        description="local: the engine issues its own tokens (hms-ach token); oidc: tokens of an OpenID "
        "provider; off: no authentication, refused unless every listener binds to loopback; "
        "HMS_ACH_AUTH_MODE wins over it",
    )
    issuer: str | None = Field(
        None,
        description="The issuer (iss) tokens must carry. oidc: the provider's issuer URL, whose "
        "/.well-known/openid-configuration is read; local: default urn:hms-ach:local; "
        "HMS_ACH_AUTH_ISSUER wins over it",
    )
    audience: str | None = Field(
        None,
        description="The audience (aud) tokens must carry: this API's identifier at the issuer. Required "
        "for oidc; local: default urn:hms-ach:api; HMS_ACH_AUTH_AUDIENCE wins over it",
    )
    algorithms: list[str] = Field(
        default_factory=lambda: ["RS256", "PS256", "ES256"],
        description="Signature algorithms accepted from an oidc issuer (asymmetric only: none and HS* are "
        "refused); the local issuer always uses ES256 alone",
    )
    leeway_seconds: int = Field(
        30, ge=0, le=300, description="Clock skew allowed when checking exp, nbf and iat"
    )
    max_token_bytes: int = Field(
        8192, ge=512, le=65536, description="Longer bearer tokens are refused (invalid_token) unread"
    )
    roles_claim: str = Field(
        "roles",
        pattern=r"^[A-Za-z0-9_:\-]+(\.[A-Za-z0-9_:\-]+)*$",
        description="Dotted path of the claim that lists the caller's /api/v1 roles, e.g. roles or "
        "realm_access.roles (Keycloak)",
    )
    verified_token_cache_entries: int = Field(
        4096,
        ge=0,
        description="Verified tokens remembered (until they expire, at most jwks_cache_seconds) so that a "
        "client's next request skips the signature check; 0: verify every request",
    )
    jwks_cache_seconds: float = Field(
        300.0,
        gt=0,
        description="oidc: how long the provider's keys (JWKS) are used before they are fetched again",
    )
    jwks_refresh_min_interval_seconds: float = Field(
        30.0,
        ge=0,
        description="oidc: a token signed with an unknown key id fetches the JWKS again at most this often",
    )
    http_timeout_seconds: float = Field(
        5.0, gt=0, le=60, description="oidc: deadline of each request for the discovery document or the JWKS"
    )
    max_document_bytes: int = Field(
        262144,
        ge=1024,
        description="oidc: larger discovery documents or JWKS are refused (read no further than this)",
    )
    local_token_ttl_seconds: int = Field(
        3600, gt=0, description="local: lifetime of a token from hms-ach token when --ttl is not given"
    )
    local_max_token_ttl_seconds: int = Field(
        7 * 86400, gt=0, description="local: hms-ach token refuses a longer --ttl"
    )

    @field_validator("algorithms")
    @classmethod
    def _asymmetric_only(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one algorithm is needed")
        bad = [a for a in value if a not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(
                f"{', '.join(bad)} not allowed: only asymmetric algorithms ({', '.join(sorted(ASYMMETRIC_ALGORITHMS))})"
            )
        return value

    @model_validator(mode="after")
    def _oidc_needs_issuer_and_audience(self) -> AuthSettings:
        if self.mode == "oidc":
            missing = [name for name in ("issuer", "audience") if not getattr(self, name)]
            if missing:
                raise ValueError(
                    f"mode oidc needs {' and '.join(missing)} (or {', '.join('HMS_ACH_AUTH_' + m.upper() for m in missing)})"
                )
            if not https_or_loopback_url(self.issuer or ""):
                raise ValueError(
                    "mode oidc needs an https issuer URL (http only on a loopback host, for tests)"
                )
        return self

    @property
    def effective_issuer(self) -> str:
        """The ``iss`` tokens must carry (the local default when none is set)."""
        return self.issuer or DEFAULT_LOCAL_ISSUER

    @property
    def effective_audience(self) -> str:
        """The ``aud`` tokens must carry (the local default when none is set)."""
        return self.audience or DEFAULT_LOCAL_AUDIENCE

    @property
    def effective_algorithms(self) -> list[str]:
        """The pinned algorithm list: ES256 alone in local mode, the configured list in oidc mode."""
        return [LOCAL_ALGORITHM] if self.mode == "local" else list(self.algorithms)


def https_or_loopback_url(url: str) -> bool:
    """Whether the engine may fetch ``url``: https, or http on a loopback host (a provider on the
    same machine, as in the tests)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # e.g. a malformed IPv6 literal
        return False
    if parts.scheme == "https":
        return bool(host)
    return parts.scheme == "http" and is_loopback_host(host or "")


def with_environment(settings: AuthSettings, environ: Mapping[str, str] | None = None) -> AuthSettings:
    """``settings`` with ``HMS_ACH_AUTH_MODE``, ``HMS_ACH_AUTH_ISSUER`` and ``HMS_ACH_AUTH_AUDIENCE``
    applied (an empty variable counts as unset); a bad value is a ConfigError naming the variable."""
    env = os.environ if environ is None else environ
    overrides: dict[str, str] = {}
    for name, field in ((ENV_MODE, "mode"), (ENV_ISSUER, "issuer"), (ENV_AUDIENCE, "audience")):
        value = env.get(name, "").strip()
        if value:
            overrides[field] = value
    if not overrides:
        return settings
    try:
        return AuthSettings.model_validate({**settings.model_dump(), **overrides})
    except ValidationError as exc:
        what = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'auth'}: {e['msg']}" for e in exc.errors())
        names = ", ".join(n for n in (ENV_MODE, ENV_ISSUER, ENV_AUDIENCE) if env.get(n, "").strip())
        raise ConfigError(
            f"auth settings with {names} from the environment are invalid: {what}",
            expected=f"{ENV_MODE} one of local, oidc, off",
        ) from exc


def check_off_mode(settings: AuthSettings, bind_hosts: Iterable[str]) -> None:
    """Refuse ``mode: off`` unless every listener (HTTP and each channel) binds to loopback.

    ``bind_hosts`` are the bind addresses of every enabled listener. Raises ConfigError naming the
    addresses that are not loopback; does nothing in the other modes.
    """
    if settings.mode != "off":
        return
    exposed = sorted({h for h in bind_hosts if not is_loopback_host(h)})
    if exposed:
        raise ConfigError(
            "auth mode off (no authentication) is refused: listeners bind to "
            f"{', '.join(repr(h) for h in exposed)}, which other hosts can reach",
            expected="mode local or oidc, or every listener bound to 127.0.0.1 / ::1",
        )

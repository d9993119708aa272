"""What the engine publishes about its authorization: ``/.well-known/smart-configuration`` (SMART App
Launch 2.x, "conformance") and the CapabilityStatement's ``rest.security`` with the SMART ``oauth-uris``
extension.

* ``oidc``: the OAuth endpoints are the provider's, copied from its discovery document.
* ``local``: the engine issues tokens with ``hms-ach token`` and has no OAuth endpoint, so the
  documents name only its JWKS (``/.well-known/jwks.json``) and the scopes it understands.
* ``off``: nothing is published (:func:`capability_security` returns None).

:func:`openapi_security` is the same for the OpenAPI document (``components.securitySchemes`` and
the document-wide ``security`` requirement).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hms_ach.auth.settings import AuthSettings

#: Where the local issuer's public keys are served, relative to the server root.
LOCAL_JWKS_PATH = "/.well-known/jwks.json"
OAUTH_URIS_EXTENSION = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SECURITY_SERVICE_SYSTEM = "http://terminology.hl7.org/CodeSystem/restful-security-service"

#: Scopes worth advertising: the wildcards of each context, in v2 and v1 form.
SCOPES_SUPPORTED = [
    "patient/*.rs",
    "patient/*.cruds",
    "user/*.rs",
    "user/*.cruds",
    "system/*.rs",
    "system/*.cruds",
    "patient/*.read",
    "patient/*.write",
    "user/*.read",
    "user/*.write",
    "system/*.read",
    "system/*.write",
]
#: SMART capabilities the resource server itself implements (scopes v1 and v2, patient and user
#: level permissions); the launch and client capabilities are the provider's business.
CAPABILITIES = ["permission-v1", "permission-v2", "permission-patient", "permission-user"]

# discovery member -> smart-configuration member (same names in both documents)
_COPIED = (
    "issuer",
    "jwks_uri",
    "authorization_endpoint",
    "token_endpoint",
    "token_endpoint_auth_methods_supported",
    "token_endpoint_auth_signing_alg_values_supported",
    "registration_endpoint",
    "introspection_endpoint",
    "revocation_endpoint",
    "grant_types_supported",
    "response_types_supported",
    "code_challenge_methods_supported",
)
# oauth-uris extension member -> discovery member
_OAUTH_URIS = (
    ("authorize", "authorization_endpoint"),
    ("token", "token_endpoint"),
    ("register", "registration_endpoint"),
    ("revoke", "revocation_endpoint"),
    ("introspect", "introspection_endpoint"),
)


def _client_capabilities(discovery: Mapping[str, Any]) -> list[str]:
    methods = discovery.get("token_endpoint_auth_methods_supported") or []
    out = []
    if "private_key_jwt" in methods:
        out.append("client-confidential-asymmetric")
    if "client_secret_basic" in methods or "client_secret_post" in methods:
        out.append("client-confidential-symmetric")
    return out


def smart_configuration(
    settings: AuthSettings, server_base_url: str, discovery: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``/.well-known/smart-configuration`` document.

    ``server_base_url`` is the engine's root URL as clients reach it (``https://host:8443``); in oidc
    mode ``discovery`` is the provider's discovery document (None while it has not been read: the
    document then names the issuer only).
    """
    doc: dict[str, Any] = {"capabilities": list(CAPABILITIES), "scopes_supported": list(SCOPES_SUPPORTED)}
    if settings.mode == "local":
        doc["jwks_uri"] = server_base_url.rstrip("/") + LOCAL_JWKS_PATH
        doc["grant_types_supported"] = []
        return doc
    if settings.mode == "oidc":
        doc["issuer"] = settings.issuer
        for name in _COPIED:
            if discovery is not None and name in discovery:
                doc[name] = discovery[name]
        if discovery is not None:
            doc["capabilities"] += _client_capabilities(discovery)
    return doc


def capability_security(
    settings: AuthSettings, discovery: Mapping[str, Any] | None = None, cors: bool = False
) -> dict[str, Any] | None:
    """The ``rest[0].security`` element of the CapabilityStatement, or None when auth is off.

    The ``oauth-uris`` extension lists the provider's endpoints (oidc, once its discovery document was
    read); the local issuer has none, so it has no such extension.
    """
    if settings.mode == "off":
        return None
    security: dict[str, Any] = {
        "cors": cors,
        "service": [
            {
                "coding": [
                    {"system": SECURITY_SERVICE_SYSTEM, "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}
                ],
                "text": "OAuth2 bearer tokens with SMART App Launch scopes (v1 and v2)",
            }
        ],
    }
    if settings.mode == "local":
        security["description"] = (
            "Bearer JWTs signed by this engine's own issuer (ES256; keys at "
            f"{LOCAL_JWKS_PATH}); tokens are issued with `hms-ach token`."
        )
        return security
    security["description"] = f"Bearer JWTs issued by the OpenID provider {settings.issuer}."
    uris = [
        {"url": name, "valueUri": discovery[member]}
        for name, member in _OAUTH_URIS
        if discovery is not None and isinstance(discovery.get(member), str)
    ]
    if uris:
        security["extension"] = [{"url": OAUTH_URIS_EXTENSION, "extension": uris}]
    return security


def openapi_security(settings: AuthSettings) -> tuple[dict[str, Any], list[dict[str, list[str]]]]:
    """``components.securitySchemes`` and the top-level ``security`` of the OpenAPI document: an HTTP
    bearer (JWT) scheme, and in oidc mode also the provider's OpenID Connect discovery URL. Both are
    empty when auth is off."""
    if settings.mode == "off":
        return {}, []
    schemes: dict[str, Any] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "An access token: `hms-ach token` (local mode) or the OpenID provider (oidc mode)",
        }
    }
    requirement: list[dict[str, list[str]]] = [{"bearer": []}]
    if settings.mode == "oidc" and settings.issuer:
        schemes["openid"] = {
            "type": "openIdConnect",
            "openIdConnectUrl": settings.issuer.rstrip("/") + "/.well-known/openid-configuration",
        }
        requirement.append({"openid": []})
    return schemes, requirement

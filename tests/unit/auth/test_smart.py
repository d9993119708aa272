"""/.well-known/smart-configuration and the CapabilityStatement's rest.security, per auth mode."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.capabilitystatement import CapabilityStatementRestSecurity

from hms_ach.auth import AuthSettings, capability_security, openapi_security, smart_configuration
from hms_ach.auth.smart import OAUTH_URIS_EXTENSION

OIDC = AuthSettings(mode="oidc", issuer="https://idp.example/realms/h", audience="hms-ach")
DISCOVERY: dict[str, Any] = {
    "issuer": "https://idp.example/realms/h",
    "jwks_uri": "https://idp.example/realms/h/certs",
    "authorization_endpoint": "https://idp.example/realms/h/auth",
    "token_endpoint": "https://idp.example/realms/h/token",
    "revocation_endpoint": "https://idp.example/realms/h/revoke",
    "introspection_endpoint": "https://idp.example/realms/h/introspect",
    "grant_types_supported": ["authorization_code", "client_credentials"],
    "token_endpoint_auth_methods_supported": ["private_key_jwt", "client_secret_basic"],
    "code_challenge_methods_supported": ["S256"],
    "userinfo_endpoint": "https://idp.example/realms/h/userinfo",
}


def test_local_mode_publishes_its_jwks_and_scopes() -> None:
    doc = smart_configuration(AuthSettings(), "https://engine.example:8443/")
    assert doc["jwks_uri"] == "https://engine.example:8443/.well-known/jwks.json"
    assert doc["grant_types_supported"] == [] and "token_endpoint" not in doc
    assert {"permission-v1", "permission-v2", "permission-patient"} <= set(doc["capabilities"])
    assert "patient/*.rs" in doc["scopes_supported"] and "patient/*.read" in doc["scopes_supported"]


def test_oidc_mode_copies_the_provider_endpoints() -> None:
    doc = smart_configuration(OIDC, "https://engine.example", DISCOVERY)
    assert doc["issuer"] == OIDC.issuer and doc["token_endpoint"] == DISCOVERY["token_endpoint"]
    assert doc["authorization_endpoint"] == DISCOVERY["authorization_endpoint"]
    assert doc["code_challenge_methods_supported"] == ["S256"]
    assert "userinfo_endpoint" not in doc
    assert {"client-confidential-asymmetric", "client-confidential-symmetric"} <= set(doc["capabilities"])
    before = smart_configuration(OIDC, "https://engine.example", None)
    assert before["issuer"] == OIDC.issuer and "token_endpoint" not in before


def test_rest_security_has_the_smart_oauth_uris_extension() -> None:
    security = capability_security(OIDC, DISCOVERY, cors=True)
    assert security is not None
    CapabilityStatementRestSecurity.model_validate(security)  # a valid FHIR R4 element
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    (ext,) = security["extension"]
    assert ext["url"] == OAUTH_URIS_EXTENSION
    uris = {e["url"]: e["valueUri"] for e in ext["extension"]}
    assert uris == {
        "authorize": DISCOVERY["authorization_endpoint"],
        "token": DISCOVERY["token_endpoint"],
        "revoke": DISCOVERY["revocation_endpoint"],
        "introspect": DISCOVERY["introspection_endpoint"],
    }


def test_rest_security_in_local_and_off_modes() -> None:
    local = capability_security(AuthSettings())
    assert local is not None and "extension" not in local and "hms-ach token" in local["description"]
    CapabilityStatementRestSecurity.model_validate(local)
    assert capability_security(AuthSettings(mode="off")) is None


def test_openapi_security_schemes() -> None:
    schemes, requirement = openapi_security(AuthSettings())
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    assert requirement == [{"bearer": []}]
    schemes, requirement = openapi_security(OIDC)
    assert (
        schemes["openid"]["openIdConnectUrl"]
        == "https://idp.example/realms/h/.well-known/openid-configuration"
    )
    assert requirement == [{"bearer": []}, {"openid": []}]
    assert openapi_security(AuthSettings(mode="off")) == ({}, [])

"""The local issuer of a fresh data directory, for the auth tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from hms_ach.auth import Authenticator, AuthSettings, create_authenticator
from hms_ach.auth.local_issuer import LocalSigningKey
from tests.unit.auth import jwt_forge


@dataclass
class LocalIssuer:
    settings: AuthSettings
    authenticator: Authenticator
    signing_key: LocalSigningKey
    private_key: ec.EllipticCurvePrivateKey
    data_dir: Path

    @property
    def kid(self) -> str:
        return self.signing_key.kid

    def claims(self, **overrides: Any) -> dict[str, Any]:
        return jwt_forge.claims(self.settings.effective_issuer, self.settings.effective_audience, **overrides)

    def token(self, header: dict[str, Any] | None = None, **overrides: Any) -> str:
        """A token signed with the issuer's own key (ES256, its kid) unless ``header`` says otherwise."""
        head = {"alg": "ES256", "typ": "at+jwt", "kid": self.kid, **(header or {})}
        return jwt_forge.forge(head, self.claims(**overrides), jwt_forge.es256(self.private_key))


@pytest.fixture
def local(tmp_path: Path) -> LocalIssuer:
    settings = AuthSettings(mode="local")
    data_dir = tmp_path / "data"
    authenticator = create_authenticator(settings, data_dir)
    assert authenticator.local_key is not None
    private_key = jwt_forge.load_private_key(authenticator.local_key.path)
    return LocalIssuer(settings, authenticator, authenticator.local_key, private_key, data_dir)

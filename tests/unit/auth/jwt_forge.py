"""Hand-made JWTs for the attack tests: any header, any claims, any signature.

Signing here uses ``cryptography`` directly (not joserfc), so that the tests do not check the
verifier with the library it is built on, and so that headers joserfc would refuse to write
(``alg: none``, ``jku``, ``crit``...) can be sent anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

Signer = Callable[[bytes], bytes]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def forge(header: dict[str, Any], claims: dict[str, Any], signer: Signer | None) -> str:
    """``header.claims.signature``; no signer: an empty signature."""
    signing_input = f"{b64json(header)}.{b64json(claims)}"
    signature = signer(signing_input.encode("ascii")) if signer is not None else b""
    return f"{signing_input}.{b64url(signature)}"


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def es256(key: ec.EllipticCurvePrivateKey) -> Signer:
    """ES256 as RFC 7518 section 3.4 says: ECDSA P-256 SHA-256, r || s, 32 bytes each."""

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def hs256(secret: bytes) -> Signer:
    def sign(data: bytes) -> bytes:
        return hmac.new(secret, data, hashlib.sha256).digest()

    return sign


def public_jwk(key: ec.EllipticCurvePrivateKey) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }


def thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members in lexicographic order, no whitespace."""
    members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    return b64url(
        hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    )


def claims(issuer: str, audience: str, **overrides: Any) -> dict[str, Any]:
    """Valid claims for ``issuer``/``audience`` (five minutes left), with ``overrides`` applied
    (a value of None removes the claim)."""
    now = int(time.time())
    out: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": "tester",
        "client_id": "forge",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
        "scope": "patient/*.read launch/patient openid",
        "patient": "p-1",
    }
    for name, value in overrides.items():
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out

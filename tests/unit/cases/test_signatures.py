"""Signatures of findings: what is signed (the canonical JSON), the JWS and its Provenance, and the
verification of each against its key, the version it names and the findings as they are now."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey

from hms_ach.cases.signatures import (
    SIGNATURE_EXT,
    SignerKeyError,
    SigningKey,
    canonical,
    provenance,
    public_keys,
    registered_key,
    sign,
    signed_version,
    verify,
    with_signature,
)

QR: dict[str, Any] = {
    "resourceType": "QuestionnaireResponse",
    "id": "q1",
    "meta": {"versionId": "1", "lastUpdated": "2026-12-06T10:00:00Z"},
    "status": "completed",
    "item": [{"linkId": "score", "answer": [{"valueInteger": 7}]}],
}


def _key() -> SigningKey:
    key = ECKey.generate_key("P-256", private=True)
    return SigningKey(key, key.thumbprint(), engine=True)


def _public(key: SigningKey) -> dict[str, ECKey]:
    return {key.kid: ECKey.import_key(key.key.as_dict(private=False))}


def _signed(key: SigningKey) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Provenance of QR version 1, the findings' version 2 carrying the signature)."""
    prov = provenance(
        "QuestionnaireResponse/q1/_history/1",
        "Task/t1",
        "Practitioner/d1",
        sign(QR, key),
        key,
        "2026-12-06T10:05:00Z",
    )
    prov["id"] = "p1"
    latest = {**with_signature(QR, "p1"), "meta": {"versionId": "2"}}
    return prov, latest


def test_canonical_json_leaves_out_meta_and_the_signature_and_sorts_keys() -> None:
    assert canonical(QR) == canonical(with_signature(QR, "p1"))
    assert canonical(QR).startswith(b'{"id":"q1","item":')
    assert canonical({**QR, "status": "amended"}) != canonical(QR)
    other = {"url": "urn:x", "valueString": "kept"}
    assert b"urn:x" in canonical({**QR, "extension": [other, {"url": SIGNATURE_EXT}]})


def test_a_signature_verifies_against_its_key_and_the_version_it_names() -> None:
    key = _key()
    prov, latest = _signed(key)
    assert signed_version(prov) == ("q1", 1)
    assert prov["agent"][0]["who"] == {"reference": "Practitioner/d1"}
    assert prov["agent"][1]["onBehalfOf"] == {"reference": "Practitioner/d1"}  # the engine's key
    token = base64.b64decode(prov["signature"][0]["data"]).decode()
    assert token.count(".") == 2  # compact JWS
    verdict = verify(prov, _public(key), QR, latest)
    assert verdict.valid and verdict.kid == key.kid and verdict.signer == "Practitioner/d1", verdict


def test_what_breaks_a_signature() -> None:
    key = _key()
    prov, latest = _signed(key)
    changed = {**latest, "status": "amended", "meta": {"versionId": "3"}}
    assert (
        verify(prov, _public(key), QR, changed).reason
        == "the findings changed after they were signed (now version 3)"
    )
    assert "is not that of" in verify(prov, _public(key), {**QR, "status": "amended"}, latest).reason
    assert verify(prov, _public(_key()), QR, latest).reason == "the JWS names a key this engine does not know"
    other = _key()
    assert (
        verify(prov, {key.kid: _public(other)[other.kid]}, QR, latest).reason
        == "the JWS does not verify with its key"
    )
    assert "is not stored" in verify(prov, _public(key), None, latest).reason
    garbled = {**prov, "signature": [{**prov["signature"][0], "data": base64.b64encode(b"x.y").decode()}]}
    assert not verify(garbled, _public(key), QR, latest).valid
    assert verify({**prov, "signature": []}, _public(key), QR, latest).reason.startswith(
        "no application/jose"
    )


def test_a_signers_registered_key(tmp_path: Path) -> None:
    key = ECKey.generate_key("P-256", private=True)
    path = tmp_path / "d1.pem"
    path.write_bytes(key.as_pem(private=True))
    path.chmod(0o600)
    own = registered_key(tmp_path, "d1")
    assert own is not None and not own.engine and own.kid == key.thumbprint()
    assert registered_key(tmp_path, "d2") is None  # none registered: the engine signs on behalf
    assert registered_key(tmp_path, "../d1") is None  # never a path outside the folder
    prov = provenance(
        "QuestionnaireResponse/q1/_history/1", "Task/t1", "Practitioner/d1", sign(QR, own), own, "x"
    )
    assert len(prov["agent"]) == 1 and "onBehalfOf" not in prov["signature"][0]
    engine = _key()
    keys = public_keys(tmp_path, engine)
    assert set(keys) == {engine.kid, own.kid}
    path.chmod(0o644)
    with pytest.raises(SignerKeyError, match="others may read"):
        registered_key(tmp_path, "d1")
    assert set(public_keys(tmp_path, engine)) == {engine.kid}  # an unusable file is left out

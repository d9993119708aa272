"""Electronic signatures of a case's findings: a compact JWS (ES256, joserfc) in a FHIR Provenance.

What is signed is the canonical JSON of one version of the QuestionnaireResponse: its keys sorted,
no separators' whitespace, without ``meta`` and without the signature extension (so adding the
signature to the findings, their next version, does not change what was signed). The JWS payload is
that JSON itself; the Provenance names the version (``target[0]`` is
``QuestionnaireResponse/<id>/_history/<n>``) and the case (``target[1]``, ``Task/<id>``).

The key: the signer's own key when one is registered for them (:func:`registered_key`: a PEM file
``signer_keys/<Practitioner id>.pem`` in the engine's data directory), else the engine's signing key
(the local issuer's EC P-256 key, :mod:`hms_ach.auth.local_issuer`) signs on their behalf. The JWS header
``kid`` names the key; when the engine signed, ``Provenance.agent[1]`` is the engine acting
``onBehalfOf`` the signer and ``signature[0].who`` is the engine (``onBehalfOf`` the signer).

:func:`verify` checks a Provenance: the JWS against the key its ``kid`` names, the payload against
the canonical JSON of the version it names, and that the findings have not changed since (their
latest version's canonical JSON is the same).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

#: QuestionnaireResponse.extension: a signature of the findings (valueReference Provenance/<id>).
SIGNATURE_EXT = "urn:hms-ach:fhir:StructureDefinition/signature"
#: Provenance.signature.type: author's signature (ASTM E1762-95).
SIGNATURE_TYPE = {"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.1"}
SIG_FORMAT = "application/jose"
#: The identifier system of the engine's key as an agent (value: the key's kid).
ENGINE_KEY_SYSTEM = "urn:hms-ach:id:signing-key"
#: The one algorithm signatures are made and accepted with.
ALGORITHM = "ES256"
#: The folder of the data directory holding the signers' own keys: ``<Practitioner id>.pem``.
SIGNER_KEYS_DIR = "signer_keys"
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-.]{0,63}$")


@dataclass(frozen=True)
class SigningKey:
    """A private key that signs, its ``kid``, and whether it is the engine's (signing on behalf)."""

    key: ECKey
    kid: str
    engine: bool


@dataclass(frozen=True)
class Verdict:
    """One signature checked: which Provenance, whether it holds, and why not."""

    provenance: str
    valid: bool
    reason: str
    signer: str | None
    target: str | None
    kid: str | None
    when: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "provenance": self.provenance,
            "valid": self.valid,
            "reason": self.reason,
            "signer": self.signer,
            "target": self.target,
            "kid": self.kid,
            "when": self.when,
        }


class SignerKeyError(Exception):
    """A signer's registered key file that cannot be used (readable by others, not EC P-256)."""


def registered_key(directory: Path, practitioner_id: str) -> SigningKey | None:
    """The signer's own key: ``directory/<practitioner_id>.pem`` (PKCS#8 PEM, EC P-256, mode 0600);
    None when none is registered. :class:`SignerKeyError` for a file that cannot be used."""
    if not _KEY_NAME.match(practitioner_id):
        return None
    path = directory / f"{practitioner_id}.pem"
    try:
        mode = path.stat().st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SignerKeyError(f"{path}: others may read the key (mode {stat.S_IMODE(mode):o}); chmod 600")
        key = ECKey.import_key(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, JoseError, ValueError, TypeError) as exc:
        raise SignerKeyError(f"{path}: not a readable EC private key ({type(exc).__name__})") from exc
    if key.as_dict().get("crv") != "P-256" or not key.is_private:
        raise SignerKeyError(f"{path}: not an EC P-256 private key")
    return SigningKey(key, key.thumbprint(), engine=False)


def public_keys(directory: Path, engine: SigningKey | None) -> dict[str, ECKey]:
    """The public keys signatures are checked with, by kid: the engine's and every registered
    signer's (a file that cannot be used is left out)."""
    keys = [engine] if engine is not None else []
    for path in sorted(directory.glob("*.pem")) if directory.is_dir() else []:
        try:
            found = registered_key(directory, path.stem)
        except SignerKeyError:
            continue
        if found is not None:
            keys.append(found)
    return {k.kid: ECKey.import_key(k.key.as_dict(private=False)) for k in keys}


def canonical(response: Mapping[str, Any]) -> bytes:
    """The bytes signed for a QuestionnaireResponse version: sorted keys, no ``meta``, no signature
    extension (an emptied ``extension`` dropped)."""
    body = {k: copy.deepcopy(v) for k, v in response.items() if k != "meta"}
    extensions = [
        e for e in body.get("extension") or [] if not (isinstance(e, dict) and e.get("url") == SIGNATURE_EXT)
    ]
    if extensions:
        body["extension"] = extensions
    else:
        body.pop("extension", None)
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sign(response: Mapping[str, Any], key: SigningKey) -> str:
    """The compact JWS (ES256) over :func:`canonical` of ``response``."""
    header = {"alg": ALGORITHM, "kid": key.kid, "cty": "application/fhir+json"}
    return jws.serialize_compact(header, canonical(response), key.key, algorithms=[ALGORITHM])


def provenance(
    response_ref: str, case_ref: str, signer: str, token: str, key: SigningKey, when: str
) -> dict[str, Any]:
    """The Provenance of a signature: ``response_ref`` (versioned) signed by ``signer``
    (``Practitioner/<id>``) with ``key`` at ``when``."""
    engine_agent = {"identifier": {"system": ENGINE_KEY_SYSTEM, "value": key.kid}, "display": "hms-ach"}
    author_type = {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}
        ]
    }
    agents: list[dict[str, Any]] = [{"type": author_type, "who": {"reference": signer}}]
    signature: dict[str, Any] = {
        "type": [SIGNATURE_TYPE],
        "when": when,
        "who": {"reference": signer},
        "targetFormat": "application/fhir+json",
        "sigFormat": SIG_FORMAT,
        "data": base64.b64encode(token.encode("ascii")).decode("ascii"),
    }
    if key.engine:
        agents.append({"who": engine_agent, "onBehalfOf": {"reference": signer}})
        signature["who"] = engine_agent
        signature["onBehalfOf"] = {"reference": signer}
    return {
        "resourceType": "Provenance",
        "target": [{"reference": response_ref}, {"reference": case_ref}],
        "recorded": when,
        "activity": {
            "coding": [
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "AUT"}
            ]
        },
        "agent": agents,
        "entity": [{"role": "source", "what": {"reference": response_ref}}],
        "signature": [signature],
    }


def with_signature(response: Mapping[str, Any], provenance_id: str) -> dict[str, Any]:
    """``response`` (without ``meta``) carrying the signature extension naming ``Provenance/<id>``."""
    body = {k: copy.deepcopy(v) for k, v in response.items() if k != "meta"}
    ext = {"url": SIGNATURE_EXT, "valueReference": {"reference": f"Provenance/{provenance_id}"}}
    body["extension"] = [*(body.get("extension") or []), ext]
    return body


def signed_version(prov: Mapping[str, Any]) -> tuple[str, int] | None:
    """(QuestionnaireResponse id, version) that a Provenance names in ``target[0]``."""
    targets = prov.get("target") or []
    ref = targets[0].get("reference") if targets and isinstance(targets[0], dict) else None
    if not isinstance(ref, str):
        return None
    parts = ref.split("/")
    if (
        len(parts) != 4
        or parts[0] != "QuestionnaireResponse"
        or parts[2] != "_history"
        or not parts[3].isdigit()
    ):
        return None
    return parts[1], int(parts[3])


def _token(prov: Mapping[str, Any]) -> str | None:
    sigs = prov.get("signature") or []
    sig = sigs[0] if sigs and isinstance(sigs[0], dict) else {}
    data = sig.get("data")
    if sig.get("sigFormat") != SIG_FORMAT or not isinstance(data, str):
        return None
    try:
        return base64.b64decode(data, validate=True).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


def verify(
    prov: Mapping[str, Any],
    keys: Mapping[str, ECKey],
    signed: Mapping[str, Any] | None,
    latest: Mapping[str, Any] | None,
) -> Verdict:
    """Check the signature of ``prov``: ``keys`` by kid (public keys), ``signed`` the findings version
    it names (None: not stored), ``latest`` the findings as they are now."""
    target = signed_version(prov)
    sigs = prov.get("signature") or [{}]
    when = sigs[0].get("when") if isinstance(sigs[0], dict) else None
    agents = prov.get("agent") or [{}]
    who = (agents[0].get("who") or {}) if isinstance(agents[0], dict) else {}
    signer = who.get("reference") if isinstance(who, dict) else None
    ref = f"QuestionnaireResponse/{target[0]}/_history/{target[1]}" if target else None

    def verdict(valid: bool, reason: str, kid: str | None = None) -> Verdict:
        return Verdict(f"Provenance/{prov.get('id')}", valid, reason, signer, ref, kid, when)

    token = _token(prov)
    if token is None:
        return verdict(False, "no application/jose signature in signature[0].data")
    try:
        header = jws.extract_compact(token.encode("ascii")).protected
    except (JoseError, ValueError) as exc:
        return verdict(False, f"signature[0].data is not a compact JWS ({type(exc).__name__})")
    kid = header.get("kid") if isinstance(header.get("kid"), str) else None
    key = keys.get(kid or "")
    if key is None:
        return verdict(False, "the JWS names a key this engine does not know", kid)
    try:
        payload = jws.deserialize_compact(token, key, algorithms=[ALGORITHM]).payload
    except (JoseError, ValueError):
        return verdict(False, "the JWS does not verify with its key", kid)
    if target is None:
        return verdict(False, "target[0] names no QuestionnaireResponse version", kid)
    if signed is None:
        return verdict(False, f"{ref} is not stored", kid)
    if payload != canonical(signed):
        return verdict(False, f"the signed content is not that of {ref}", kid)
    if latest is None or canonical(latest) != payload:
        version = (latest or {}).get("meta", {}).get("versionId")
        return verdict(False, f"the findings changed after they were signed (now version {version})", kid)
    return verdict(True, f"signed content matches {ref} ({digest(payload)})", kid)

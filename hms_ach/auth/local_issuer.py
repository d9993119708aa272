"""The embedded token issuer of ``auth.mode: local``.

On first use the engine creates an EC P-256 key in its data directory (``Config.data_dir``):

* the directory is created with mode 0700 (an existing one is left as it is);
* the key is written as PKCS#8 PEM to ``token_signing_key.pem`` with mode 0600, atomically: written to
  a temporary file, flushed to disk, then linked into place, so that a crash never leaves half a key
  and two processes starting at once end up with the same key (the second one reads the first's);
* a key file that the group or others may read is refused (like ssh does with its keys).

The key is never logged nor printed. :func:`public_jwks` is the JWKS to publish (the public key, with
``kid`` its RFC 7638 thumbprint); :func:`issue_token` signs the tokens ``hms-ach token`` prints.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import ECKey

from hms_ach.auth.settings import LOCAL_ALGORITHM, AuthSettings
from hms_ach.core.errors import ConfigError

#: The file name of the local signing key inside the data directory.
KEY_FILE_NAME = "token_signing_key.pem"


class KeyFileError(ConfigError):
    """The local signing key cannot be created or read (permissions, a damaged file)."""


@dataclass(frozen=True)
class LocalSigningKey:
    """The local issuer's key: the private key (for signing) and its ``kid``."""

    key: ECKey
    kid: str
    path: Path

    def public_jwk(self) -> dict[str, Any]:
        data = dict(self.key.as_dict(private=False))
        data.update({"kid": self.kid, "alg": LOCAL_ALGORITHM, "use": "sig"})
        return data


def key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILE_NAME


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can open a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _create(path: Path) -> None:
    """Write a new key to ``path`` unless one is there already (never replaces a key)."""
    key = ECKey.generate_key("P-256", private=True)
    pem = key.as_pem(private=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)  # fails if another process created the key first: theirs wins
        except FileExistsError:
            pass
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def load_or_create_key(data_dir: Path) -> LocalSigningKey:
    """The local signing key of ``data_dir``, created on first use (see the module docstring).

    Raises :class:`KeyFileError` when the directory or the key cannot be created, when the key file is
    readable by the group or others, or when it does not hold an EC P-256 private key.
    """
    path = key_path(data_dir)
    try:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            _create(path)
        info = path.stat()
        if os.name == "posix" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(
                f"{path}: the token signing key may be read by others (mode {stat.S_IMODE(info.st_mode):o})",
                expected="mode 600: chmod 600 " + str(path),
            )
        pem = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(
            f"{path}: cannot create or read the token signing key ({exc.strerror or type(exc).__name__})",
            expected=f"a data directory the engine may write (HMS_ACH_DATA_DIR or engine.data_dir): {data_dir}",
        ) from exc
    try:
        key = ECKey.import_key(pem)
    except (JoseError, ValueError, TypeError) as exc:
        raise KeyFileError(
            f"{path}: not an EC private key", expected="the PEM file hms-ach created, or remove it"
        ) from exc
    if key.as_dict().get("crv") != "P-256" or not key.is_private:
        raise KeyFileError(f"{path}: not an EC P-256 private key", expected="the PEM file hms-ach created")
    return LocalSigningKey(key, key.thumbprint(), path)


def public_jwks(signing_key: LocalSigningKey) -> dict[str, Any]:
    """The JWKS of the local issuer: its one public key, ``kid`` = RFC 7638 thumbprint."""
    return {"keys": [signing_key.public_jwk()]}


@dataclass(frozen=True)
class TokenRequest:
    """What ``hms-ach token`` puts in a token."""

    scope: str
    sub: str = "hms-ach-cli"
    patient: str | None = None
    roles: tuple[str, ...] = ()
    employee_id: str | None = None
    departments: tuple[str, ...] = ()
    ttl_seconds: int | None = None
    client_id: str = "hms-ach-cli"


def _nest(path: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": value}}`` for the dotted path ``a.b``."""
    out: dict[str, Any] = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def token_ttl(settings: AuthSettings, ttl_seconds: int | None) -> int:
    """The lifetime of a token: ``ttl_seconds`` or the default; ValueError past the maximum."""
    ttl = ttl_seconds if ttl_seconds is not None else settings.local_token_ttl_seconds
    if ttl <= 0 or ttl > settings.local_max_token_ttl_seconds:
        raise ValueError(f"a token lifetime must be 1 to {settings.local_max_token_ttl_seconds} seconds")
    return ttl


def issue_token(
    settings: AuthSettings, signing_key: LocalSigningKey, request: TokenRequest, now: float | None = None
) -> str:
    """A JWT access token (RFC 9068 ``typ: at+jwt``) signed with the local key.

    Claims: ``iss`` and ``aud`` from the settings, ``sub``, ``client_id``, ``iat``, ``nbf``, ``exp``,
    ``jti``, ``scope``, and when given ``patient``, the roles at ``auth.roles_claim``, ``employee_id``
    and ``department``. Raises ValueError for a TTL over ``auth.local_max_token_ttl_seconds``.
    """
    ttl = token_ttl(settings, request.ttl_seconds)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": settings.effective_issuer,
        "aud": settings.effective_audience,
        "sub": request.sub,
        "client_id": request.client_id,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": secrets.token_urlsafe(16),
        "scope": " ".join(request.scope.split()),
    }
    if request.patient:
        claims["patient"] = request.patient
    if request.roles:
        roles = _nest(settings.roles_claim, list(request.roles))
        head = next(iter(roles))
        claims[head] = roles[head]
    if request.employee_id:
        claims["employee_id"] = request.employee_id
    if request.departments:
        claims["department"] = list(request.departments)
    header = {"alg": LOCAL_ALGORITHM, "kid": signing_key.kid, "typ": "at+jwt"}
    return jwt.encode(header, claims, signing_key.key, algorithms=[LOCAL_ALGORITHM])


def parse_ttl(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``1h``, ``7d`` -> seconds; ValueError otherwise."""
    value = text.strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (value[:-1], value[-1]) if value and value[-1] in units else (value, "s")
    if not number.isdigit() or int(number) <= 0:
        raise ValueError(f"{text!r}: expected a lifetime like 3600, 15m, 1h or 7d")
    return int(number) * units[unit]


def split_values(values: Iterable[str]) -> tuple[str, ...]:
    """Repeated or comma-separated option values, once each, in order."""
    out: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    return tuple(out)

"""The audit key and what the trail does with it: :class:`AuditSeal`.

The audit entries are chained with HMAC-SHA256 under a key that is not in the database (a file in
the engine's data directory, or a mounted secret), so that someone who can write the database but
not read that file cannot recompute the chain after an edit. From the one key three are derived
(domain separation): one for the entries, one for the signed checkpoints
(:mod:`hms_ach.store.audit_checkpoints`), one for the masked values of the diffs
(:mod:`hms_ach.store.audit_mask`).

The composition root opens the seal (:func:`open_seal`) and attaches it to a store
(:func:`install`); the audit listener finds it from the connection it writes on
(:func:`seal_for`). A store without a seal (a script, a test that builds no engine) writes the
plain SHA-256 chain of earlier versions, with the default masking.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection
from sqlalchemy.engine import Engine

from hms_ach.core.errors import ConfigError
from hms_ach.store.audit_settings import AuditSettings
from hms_ach.store.db import Store

log = logging.getLogger("hms_ach.store.audit_keys")

KEY_FILE_ENV = "HMS_ACH_AUDIT_KEY_FILE"
DEFAULT_KEY_FILE = "audit.key"
DEFAULT_CHECKPOINT_FILE = "audit-checkpoints.jsonl"
KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 4096


class AuditKeyError(ConfigError):
    """The audit key file cannot be read, created or understood."""


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """HMAC-SHA256 of ``data`` under ``key``, without giving up the interpreter lock.

    ``hmac.digest`` (OpenSSL's one-shot HMAC) releases the lock around every call, however short:
    the thread must then wait to take it back, up to the switch interval while another thread runs
    Python. The writer hashes each audit entry (and the access log each record) while the event
    loop parses and answers: beside a busy thread one such call took about 0.6 ms instead of 2 us
    (1,768 against 283,908 calls a second). ``hmac.new(...).digest()`` keeps the lock for inputs
    under 2 KiB and gives the same bytes."""
    return hmac.new(key, data, hashlib.sha256).digest()


def _derive(key: bytes, purpose: str) -> bytes:
    return hmac.new(key, f"hms-ach audit {purpose} v1".encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class AuditSeal:
    """The audit key (or none: the plain chain) with the paths and the masking rules of one store."""

    key: bytes | None = None
    key_path: Path | None = None
    checkpoint_path: Path | None = None
    mask_systems: frozenset[str] = frozenset(AuditSettings().mask_identifier_systems)
    mask_fields: frozenset[str] = frozenset(AuditSettings().mask_fields)
    entry_key: bytes | None = field(default=None, init=False, repr=False)
    checkpoint_key: bytes | None = field(default=None, init=False, repr=False)
    mask_key: bytes | None = field(default=None, init=False, repr=False)
    key_id: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.key is not None:
            object.__setattr__(self, "entry_key", _derive(self.key, "entry"))
            object.__setattr__(self, "checkpoint_key", _derive(self.key, "checkpoint"))
            object.__setattr__(self, "mask_key", _derive(self.key, "mask"))
            object.__setattr__(self, "key_id", _derive(self.key, "key id").hex()[:16])


DEFAULT_SEAL = AuditSeal()


# ---------------------------------------------------------------------------- the key file
def key_path(settings: AuditSettings, data_dir: Path) -> Path:
    """HMS_ACH_AUDIT_KEY_FILE, else ``audit.key_file``, else ``audit.key`` in the data directory."""
    configured = os.environ.get(KEY_FILE_ENV) or settings.key_file
    path = Path(configured) if configured else Path(DEFAULT_KEY_FILE)
    return path if path.is_absolute() else data_dir / path


def checkpoint_path(settings: AuditSettings, data_dir: Path) -> Path:
    path = Path(settings.checkpoint_file or DEFAULT_CHECKPOINT_FILE)
    return path if path.is_absolute() else data_dir / path


def _expected() -> str:
    return f"{KEY_BYTES * 2} or more hex digits (e.g. from `openssl rand -hex {KEY_BYTES}`)"


def load_key(path: Path) -> bytes:
    """The key in ``path`` (hex digits, surrounding whitespace ignored)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_KEY_FILE_BYTES + 1)
        mode = path.stat().st_mode
    except OSError as exc:
        raise AuditKeyError(
            f"audit key {path}: cannot read it ({exc.strerror})", expected=_expected()
        ) from exc
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise AuditKeyError(f"audit key {path}: the file is too large", expected=_expected())
    text = raw.strip()
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise AuditKeyError(f"audit key {path}: not hex digits", expected=_expected()) from exc
    if len(key) < KEY_BYTES:
        raise AuditKeyError(f"audit key {path}: {len(key)} bytes is too short", expected=_expected())
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("audit.key_readable_by_others", extra={"path": str(path), "mode": oct(mode & 0o777)})
    return key


def ensure_data_dir(path: Path) -> None:
    """Create the data directory (mode 0700) unless it exists."""
    if path.is_dir():
        return
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise AuditKeyError(f"data directory {path}: cannot create it ({exc.strerror})") from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_key(path: Path) -> bytes:
    """A new random key written to ``path`` (mode 0600) atomically: a temporary file is written and
    synced, then linked to ``path``, which fails if another process created it first (its key is
    then read and used)."""
    ensure_data_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (secrets.token_bytes(KEY_BYTES).hex() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race: use its key
        _fsync_dir(path.parent)
    except OSError as exc:
        raise AuditKeyError(f"audit key {path}: cannot create it ({exc.strerror})") from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.info("audit.key_created", extra={"path": str(path)})
    return load_key(path)


def open_seal(settings: AuditSettings, data_dir: Path, *, create: bool) -> AuditSeal:
    """The seal of ``settings``: the key is read, or created when missing and ``create`` (the
    engine); without ``create`` (``hms-ach audit verify``) a missing key leaves the seal keyless."""
    path = key_path(settings, data_dir)
    if path.exists():
        key: bytes | None = load_key(path)
    elif create:
        key = create_key(path)
    else:
        key = None
    return AuditSeal(
        key=key,
        key_path=path,
        checkpoint_path=checkpoint_path(settings, data_dir),
        mask_systems=frozenset(settings.mask_identifier_systems),
        mask_fields=frozenset(settings.mask_fields),
    )


# ---------------------------------------------------------------------------- per store
_seals: weakref.WeakKeyDictionary[Engine, AuditSeal] = weakref.WeakKeyDictionary()


def attach(store: Store, seal: AuditSeal) -> None:
    """Make the audit trail of ``store`` (every write connection of it) use ``seal``."""
    _seals[store.writer] = seal
    if store.reader is not store.writer:
        _seals[store.reader] = seal


def planned_seal() -> AuditSeal | None:
    """The seal a write planned before the writer (a transaction Bundle's entries) can make its
    audit diffs with: the one every store of the process uses (:data:`DEFAULT_SEAL` when none is
    attached), or None when stores use different seals. The writer uses such a diff only when it
    was made with the seal of its own store (:func:`seal_for`), so a wrong guess costs nothing."""
    seals = {id(seal): seal for seal in _seals.values()}
    if not seals:
        return DEFAULT_SEAL
    return next(iter(seals.values())) if len(seals) == 1 else None


def seal_for(conn: Connection) -> AuditSeal:
    """The seal of the store ``conn`` belongs to (:data:`DEFAULT_SEAL` if none was attached)."""
    return _seals.get(conn.engine, DEFAULT_SEAL)

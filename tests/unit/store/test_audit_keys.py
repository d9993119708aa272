"""The audit key file (hms_ach/store/audit_keys.py): created once, private, atomically; errors say
what is wrong with a key file and what is expected."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

import pytest

from hms_ach.store.audit_keys import KEY_FILE_ENV, AuditKeyError, create_key, hmac_sha256, load_key, open_seal
from hms_ach.store.audit_settings import AuditSettings


def test_first_start_creates_a_private_key_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    seal = open_seal(AuditSettings(), data, create=True)
    assert seal.key is not None and len(seal.key) == 32
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE((data / "audit.key").stat().st_mode) == 0o600
    assert [p.name for p in data.iterdir()] == ["audit.key"]  # no temporary file left
    again = open_seal(AuditSettings(), data, create=True)
    assert again.key == seal.key and again.key_id == seal.key_id
    assert create_key(data / "audit.key") == seal.key  # a second creator uses the first one's key


def test_verify_never_creates_a_key(tmp_path: Path) -> None:
    seal = open_seal(AuditSettings(), tmp_path / "data", create=False)
    assert seal.key is None and not (tmp_path / "data").exists()


def test_mounted_secret_from_setting_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.hex"
    secret.write_text("ab" * 32 + "\n")
    seal = open_seal(AuditSettings(key_file=str(secret)), tmp_path / "data", create=True)
    assert seal.key == bytes.fromhex("ab" * 32)
    other = tmp_path / "other.hex"
    other.write_text("cd" * 40)
    monkeypatch.setenv(KEY_FILE_ENV, str(other))
    assert open_seal(
        AuditSettings(key_file=str(secret)), tmp_path / "data", create=True
    ).key == bytes.fromhex("cd" * 40)


@pytest.mark.parametrize(
    ("content", "what"), [("not hex at all", "not hex digits"), ("abcd", "too short"), ("", "too short")]
)
def test_bad_key_file_is_refused_with_what_is_expected(tmp_path: Path, content: str, what: str) -> None:
    path = tmp_path / "audit.key"
    path.write_text(content)
    with pytest.raises(AuditKeyError) as info:
        load_key(path)
    assert what in str(info.value) and "64 or more hex digits" in str(info.value)
    assert content not in str(info.value) or not content


def test_unreadable_key_file_is_named(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = tmp_path / "audit.key"
    path.write_text("ab" * 32)
    path.chmod(0)
    with pytest.raises(AuditKeyError, match="cannot read it"):
        load_key(path)


def test_the_lock_keeping_hmac_gives_the_bytes_of_the_one_shot_hmac() -> None:
    """Stored chains were hashed with ``hmac.digest``: ``hmac_sha256`` must give the same bytes."""
    for key, data in ((b"k" * 32, b""), (b"\x00" * 32, b'{"a":1}'), (b"key", b"x" * 5000)):
        assert hmac_sha256(key, data) == hmac.digest(key, data, "sha256")

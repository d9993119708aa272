"""What ``hms-ach audit verify`` can name is documented (docs/audit.md), and the chain's hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hms_ach.store import audit
from hms_ach.store.audit_keys import AuditSeal

#: What the SHA-256 chain of earlier versions gave the row of the test below.
OLD_HASH = "7f6af3f421b1ce4d8e6781058e122808e6385ca6397fa734713064ee9784b563"
DOC = Path(__file__).resolve().parents[3] / "docs" / "audit.md"


def test_every_problem_verify_names_is_documented() -> None:
    text = DOC.read_text(encoding="utf-8")
    missing = [name for name in audit.PROBLEMS if f"| `{name}` |" not in text]
    assert not missing, f"docs/audit.md lacks a row for {missing}"


def test_keyed_hash_depends_on_the_key_and_plain_hash_is_unchanged() -> None:
    row: dict[str, Any] = {
        k: "x" for k in ("recorded", "agent", "action", "entity_type", "entity_id", "diff", "prev_hash")
    }
    row.update(version_id=1, message_id=None)
    # the plain chain of earlier versions, byte for byte: databases written by them keep verifying
    assert audit.plain_hash(row) == audit.entry_hash(row) == OLD_HASH
    one, two = AuditSeal(key=b"1" * 32), AuditSeal(key=b"2" * 32)
    assert audit.entry_hash(row, one) != audit.entry_hash(row, two) != audit.plain_hash(row)
    assert len(audit.entry_hash(row, one)) == 64  # fits the hash column of earlier databases

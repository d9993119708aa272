"""The access records against someone with database access (issue 14 items 5 and 6): the records are
chained under the audit key and their head is signed in every checkpoint, so ``hms-ach audit verify``
names an edited record, records deleted from the middle and a deleted tail. Each tampering is made
with SQL straight on the store, as such an attacker would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.store import access_log, audit
from hms_ach.store.audit_settings import AuditSettings
from hms_ach.store.db import Store
from tests.integration.test_audit_chain import checkpoint, write_records

pytestmark = pytest.mark.timeout(120)


def read_patients(store: Store, first: int, count: int) -> None:
    """``count`` access records in one batch, as the access log's thread writes them."""
    sub, actor = access_log.http_actor(None, "127.0.0.1")
    accesses = [
        access_log.Access("read", "Patient", 200, sub, actor, [f"Patient/{n}"])
        for n in range(first, first + count)
    ]
    with store.transaction() as tx:
        access_log.insert(tx, accesses)


def verify(store: Store, config: Path) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli_app, ["audit", "verify", "--config", str(config), "--database", store.url]
    )
    return result.exit_code, result.output.strip()


def access_rows(store: Store) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM access_record ORDER BY seq"))]


@pytest.fixture
def trail(store: Store, tmp_path: Path) -> Path:
    """A keyed trail (3 change entries) and 10 access records in two batches, with a checkpoint at
    their heads; returns its channels.yaml."""
    config = tmp_path / "channels.yaml"
    config.write_text("engine:\n  data_dir: engine-data\n")
    audit.install(store, AuditSettings(), tmp_path / "engine-data")
    write_records(store, 1, 3)
    read_patients(store, 1, 6)
    read_patients(store, 7, 4)
    checkpoint(store)
    return config


def test_chained_records_verify_and_link_in_order(store: Store, trail: Path) -> None:
    rows = access_rows(store)
    assert [r["prev_hash"] for r in rows[1:]] == [r["hash"] for r in rows[:-1]]  # across batches too
    assert rows[0]["prev_hash"] == audit.GENESIS
    code, out = verify(store, trail)
    assert code == 0 and out.startswith("intact: 3 entries") and "10 access records chained" in out, out


def test_edited_record_is_named(store: Store, trail: Path) -> None:
    with store.transaction() as tx:
        tx.execute(text("UPDATE access_record SET sub = 'nobody' WHERE seq = 4"))
    code, out = verify(store, trail)
    assert code == 1 and out.startswith("audit trail NOT intact: edited-access-record: access record 4 "), out


def test_records_deleted_from_the_middle_are_named(store: Store, trail: Path) -> None:
    with store.transaction() as tx:
        tx.execute(text("DELETE FROM access_record WHERE seq IN (5, 6)"))
    code, out = verify(store, trail)
    assert code == 1, out
    assert out.startswith(
        "audit trail NOT intact: deleted-access-records: access records were deleted after access record 4"
    ), out


def test_deleted_tail_is_named_against_the_checkpoint(store: Store, trail: Path) -> None:
    with store.transaction() as tx:
        tx.execute(text("DELETE FROM access_record WHERE seq > 7"))
    code, out = verify(store, trail)
    assert code == 1, out
    assert out.startswith("audit trail NOT intact: truncated-access-records: the access records end at 7"), (
        out
    )
    assert "recorded 10 up to record 10" in out


def test_relinking_without_the_key_is_caught(store: Store, trail: Path) -> None:
    """Deleting record 5 and relinking record 6 to record 4 needs the key: the plain hash is refused."""
    rows = {r["seq"]: r for r in access_rows(store)}
    with store.transaction() as tx:
        tx.execute(text("DELETE FROM access_record WHERE seq = 5"))
        row = rows[6] | {"prev_hash": rows[4]["hash"]}
        tx.execute(
            text("UPDATE access_record SET prev_hash = :p, hash = :h WHERE seq = 6"),
            {"p": row["prev_hash"], "h": access_log.row_hash(row, None)},
        )
    code, out = verify(store, trail)
    assert code == 1 and "edited-access-record: access record 6 " in out, out


def test_records_after_the_last_checkpoint_verify_and_the_next_checkpoint_counts_them(
    store: Store, trail: Path
) -> None:
    read_patients(store, 11, 5)
    assert verify(store, trail)[0] == 0
    checkpoint(store)
    with store.transaction() as tx:
        tx.execute(text("DELETE FROM access_record WHERE seq > 12"))
    code, out = verify(store, trail)
    assert code == 1 and "recorded 15 up to record 15" in out, out

"""The audit trail against someone with database access (issue 14 item 6): each tampering is made
with SQL straight on the store, as such an attacker would, and ``hms-ach audit verify`` must exit 1
naming it; the untouched trail verifies as intact against its last signed checkpoint."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from hms_ach.app.cli import app as cli_app
from hms_ach.app.jobs import job_names, load_job
from hms_ach.core.records import RecordWrite
from hms_ach.store import audit
from hms_ach.store.audit_checkpoints import AuditCheckpointSettings
from hms_ach.store.audit_settings import AuditSettings
from hms_ach.store.db import Store
from hms_ach.store.repository import Repository

pytestmark = pytest.mark.timeout(120)


def write_records(store: Store, first: int, count: int) -> None:
    """``count`` record changes, one transaction each: one audit entry each."""
    for n in range(first, first + count):
        rec = RecordWrite("p", "Practitioner", "urn:x", f"P{n}", {"name": [{"family": f"F{n}"}]})
        with store.transaction() as tx:
            Repository(tx).upsert(rec, rec.content, None)


def checkpoint(store: Store) -> str:
    """One run of the registered ``audit_checkpoint`` job, as the scheduler runs it."""
    with store.transaction() as tx:
        return load_job("audit_checkpoint").run(tx, AuditCheckpointSettings())


def verify(store: Store, config: Path) -> tuple[int, str]:
    result = CliRunner().invoke(
        cli_app, ["audit", "verify", "--config", str(config), "--database", store.url]
    )
    return result.exit_code, result.output.strip()


@pytest.fixture
def trail(store: Store, tmp_path: Path) -> Path:
    """A keyed trail of 6 entries with a checkpoint at its head; returns its channels.yaml."""
    config = tmp_path / "channels.yaml"
    config.write_text("engine:\n  data_dir: engine-data\n")
    audit.install(store, AuditSettings(), tmp_path / "engine-data")
    write_records(store, 1, 6)
    assert checkpoint(store) == "checkpoint: 6 entries up to entry 6"
    return config


def rows(store: Store) -> list[dict[str, Any]]:
    with store.read() as conn:
        return [dict(r._mapping) for r in conn.execute(text("SELECT * FROM audit_entry ORDER BY seq"))]


def rewrite_from(store: Store, seq: int, hasher: Any) -> None:
    """Edit entry ``seq`` and recompute the chain from it to the end with ``hasher``."""
    entries = rows(store)
    prev = next(r["hash"] for r in entries if r["seq"] == seq - 1)
    with store.transaction() as tx:
        for row in [r for r in entries if r["seq"] >= seq]:
            if row["seq"] == seq:
                row["agent"] = "mallory"
            row["prev_hash"] = prev
            row["hash"] = hasher(row)
            tx.execute(
                text(
                    "UPDATE audit_entry SET agent = :agent, prev_hash = :prev_hash, hash = :hash WHERE seq = :seq"
                ),
                row,
            )
            prev = row["hash"]


def test_intact_trail_verifies_against_its_checkpoint(store: Store, trail: Path) -> None:
    code, out = verify(store, trail)
    assert code == 0, out
    assert out.startswith("intact: 6 entries, last checkpoint at ") and out.endswith("(6 entries)"), out
    assert "audit_checkpoint" in job_names()
    assert checkpoint(store) == "trail unchanged since the last checkpoint"


def test_key_and_data_dir_are_private(store: Store, trail: Path) -> None:
    data = trail.parent / "engine-data"
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data / "audit.key").st_mode) == 0o600
    key = (data / "audit.key").read_text().strip()
    with store.read() as conn:
        stored = " ".join(str(v) for r in conn.execute(text("SELECT * FROM audit_entry")) for v in r)
    assert key not in stored


def test_edited_entry_is_named(store: Store, trail: Path) -> None:
    with store.transaction() as tx:
        tx.execute(text("UPDATE audit_entry SET agent = 'mallory' WHERE seq = 3"))
    code, out = verify(store, trail)
    assert code == 1
    assert out.startswith("audit trail NOT intact: edited: entry 3 "), out


def test_chain_recomputed_with_the_published_algorithm_is_named(store: Store, trail: Path) -> None:
    rewrite_from(store, 3, audit.plain_hash)  # what the attacker can compute: SHA-256 as in earlier versions
    code, out = verify(store, trail)
    assert code == 1
    assert out.startswith("audit trail NOT intact: recomputed: entry 3 "), out


def test_chain_recomputed_with_another_key_is_named(store: Store, trail: Path) -> None:
    guess = os.urandom(32)
    rewrite_from(store, 3, lambda row: audit.keyed_hash(row, guess))
    code, out = verify(store, trail)
    assert code == 1
    assert out.startswith("audit trail NOT intact: recomputed: entries from 3 on "), out


@pytest.mark.parametrize(
    ("deleted", "named"), [("3, 4", "after entry 2"), ("1, 2", "at the start of the trail")]
)
def test_deleted_entries_are_named(store: Store, trail: Path, deleted: str, named: str) -> None:
    with store.transaction() as tx:
        tx.execute(text(f"DELETE FROM audit_entry WHERE seq IN ({deleted})"))
    code, out = verify(store, trail)
    assert code == 1
    assert out.startswith(f"audit trail NOT intact: deleted: entries were deleted {named}"), out


def test_truncated_tail_is_named(store: Store, trail: Path) -> None:
    with store.transaction() as tx:
        tx.execute(text("DELETE FROM audit_entry WHERE seq > 4"))
    code, out = verify(store, trail)
    assert code == 1
    assert out.startswith("audit trail NOT intact: truncated: the trail ends at entry 4 (4 entries)"), out
    assert "recorded 6 entries up to entry 6" in out


def test_forged_checkpoint_is_named(store: Store, trail: Path) -> None:
    """The attacker deletes the tail and edits the last checkpoint to match (without the key)."""
    with store.transaction() as tx:
        tx.execute(text("DELETE FROM audit_entry WHERE seq > 4"))
    head = rows(store)[-1]["hash"]
    file = trail.parent / "engine-data" / "audit-checkpoints.jsonl"
    lines = file.read_bytes().splitlines()
    last = orjson.loads(lines[-1])
    last.update(count=4, head_seq=4, head=head)
    file.write_bytes(b"\n".join([*lines[:-1], orjson.dumps(last)]) + b"\n")
    code, out = verify(store, trail)
    assert code == 1
    assert out.startswith("audit trail NOT intact: forged-checkpoint: checkpoint line 2 of "), out
    assert "does not carry a valid signature" in out


def test_removed_checkpoint_line_is_named(store: Store, trail: Path) -> None:
    write_records(store, 7, 1)
    checkpoint(store)  # line 3
    file = trail.parent / "engine-data" / "audit-checkpoints.jsonl"
    lines = file.read_bytes().splitlines()
    file.write_bytes(b"\n".join([lines[0], lines[2]]) + b"\n")
    code, out = verify(store, trail)
    assert code == 1
    assert "forged-checkpoint: checkpoint line 2 of " in out and "removed or reordered" in out, out


def test_plain_chain_of_earlier_versions_still_verifies(store: Store, tmp_path: Path) -> None:
    """Entries written before the key existed (plain SHA-256) stay valid up to the anchor; entries
    after it must be keyed."""
    write_records(store, 1, 3)  # no key on the store yet: the plain chain
    config = tmp_path / "channels.yaml"
    config.write_text("engine:\n  data_dir: engine-data\n")
    code, out = verify(store, config)
    assert code == 0 and out.startswith("intact: 3 entries, no checkpoint yet"), out

    audit.install(store, AuditSettings(), tmp_path / "engine-data")  # first start with a key: the anchor
    write_records(store, 4, 2)
    code, out = verify(store, config)
    assert code == 0, out
    assert out.startswith("intact: 5 entries, last checkpoint at ") and "(3 entries)" in out, out
    assert "the first 3 carry the unkeyed chain" in out

    rewrite_from(store, 2, audit.plain_hash)  # a plain chain recomputed through the anchor
    code, out = verify(store, config)
    assert code == 1
    assert out.startswith("audit trail NOT intact: checkpoint-mismatch: entry 3 "), out


def test_upgrade_and_checkpoint_job_through_the_cli(store: Store, tmp_path: Path) -> None:
    """A store with the plain chain of an earlier version; the engine's first start (here through
    ``hms-ach jobs run``) creates the key and the anchor; later entries are keyed and checkpointed."""
    write_records(store, 1, 3)
    config = tmp_path / "channels.yaml"
    mappings = Path(__file__).resolve().parents[2] / "mappings"
    config.write_text(
        f"engine:\n  database_url: '{store.url}'\n  mappings: '{mappings}'\n  watch: false\n"
        "http:\n  enabled: false\n"
    )
    runner = CliRunner()
    first = runner.invoke(cli_app, ["jobs", "run", "audit_checkpoint", "--config", str(config)])
    assert first.exit_code == 0, first.output
    assert first.output.strip() == "audit_checkpoint: ok: trail unchanged since the last checkpoint"
    assert (tmp_path / "data" / "audit.key").exists()

    audit.install(store, AuditSettings(), tmp_path / "data", create=False)  # as hms-ach replay does
    write_records(store, 4, 2)
    second = runner.invoke(cli_app, ["jobs", "run", "audit_checkpoint", "--config", str(config)])
    assert second.output.strip() == "audit_checkpoint: ok: checkpoint: 5 entries up to entry 5", second.output
    code, out = verify(store, config)
    assert code == 0, out
    assert out.startswith("intact: 5 entries, last checkpoint at ") and "(5 entries)" in out, out
    assert out.endswith("the first 3 carry the unkeyed chain written before the key"), out


def test_unreachable_store_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["audit", "verify", "--config", str(tmp_path / "none.yaml"), "--database",
         "postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.startswith("hms-ach: cannot read the store postgresql://nobody:***@127.0.0.1:1/none")
    assert "secret" not in result.output and len(result.output.strip().splitlines()) == 1


def test_truncated_tail_stays_caught_after_new_entries(store: Store, trail: Path) -> None:
    """The tail is deleted and the engine goes on writing: the new entries link to what is left,
    but the checkpoint's head is gone (SQLite reuses its number, PostgreSQL does not)."""
    with store.transaction() as tx:
        tx.execute(text("DELETE FROM audit_entry WHERE seq > 4"))
    write_records(store, 7, 3)
    checkpoint(store)
    code, out = verify(store, trail)
    assert code == 1
    expected = {
        "sqlite": "audit trail NOT intact: checkpoint-mismatch: entry 6 is not what the checkpoint of ",
        "postgresql": "audit trail NOT intact: deleted: entry 6, the head of the checkpoint of ",
    }[store.dialect]
    assert out.startswith(expected), out


def test_an_engine_with_another_key_is_warned_at_start(
    store: Store, trail: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A second instance on the same database with a key of its own (not the shared secret)."""
    other = Store(store.url)
    try:
        with caplog.at_level("WARNING", logger="hms_ach.store.audit"):
            audit.install(other, AuditSettings(), tmp_path / "other-data")
    finally:
        other.dispose()
    warned = [r for r in caplog.records if r.message == "audit.key_mismatch"]
    assert len(warned) == 1 and warned[0].__dict__["seq"] == 6

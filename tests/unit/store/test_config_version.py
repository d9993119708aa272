"""The cluster's config version tables (hms_ach/store/config_version.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from hms_ach.store import config_version
from hms_ach.store.db import Store


def test_publishing_the_same_files_again_adds_no_version(store: Store) -> None:
    config_version.ensure_tables(store)
    config_version.ensure_tables(store)  # a second instance starting: no error
    with store.transaction() as tx:
        assert config_version.latest(tx) is None
        first = config_version.publish(tx, "d1", {"tables/a.yaml": "kind: table\n"}, "host:1")
        assert config_version.publish(tx, "d1", {"tables/a.yaml": "kind: table\n"}, "host:2") == first
        second = config_version.publish(tx, "d2", {"tables/a.yaml": "kind: table # é\n"}, "host:2")
        assert second > first
        newest = config_version.latest(tx)
        assert newest is not None and (newest.seq, newest.digest, newest.instance) == (second, "d2", "host:2")
        assert config_version.files_of(tx, first) == {"tables/a.yaml": "kind: table\n"}
        assert config_version.files_of(tx, second) == {"tables/a.yaml": "kind: table # é\n"}
        with pytest.raises(KeyError):
            config_version.files_of(tx, second + 100)


def test_each_instance_has_one_row_saying_what_it_runs(store: Store) -> None:
    config_version.ensure_tables(store)
    with store.transaction() as tx:
        config_version.record_running(tx, "host:1", 1, "d1", "ok")
        config_version.record_running(tx, "host:2", 1, "d1", "ok")
        config_version.record_running(tx, "host:2", 2, "d2", "refused", "x" * 5000)
    with store.read() as conn:
        rows = {i.instance: i for i in config_version.instances(conn)}
    assert set(rows) == {"host:1", "host:2"}
    assert (rows["host:1"].seq, rows["host:1"].status, rows["host:1"].detail) == (1, "ok", None)
    refused = rows["host:2"]
    assert (refused.seq, refused.digest, refused.status) == (2, "d2", "refused")
    assert refused.detail is not None and len(refused.detail) == config_version.MAX_DETAIL_CHARS


def test_only_the_newest_versions_are_kept(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_version, "KEEP_VERSIONS", 3)
    config_version.ensure_tables(store)
    with store.transaction() as tx:
        seqs = [config_version.publish(tx, f"d{i}", {"a.yaml": str(i)}, "host:1") for i in range(5)]
        with pytest.raises(KeyError):
            config_version.files_of(tx, seqs[1])
        assert [config_version.files_of(tx, s) for s in seqs[2:]] == [{"a.yaml": str(i)} for i in (2, 3, 4)]

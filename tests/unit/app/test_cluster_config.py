"""One instance's side of the cluster's mapping version (hms_ach/app/cluster_config.py): what is
published, what a follower is told to load, and where the texts are written."""

from __future__ import annotations

from pathlib import Path

import pytest

from hms_ach.app import cluster_config
from hms_ach.app.cluster_config import ClusterConfig, Newer
from hms_ach.mapping.loader import load_mappings
from hms_ach.store.db import Store

ROOT = Path(__file__).resolve().parents[3]


def test_the_files_are_those_the_loader_reads_and_the_digest_covers_names_and_texts(tmp_path: Path) -> None:
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "a.yaml").write_text("kind: table\n")
    (tmp_path / "tables" / "a_test.yaml").write_text("golden\n")
    (tmp_path / "notes.txt").write_text("not a mapping\n")
    files = cluster_config.mapping_files(tmp_path)
    assert files == {"tables/a.yaml": "kind: table\n"}
    d = cluster_config.digest(files)
    assert d == cluster_config.digest(dict(files))
    assert d != cluster_config.digest({"tables/b.yaml": "kind: table\n"})
    assert d != cluster_config.digest({"tables/a.yaml": "kind: table \n"})
    # a name and a text cannot be shifted into one another
    assert cluster_config.digest({"ab": "c"}) != cluster_config.digest({"a": "bc"})


def test_one_instance_publishes_and_the_other_is_told_to_load_it(tmp_path: Path, store: Store) -> None:
    a = ClusterConfig(store, tmp_path / "a", "host:1")
    b = ClusterConfig(store, tmp_path / "b", "host:2")
    shipped = cluster_config.mapping_files(ROOT / "mappings")
    a.start(shipped)
    b.start(shipped)
    assert a.seq == b.seq and a.poll() is None and b.poll() is None  # the same files: one version

    changed = dict(shipped)
    changed["tables/active_inactive.yaml"] = changed["tables/active_inactive.yaml"].replace(
        "A: true", "A: false"
    )
    assert a.local_changed(changed) and not a.local_changed(changed)
    a.queue_publish(changed)
    assert a.poll() is None  # published, and a runs it
    newer = b.poll()
    assert newer is not None and newer.seq == a.seq and newer.files == changed
    folder = b.materialise(newer)
    assert folder.is_relative_to(tmp_path / "b" / cluster_config.MATERIALISED_DIR)
    mset = load_mappings(folder)
    assert getattr(mset.tables["active_inactive"].model, "map", {})["A"] is False
    b.ran(newer)
    assert b.poll() is None and (b.seq, b.digest) == (a.seq, a.digest)

    # a version b refuses is not offered again; the next one is
    broken = {**changed, "tables/active_inactive.yaml": "kind: nonsense\n"}
    a.queue_publish(broken)
    a.poll()
    refused = b.poll()
    assert refused is not None
    b.refuse(refused, "tables/active_inactive.yaml:1:7: unknown kind")
    assert b.poll() is None and b.seq == newer.seq
    a.queue_publish(shipped)
    a.poll()
    again = b.poll()
    assert again is not None and again.digest == cluster_config.digest(shipped)


def test_texts_are_written_only_inside_the_data_directory(tmp_path: Path, store: Store) -> None:
    cc = ClusterConfig(store, tmp_path, "host:1")
    for name in ("../../escape.yaml", "/etc/escape.yaml", "tables/a.py"):
        with pytest.raises(ValueError, match="not a mapping path"):
            cc.materialise(Newer(7, "0" * 64, {name: "kind: table\n"}))
    assert not (tmp_path.parent / "escape.yaml").exists()

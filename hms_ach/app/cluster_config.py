"""One instance's side of the cluster's config version (:mod:`hms_ach.store.config_version`).

The mapping files (``*.yaml`` under the mappings directory, golden ``*_test.yaml`` files left out:
exactly what :func:`hms_ach.mapping.loader.load_mappings` reads) are what every instance of a
deployment must run alike. :class:`ClusterConfig` publishes this instance's files when it loads
them from its own disk (at start, and on a reload of changed files), and tells the engine when
another instance published a newer version: the engine then loads that version's texts, written
by :meth:`ClusterConfig.materialise` under the data directory, never its own checkout. channels.yaml
stays per instance (it holds bind addresses, TLS file paths, the data directory); see
docs/scale-out.md.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from hms_ach.store import config_version
from hms_ach.store.db import Store

log = logging.getLogger("hms_ach.app.cluster_config")

#: How often an instance looks for a newer version (seconds): every instance runs it within this.
POLL_SECONDS = 2.0
#: The folder under the data directory where the published texts are written to be loaded.
MATERIALISED_DIR = "cluster-mappings"


def mapping_files(root: Path) -> dict[str, str]:
    """The mapping files under ``root`` as the loader reads them: relative POSIX path -> text (the
    YAML files, goldens left out, and the workflows' form files, ``*.json``)."""
    paths = [p for p in root.rglob("*.yaml") if not p.name.endswith("_test.yaml")] + list(
        root.rglob("*.json")
    )
    return {path.relative_to(root).as_posix(): path.read_text(encoding="utf-8") for path in sorted(paths)}


def digest(files: dict[str, str]) -> str:
    """SHA-256 over the files' paths and texts, in path order (equal files, equal digest)."""
    h = hashlib.sha256()
    for name in sorted(files):
        for part in (name, files[name]):
            data = part.encode("utf-8")
            h.update(len(data).to_bytes(8, "big"))
            h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class Newer:
    """A version published by another instance that this one does not run yet."""

    seq: int
    digest: str
    files: dict[str, str]


class ClusterConfig:
    """The version this instance runs and the one it last read from its own disk."""

    def __init__(self, store: Store, data_dir: Path, instance: str):
        self.store = store
        self.data_dir = data_dir
        self.instance = instance
        self.seq: int | None = None  # the published version running here
        self.digest = ""  # its digest
        self.local_digest = ""  # the digest of the files last read from this instance's disk
        self._pending: tuple[str, dict[str, str]] | None = None  # local files to publish
        self.refused: tuple[int, str] | None = None  # (seq, why) of the last version that failed

    def start(self, files: dict[str, str]) -> None:
        """Create the tables and publish the files this instance started with (blocking)."""
        config_version.ensure_tables(self.store)
        self.local_changed(files)
        self._publish(digest(files), files)

    def local_changed(self, files: dict[str, str]) -> bool:
        """Whether ``files`` (read from disk now) differ from those read last; remembers them."""
        d = digest(files)
        changed, self.local_digest = d != self.local_digest, d
        return changed

    def queue_publish(self, files: dict[str, str]) -> None:
        """Publish ``files`` (loaded and checked from disk) at the next :meth:`poll` (any thread)."""
        self._pending = (digest(files), files)

    def poll(self) -> Newer | None:
        """Publish what is queued, then return the newest version if this instance does not run it
        (blocking; the engine calls it from a thread every :data:`POLL_SECONDS`)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                self._publish(*pending)
            except Exception:
                if self._pending is None:  # the store failed: publish at the next poll
                    self._pending = pending
                raise
        with self.store.transaction() as tx:
            newest = config_version.latest(tx)
            if newest is None or newest.seq == self.seq:
                return None
            if newest.digest == self.digest:  # the same files again: nothing to load
                self.seq = newest.seq
                config_version.record_running(tx, self.instance, self.seq, self.digest, "ok")
                return None
            if self.refused is not None and self.refused[0] == newest.seq:
                return None  # refused already; wait for the next version
            return Newer(newest.seq, newest.digest, config_version.files_of(tx, newest.seq))

    def materialise(self, newer: Newer) -> Path:
        """Write the texts of ``newer`` under the data directory; the folder to load them from.
        Paths that would leave that folder are refused (ValueError)."""
        base = self.data_dir / MATERIALISED_DIR
        target = base / f"{newer.seq}-{newer.digest[:16]}"
        shutil.rmtree(target, ignore_errors=True)
        for name, text in newer.files.items():
            path = (target / name).resolve()
            if not path.is_relative_to(target.resolve()) or not name.endswith((".yaml", ".json")):
                raise ValueError(f"config version {newer.seq}: file name {name!r} is not a mapping path")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        return target

    def ran(self, newer: Newer) -> None:
        """This instance now runs ``newer``: :meth:`adopt`, then :meth:`record` (blocking)."""
        self.adopt(newer)
        self.record()

    def adopt(self, newer: Newer) -> None:
        """This instance now runs ``newer`` (in memory only: call it with the swap of mappings)."""
        self.seq, self.digest, self.refused = newer.seq, newer.digest, None
        base = self.data_dir / MATERIALISED_DIR
        for old in base.iterdir() if base.is_dir() else ():  # the older versions' texts
            if old.is_dir() and not old.name.startswith(f"{newer.seq}-"):
                shutil.rmtree(old, ignore_errors=True)

    def record(self) -> None:
        """Record in ``config_instance`` that this instance runs its version (blocking)."""
        with self.store.transaction() as tx:
            config_version.record_running(tx, self.instance, self.seq, self.digest, "ok")

    def refuse(self, newer: Newer, why: str) -> None:
        """``newer`` failed the check here: the last good mappings stay (blocking: recorded)."""
        self.refused = (newer.seq, why)
        with self.store.transaction() as tx:
            config_version.record_running(tx, self.instance, newer.seq, newer.digest, "refused", why)

    def _publish(self, d: str, files: dict[str, str]) -> None:
        with self.store.transaction() as tx:
            before = config_version.latest(tx)
            self.seq = config_version.publish(tx, d, files, self.instance)
            self.digest, self.refused = d, None
            config_version.record_running(tx, self.instance, self.seq, d, "ok")
        new = before is None or before.seq != self.seq
        event = "config.published" if new else "config.version_running"  # the same files as published
        log.info(event, extra={"seq": self.seq, "digest": d[:16], "files": len(files)})

"""Signed checkpoints of the audit trail, kept outside the database, and the job that writes them.

A checkpoint is one JSON line appended (and fsynced) to ``audit-checkpoints.jsonl`` in the data
directory: how many entries the trail had, the number and hash of its last entry, the same three for
the chain of access records (:mod:`hms_ach.store.access_log`; lines of format 2), when, and the key
id, signed with HMAC-SHA256 under the audit key (a key derived for checkpoints). Each line also
carries the signature of the line before it, so lines cannot be dropped from the middle of the file
unnoticed. ``hms-ach audit verify`` checks the trail against every checkpoint: a trail that ends
before the last checkpoint's entry was truncated.

The first line (``kind: anchor``) is written when the engine first starts with its key. It marks
where the keyed chain begins: the entries up to it may carry the plain SHA-256 chain of earlier
versions, every later entry must carry the keyed one.

:class:`AuditCheckpointJob` is the ``audit_checkpoint`` job of :data:`hms_ach.app.jobs.JOB_TYPES`.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from pydantic import Field
from sqlalchemy import Connection, func, select

from hms_ach.core.types import JobSchedule
from hms_ach.store.audit_keys import AuditSeal, ensure_data_dir, seal_for
from hms_ach.store.db import Store
from hms_ach.store.models import AuditEntry

log = logging.getLogger("hms_ach.store.audit_checkpoints")

T = AuditEntry.__table__  # type: ignore[attr-defined]
#: 2: the access chain's head (``access_count``, ``access_head_seq``, ``access_head``) is signed too.
FORMAT_VERSION = 2
_ACCESS_FIELDS = ("access_count", "access_head_seq", "access_head")
MAX_LINE_BYTES = 4096
_lock = threading.Lock()


@dataclass(frozen=True)
class Checkpoint:
    """One line of the checkpoint file (``line`` is its 1-based line number, not signed)."""

    v: int
    kind: str  # anchor | checkpoint
    at: str
    count: int
    head_seq: int
    head: str
    key_id: str
    prev: str
    sig: str
    access_count: int = 0
    access_head_seq: int = 0
    access_head: str = ""
    line: int = 0

    def signed_fields(self) -> dict[str, Any]:
        data = asdict(self)
        del data["sig"], data["line"]
        if self.v < 2:  # format 1 did not record the access chain
            for name in _ACCESS_FIELDS:
                del data[name]
        return data


class CheckpointError(Exception):
    """The checkpoint file is damaged, forged or unreadable; ``str()`` says which line and why."""

    def __init__(self, message: str, kind: str = "forged-checkpoint"):
        super().__init__(message)
        self.kind = kind


def sign(fields: dict[str, Any], seal: AuditSeal) -> str:
    if seal.checkpoint_key is None:
        raise CheckpointError("no audit key: checkpoints cannot be signed or checked", "no-key")
    payload = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    return hmac.new(seal.checkpoint_key, payload, hashlib.sha256).hexdigest()


def trail_head(conn: Connection, since: Checkpoint | None = None) -> tuple[int, int, str]:
    """(entries, number of the last entry, its hash) of the trail; (0, 0, "") when it is empty.
    With ``since`` (the last checkpoint) only the entries after it are counted."""
    last = conn.execute(select(T.c.seq, T.c.hash).order_by(T.c.seq.desc()).limit(1)).first()
    if last is None:
        return 0, 0, ""
    # Entries are appended under the chain lock and commit in number order: every entry up to the
    # last one seen is committed, so this count is the trail's length at that entry.
    counted = select(func.count()).select_from(T).where(T.c.seq <= last.seq)
    base = 0
    if since is not None and since.head_seq <= last.seq:
        counted, base = counted.where(T.c.seq > since.head_seq), since.count
    return base + int(conn.execute(counted).scalar_one()), int(last.seq), str(last.hash)


def _parse(raw: bytes, number: int, path: Path) -> Checkpoint:
    where = f"checkpoint line {number} of {path}"
    if len(raw) > MAX_LINE_BYTES:
        raise CheckpointError(f"{where} is longer than {MAX_LINE_BYTES} bytes: not a checkpoint")
    try:
        data = orjson.loads(raw)
        cp = Checkpoint(
            v=int(data["v"]),
            kind=str(data["kind"]),
            at=str(data["at"]),
            count=int(data["count"]),
            head_seq=int(data["head_seq"]),
            head=str(data["head"]),
            key_id=str(data["key_id"]),
            prev=str(data["prev"]),
            sig=str(data["sig"]),
            access_count=int(data.get("access_count", 0)),
            access_head_seq=int(data.get("access_head_seq", 0)),
            access_head=str(data.get("access_head", "")),
            line=number,
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} is not a checkpoint (damaged or forged)") from exc
    return cp


def read_checkpoints(path: Path, seal: AuditSeal) -> list[Checkpoint]:
    """Every checkpoint of ``path``, each signature and link checked; [] when the file does not exist.
    Raises :class:`CheckpointError` naming the first line that does not hold."""
    try:
        with path.open("rb") as fh:
            lines = fh.read().split(b"\n")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CheckpointError(
            f"checkpoint file {path}: cannot read it ({exc.strerror})", "unreadable"
        ) from exc
    out: list[Checkpoint] = []
    prev_sig = ""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        cp = _parse(raw, number, path)
        where = f"checkpoint line {number} of {path} (written {cp.at[:40]})"
        if seal.checkpoint_key is not None and cp.key_id != seal.key_id:
            raise CheckpointError(
                f"{where} names another audit key ({cp.key_id[:16]}): forged, or the key was replaced"
            )
        if not hmac.compare_digest(sign(cp.signed_fields(), seal), cp.sig):
            raise CheckpointError(f"{where} does not carry a valid signature: it was forged or edited")
        if cp.prev != prev_sig:
            raise CheckpointError(
                f"{where} does not follow the line before it: checkpoint lines were removed or reordered"
            )
        if out and (
            cp.head_seq < out[-1].head_seq
            or cp.count < out[-1].count
            or (cp.v >= 2 and out[-1].v >= 2 and cp.access_count < out[-1].access_count)
        ):
            raise CheckpointError(f"{where} goes back behind the checkpoint before it")
        prev_sig = cp.sig
        out.append(cp)
    return out


def _last_line(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    start = max(0, size - 2 * MAX_LINE_BYTES)
    chunk = os.pread(fd, size - start, start)
    lines = [line for line in chunk.split(b"\n") if line.strip()]
    return lines[-1] if lines else b""


def append_checkpoint(conn: Connection, seal: AuditSeal, kind: str = "checkpoint") -> Checkpoint | None:
    """Sign the trail's head as read on ``conn`` and append it to the seal's checkpoint file (fsync);
    None when it is the head of the last checkpoint already (or the seal has no key or file)."""
    from hms_ach.store import access_log  # it imports audit, which imports this module

    path = seal.checkpoint_path
    if seal.checkpoint_key is None or path is None:
        return None
    ensure_data_dir(path.parent)
    with _lock:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # one writer at a time, across processes too
            last_raw = _last_line(fd)
            last = _parse(last_raw, 0, path) if last_raw else None
            if last is None:
                kind = "anchor"  # the first line marks where the keyed chain begins
            elif kind == "anchor":
                return None  # the file has its anchor already
            count, head_seq, head = trail_head(conn, last)
            access = access_log.access_head(conn, last if last is not None and last.v >= 2 else None)
            if last is not None and (
                last.count,
                last.head_seq,
                last.head,
                last.access_count,
                last.access_head_seq,
                last.access_head,
            ) == (count, head_seq, head, *access):
                return None
            fields = {
                "v": FORMAT_VERSION,
                "kind": kind,
                "at": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "count": count,
                "head_seq": head_seq,
                "head": head,
                "key_id": seal.key_id,
                "prev": last.sig if last is not None else "",
                "access_count": access[0],
                "access_head_seq": access[1],
                "access_head": access[2],
            }
            fields["sig"] = sign(fields, seal)
            os.write(fd, orjson.dumps(fields, option=orjson.OPT_SORT_KEYS) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock
    log.info(
        "audit.checkpoint_written",
        extra={"kind": kind, "count": count, "head_seq": head_seq, "access_count": access[0]},
    )
    return Checkpoint(**{k: v for k, v in fields.items()})  # type: ignore[arg-type]


def final_checkpoint(store: Store) -> Checkpoint | None:
    """The checkpoint written when the engine stops cleanly (after the writer's last commit), so that
    a tail deleted while the engine is down is caught; never raises (a failure is logged)."""
    try:
        with store.read() as conn:
            seal = seal_for(conn)
            return append_checkpoint(conn, seal) if seal.key is not None else None
    except Exception as exc:  # noqa: BLE001 - stopping goes on; the scheduled job writes the next one
        log.warning("audit.checkpoint_failed", extra={"error": type(exc).__name__})
        return None


def anchor(store: Store, seal: AuditSeal) -> Checkpoint | None:
    """Write the anchor (the first checkpoint) unless the checkpoint file has lines already."""
    if seal.checkpoint_path is None or seal.key is None:
        return None
    try:
        if seal.checkpoint_path.stat().st_size > 0:
            return None
    except FileNotFoundError:
        pass
    try:
        with store.read() as conn:
            return append_checkpoint(conn, seal, "anchor")
    except Exception as exc:  # noqa: BLE001 - the store or the file is unusable now: the first job run anchors
        log.warning(
            "audit.anchor_deferred", extra={"path": str(seal.checkpoint_path), "error": type(exc).__name__}
        )
        return None


# ---------------------------------------------------------------------------- the job
class AuditCheckpointSettings(JobSchedule):
    """``jobs: audit_checkpoint:`` in channels.yaml."""

    cron: str | None = Field(
        "*/5 * * * *",
        description="Crontab schedule; every 5 minutes by default (a tail deleted since "
        "the last checkpoint cannot be told from one never written)",
    )


class AuditCheckpointJob:
    """The ``audit_checkpoint`` job (a :class:`hms_ach.core.types.Job`): a signed checkpoint of the
    audit trail's head into the checkpoint file, when the trail grew since the last one."""

    Settings = AuditCheckpointSettings

    def run(self, tx: Connection, settings: AuditCheckpointSettings) -> str:
        seal = seal_for(tx)
        if seal.key is None:
            return "no audit key on this store: no checkpoint written"
        cp = append_checkpoint(tx, seal)
        if cp is None:
            return "trail unchanged since the last checkpoint"
        return f"checkpoint: {cp.count} entries up to entry {cp.head_seq}"

"""Inbound files: their identity, their message row, and the report left beside a bad one.

A file channel (``sftp_csv``, ``file_drop``) is only a transport: it lists, fetches and moves
files. What every file channel does the same way is here:

* **identity**: a file is known by (path, size, mtime, sha256) per channel (:func:`file_key`),
  the idempotency key of its message row, so a file is never processed twice;
* **names**: :func:`safe_name` says whether a listed name may be used at all (no ``/``, ``\\``,
  control characters or ``..``); local files always get names of our own;
* **the file's message row** (:class:`FileLog`): claimed before its content is processed
  (a file found again with a committed row is only moved), finished with its outcome after;
  problems not tied to a row (a bad name, a symlink, a file too large, a lost connection) are
  stored once as messages of their own;
* **the report**: ``NAME.err.csv`` (file, line, column, reason) beside a file moved to ``error/``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hms_ach.ingest.pipeline import Duplicate, Envelope, Finish, commit, finish, only_finish
from hms_ach.store import audit, messages
from hms_ach.store.port import Tx
from hms_ach.store.writer import StoreWriter

log = logging.getLogger("hms_ach.ingest.files")

_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,255}$")
#: Bytes read at a time when a file is copied or hashed.
CHUNK_BYTES = 1 << 20
REPORT_HEADER = ["file", "line", "column", "reason"]


def safe_name(name: str) -> bool:
    """A listed file name that may be used: no separators, control characters or ``..``."""
    return bool(_SAFE_NAME.match(name)) and name not in (".", "..") and ".." not in name.split("/")


def slug(name: str) -> str:
    """``name`` reduced to a safe local directory name (a channel's work directory)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "channel"


def file_key(channel: str, path: str, size: int, mtime: int, sha256: str, scheme: str = "sftp") -> str:
    """The idempotency key of one file: (path, size, mtime, sha256), per channel."""
    ident = json.dumps([channel, path, size, mtime, sha256])
    return f"{scheme}:" + hashlib.sha256(ident.encode()).hexdigest()


@dataclass
class FileReport:
    name: str
    status: str = ""
    rows: int = 0  # rows of a CSV file, messages of an HL7 v2 file
    stored: int = 0
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # line, column, reason
    note: str = ""


@dataclass
class PollResult:
    files: list[FileReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    error: str | None = None

    def summary(self) -> str:
        if self.error:
            return f"error: {self.error}"
        parts = [f"{f.name}: {f.status} ({f.stored}/{f.rows} rows)" for f in self.files]
        return "; ".join(parts) or "no files"


def error_report(name: str, report: FileReport) -> bytes:
    """``NAME.err.csv``: one line per problem of the file (file, line, column, reason)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(REPORT_HEADER)
    for line, column, reason in report.errors:
        writer.writerow([name, line, column, reason])
    return buf.getvalue().encode("utf-8")


def taken_name(name: str, sha256: str) -> str:
    """The name a file gets in ``processed/`` or ``error/`` when its own is taken: NAME.SHA12.EXT."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}.{sha256[:12]}.{ext}" if dot else f"{name}.{sha256[:12]}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class FileLog:
    """The message rows of one file channel's files (all through :func:`hms_ach.ingest.pipeline.commit`).

    ``source`` is the transport (``sftp``, ``file``), stored as the sending application;
    ``content_type`` and ``message_type`` are those of the file's rows (``csv`` and
    ``CSV^staff_roster``).
    """

    def __init__(self, writer: StoreWriter, channel: str, source: str, content_type: str, message_type: str):
        self.writer = writer
        self.channel = channel
        self.source = source
        self.content_type = content_type
        self.message_type = message_type[:50]

    def envelope(self, key: str, control_id: str, raw: bytes) -> Envelope:
        return messages.MessageMeta(
            channel=self.channel,
            content_type=self.content_type,
            idempotency_key=key,
            control_id=control_id[:200],
            sending_application=self.source,
            # who for the audit trail: the channel, the transport and the file (with its line, for a row)
            actor=audit.actor_json(kind=self.source, channel=self.channel, file=control_id[:200]),
            message_type=self.message_type,
            raw=raw,
        )

    async def claim(self, key: str, name: str, ident: dict[str, Any]) -> tuple[int, str]:
        """The file's message row (stored now, or found by its key) and its status.

        ``received`` means not committed yet (new, or half-processed before a crash): process it;
        ``processed`` or ``error`` means committed: only move it."""
        meta = self.envelope(key, name, json.dumps(ident).encode())

        def job(tx: Tx) -> tuple[int, str]:
            out = commit(tx, meta, lambda _tx, message_id: ((message_id, "received"), None))
            return (out.original_id, out.status) if isinstance(out, Duplicate) else out

        return await self.writer.run(job)

    async def finish(self, message_id: int, report: FileReport, unit: str = "rows") -> None:
        error = None
        if report.errors:
            error = (
                f"{len(report.errors)} of {report.rows} {unit} not stored; see {report.name}.err.csv "
                f"and the {unit[:-1]} messages of this file"
            )
        done = Finish(report.status, "AE" if report.errors else "AA", None, error=error)
        await self.writer.run(lambda tx: finish(tx, message_id, done))

    async def fail(self, message_id: int, error: str, where: str) -> None:
        """Finish a file that could not be read at all: ``error`` stored as its reason."""
        done = Finish("error", "AE", None, error=error, error_location=where[:250])
        await self.writer.run(lambda tx: finish(tx, message_id, done))

    async def stored_errors(self, key: str) -> list[tuple[int, str, str]]:
        """The bad rows stored for the file ``key`` (line, column, reason), to rebuild its report."""
        rows = await self.writer.run(lambda tx: messages.errors_under_key(tx, key + "|"))
        out = []
        for control_id, error, location in rows:
            line = int(str(control_id).rsplit(":", 1)[-1] or 0)
            loc = str(location or "")
            column = loc.split(" column ", 1)[1] if " column " in loc else ""
            out.append((line, column, str(error or "")))
        return out

    async def record_error(
        self, kind: str, text: str, ident: list[Any] | None = None, daily: bool = False
    ) -> None:
        """Store a problem not tied to a row once (``daily``: once a day, for a lost connection)."""
        parts: list[Any] = [self.channel, kind] + (ident or [])
        if daily:
            parts.append(time.strftime("%Y-%m-%d", time.gmtime()) + ":" + text)
        key = f"{self.source}-err:" + hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
        meta = self.envelope(key, kind, json.dumps({"channel": self.channel, "error": kind}).encode())
        done = Finish("error", "AE", None, error=text, error_location=kind)

        try:
            await self.writer.run(lambda tx: commit(tx, meta, only_finish(done)))
        except Exception:  # noqa: BLE001 - recording an error must never stop the poll
            log.exception(f"{self.source}.error_not_stored", extra={"channel": self.channel})
        # The reason is stored with the error row (it can name a file, whose name may identify a
        # patient): the log line says only which channel and what kind of problem.
        # The event name is built here, not by %-formatting: the log rate limiter groups lines by
        # their template, and a name error must not hide a size error.
        log.warning(f"{self.source}.{kind}_error", extra={"channel": self.channel, "kind": kind})

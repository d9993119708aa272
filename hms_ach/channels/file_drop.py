"""The ``file_drop`` channel: a local directory polled for HL7 v2 (``*.hl7``) and CSV (``*.csv``) files.

The file lifecycle is the one of ``sftp_csv``, on a local directory. A poll (run by
:mod:`hms_ach.app.scheduler` on the channel's schedule, or ``hms-ach jobs run``) does, for each
file of ``directory``:

1. **list**: only regular files with a safe name are taken (:func:`hms_ach.ingest.files.safe_name`);
   symlinks, odd names and files over ``max_file_bytes`` are recorded as errors once and left
   alone. A file must be ``min_file_age_seconds`` old and keep its size and mtime over
   ``stable_seconds``.
2. **copy** it (opened without following a symlink) to a file of our own name under ``work_dir``,
   with its **sha256**: (name, size, mtime, sha256) is the idempotency key of the file's message
   row, so a file is never processed twice (one put back is only moved again).
3. **ingest**:
   * an HL7 v2 file is split into messages at each MSH (as ``hms-ach send`` does; FHS/BHS/BTS/FTS
     batch lines are dropped) and each goes through the pipeline like an MLLP message, with the
     channel's HL7 policy: stored with its ACKs (not sent; see ``docs/hl7-acks.md``). A message
     answered AE or AR (CR) is a bad "line" of the file (its number in the file). The file's own
     row (content type ``file``) gets the file's status; a file with no MSH first is an error as a
     whole;
   * a CSV file is read and mapped row by row with the channel's ``csv:`` settings
     (:class:`hms_ach.ingest.csv_rows.CsvIngest`, the same as ``sftp_csv``).
4. **move** to ``processed/`` or ``error/`` (with ``NAME.err.csv`` beside it), or delete.

Polls of one channel never overlap (a lock here, ``max_instances=1`` in the scheduler).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import os
import stat
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import Field

from hms_ach.channels.pausing import PauseSwitch
from hms_ach.core.errors import MessageError
from hms_ach.core.redact import error_kind
from hms_ach.core.types import ChannelSettings
from hms_ach.hl7v2.client import split_messages
from hms_ach.hl7v2.limits import Hl7LimitSettings
from hms_ach.hl7v2.policy import Hl7PolicySettings
from hms_ach.ingest.csv_rows import CsvFileSettings, CsvIngest
from hms_ach.ingest.files import (
    CHUNK_BYTES,
    FileLog,
    FileReport,
    PollResult,
    error_report,
    file_key,
    safe_name,
    slug,
    taken_name,
)
from hms_ach.ingest.pipeline import Pipeline

log = logging.getLogger("hms_ach.channels.file_drop")


#: ACK codes of a stored message (original and enhanced mode): a resend answered so is stored too.
ACCEPTED = ("AA", "CA")


class FileDropConfig(ChannelSettings, Hl7LimitSettings, Hl7PolicySettings):
    """HL7 v2 and CSV files dropped in a local directory."""

    type: str = Field("file_drop", description="file_drop")
    directory: str = Field(description="Local directory polled for files")
    hl7_glob: str = Field("*.hl7", description="Shell pattern of HL7 v2 files (one or more messages each)")
    csv_glob: str = Field("*.csv", description="Shell pattern of CSV files (taken only when `csv:` is set)")
    csv: CsvFileSettings | None = Field(
        None, description="How CSV files are read and mapped (dataset, encoding...); none: CSV files are left"
    )
    processed_dir: str = Field(
        "processed", description="Directory (relative to `directory`) files go to when all went in"
    )
    error_dir: str = Field(
        "error",
        description="Directory (relative to `directory`) for files with bad content, beside their .err.csv",
    )
    after: Literal["move", "delete"] = Field("move", description="move to processed_dir/error_dir, or delete")
    poll_interval_seconds: float | None = Field(60, gt=0, description="Poll every this many seconds")
    poll_cron: str | None = Field(
        None, description="Poll on this crontab schedule instead (e.g. '*/5 * * * *')"
    )
    min_file_age_seconds: float = Field(
        10, ge=0, description="Files modified more recently are left for later"
    )
    stable_seconds: float = Field(
        2, ge=0, description="A file whose size or mtime changes within this is left"
    )
    max_file_bytes: int = Field(
        1 << 30, gt=0, description="Larger files are refused (recorded as an error); HL7 files are read whole"
    )
    work_dir: str = Field("work/file_drop", description="Local directory for the working copies")


class FileDropChannel:
    Config = FileDropConfig

    def __init__(self, config: FileDropConfig, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline
        self.policy = config.hl7_policy(config.name)
        self.inbox = Path(config.directory)
        self.work = Path(config.work_dir).resolve() / slug(config.name)
        self.hl7_files = FileLog(pipeline.writer, config.name, "file", "file", "HL7 file")
        self.problems = FileLog(
            pipeline.writer, config.name, "file", "file", "file"
        )  # names, sizes, the directory
        self.csv = CsvIngest(pipeline, config.name, config.csv, "file") if config.csv else None
        self._lock = asyncio.Lock()
        self.pause_switch = PauseSwitch()  # the console's pause: polls are skipped
        self._stopping = False  # set by stop(): a poll in progress ends after its current file

    async def start(self) -> None:
        self._stopping = False
        self.work.mkdir(parents=True, exist_ok=True)
        log.info("channel.started", extra={"channel": self.config.name, "type": "file_drop"})

    async def stop(self) -> None:
        self._stopping = True

    # ------------------------------------------------------------------ poll
    async def poll(self) -> PollResult:
        """One poll of the directory. Never raises for file problems: they are stored and returned."""
        if self.pause_switch.paused:  # the console paused the channel: this poll is skipped
            return PollResult(skipped=["channel paused"])
        async with self._lock:
            try:
                self.work.mkdir(parents=True, exist_ok=True)
                result = PollResult()
                for name, size, mtime in await self._candidates(result):
                    if self._stopping:  # the engine is stopping: the rest waits for the next start
                        break
                    result.files.append(await self._process_file(name, size, mtime))
                return result
            except OSError as exc:
                text = f"{type(exc).__name__}: {exc.strerror or exc}"
                await self.problems.record_error("directory", text, daily=True)
                log.error(
                    "file_drop.poll_failed",
                    extra={"channel": self.config.name, "error": error_kind(exc), "errno": exc.errno},
                )
                return PollResult(error=text)

    def _kind(self, name: str) -> str | None:
        if fnmatch.fnmatchcase(name, self.config.hl7_glob):
            return "hl7"
        if self.csv is not None and fnmatch.fnmatchcase(name, self.config.csv_glob):
            return "csv"
        return None

    async def _candidates(self, result: PollResult) -> list[tuple[str, int, int]]:
        cfg = self.config
        now = time.time()
        first: dict[str, tuple[int, int]] = {}
        entries = await asyncio.to_thread(_list, self.inbox)
        for name, st in entries:
            if name.startswith(".") and safe_name(name):
                continue
            size, mtime = st.st_size, int(st.st_mtime)
            if not safe_name(name):
                await self._record(
                    "name", f"unsafe file name {name[:120]!r}: not processed", [name, size, mtime]
                )
                result.skipped.append(name)
                continue
            if self._kind(name) is None:
                continue
            if stat.S_ISLNK(st.st_mode):
                await self._record(
                    "symlink",
                    f"{name!r} is a symbolic link: not followed, not processed",
                    [name, size, mtime],
                )
                result.skipped.append(name)
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if size > cfg.max_file_bytes:
                await self._record(
                    "size",
                    f"{name!r} has {size} bytes, more than max_file_bytes {cfg.max_file_bytes}: not processed",
                    [name, size, mtime],
                )
                result.skipped.append(name)
                continue
            if now - st.st_mtime < cfg.min_file_age_seconds:
                result.skipped.append(name)
                continue
            first[name] = (size, st.st_mtime_ns)
        if first and cfg.stable_seconds > 0:
            await asyncio.sleep(cfg.stable_seconds)
        out = []
        for name in sorted(first):
            try:
                st = await asyncio.to_thread(os.lstat, self.inbox / name)
            except OSError:  # gone since the listing: nothing to do
                continue
            if (st.st_size, st.st_mtime_ns) != first[name] or not stat.S_ISREG(st.st_mode):
                log.info("file_drop.file_growing", extra={"channel": cfg.name})
                result.skipped.append(name)
                continue
            out.append((name, st.st_size, int(st.st_mtime)))
        return out

    async def _record(self, kind: str, text: str, ident: list[object]) -> None:
        await self.problems.record_error(kind, text, ident)

    # ------------------------------------------------------------------ one file
    async def _process_file(self, name: str, size: int, mtime: int) -> FileReport:
        cfg = self.config
        local = self.work / f"{uuid.uuid4().hex}.part"
        try:
            sha = await asyncio.to_thread(_copy, self.inbox / name, local, size)
            if sha is None:
                return FileReport(name, status="skipped", note="changed while copying")
            key = file_key(cfg.name, name, size, mtime, sha, scheme="file")
            ident: dict[str, object] = {"file": name, "size": size, "mtime": mtime, "sha256": sha}
            if self._kind(name) == "csv" and self.csv is not None:
                message_id, report = await self.csv.ingest(local, name, key, ident)
            else:
                message_id, report = await self._ingest_hl7(local, name, key, ident)
            log.info(
                "file_drop.file_committed",
                extra={
                    "channel": cfg.name,
                    "message_id": message_id,
                    "status": report.status,
                    "rows": report.rows,
                    "bad_rows": len(report.errors),
                },
            )
            await asyncio.to_thread(self._after, name, sha, report)
        finally:
            local.unlink(missing_ok=True)
        return report

    async def _ingest_hl7(
        self, local: Path, name: str, key: str, ident: dict[str, object]
    ) -> tuple[int, FileReport]:
        report = FileReport(name)
        message_id, status = await self.hl7_files.claim(key, name, ident)
        if status in ("processed", "error"):
            report.status, report.note = status, "already committed; moved only"
            if status == "error":
                report.errors = [(0, "", f"committed before with errors: see message {message_id}")]
            return message_id, report
        data = await asyncio.to_thread(local.read_bytes)
        try:
            chunks = split_messages(data)
        except MessageError as exc:
            report.status = "error"
            report.errors = [(0, exc.location, exc.message)]
            await self.hl7_files.fail(message_id, f"no message read: {exc.message}", exc.location or name)
            return message_id, report
        if not chunks:
            report.status = "error"
            report.errors = [(0, "", "the file holds no HL7 v2 message")]
            await self.hl7_files.fail(message_id, "the file holds no HL7 v2 message", name)
            return message_id, report
        for number, raw in enumerate(chunks, 1):
            outcome = await self.pipeline.process_hl7(raw, self.policy)
            report.rows += 1
            if outcome.status == "processed" or (
                outcome.status == "duplicate" and outcome.result_code in ACCEPTED
            ):
                report.stored += 1
            elif outcome.status == "duplicate":  # sent before and refused then: still not stored
                reason = f"message {outcome.message_id}: a resend of a message answered {outcome.result_code}"
                report.errors.append((number, "", reason))
            else:
                reason = (
                    f"message {outcome.message_id}: {outcome.result_code} {outcome.error or outcome.status}"
                )
                report.errors.append((number, "", reason))
        report.status = "error" if report.errors else "processed"
        await self.hl7_files.finish(message_id, report, unit="messages")
        return message_id, report

    def _after(self, name: str, sha: str, report: FileReport) -> None:
        """Move (or delete) the file; a bad one goes to error/ with its report. Runs in a thread."""
        cfg = self.config
        source = self.inbox / name
        if cfg.after == "delete" and not report.errors:
            source.unlink(missing_ok=True)
            return
        target_dir = self.inbox / (cfg.error_dir if report.errors else cfg.processed_dir)
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / name
        if target.exists():
            target = target_dir / taken_name(name, sha)
        if report.errors:
            Path(str(target) + ".err.csv").write_bytes(error_report(name, report))
        if cfg.after == "delete":
            source.unlink(missing_ok=True)
        else:
            os.replace(source, target)


# ---------------------------------------------------------------------- file system (in threads)
def _list(directory: Path) -> list[tuple[str, os.stat_result]]:
    """The names in ``directory`` with their lstat (a symlink is seen as one, never followed)."""
    out = []
    with os.scandir(directory) as it:
        for entry in it:
            try:
                out.append((entry.name, entry.stat(follow_symlinks=False)))
            except OSError:  # gone since the listing
                continue
    return out


def _copy(source: Path, local: Path, size: int) -> str | None:
    """Copy ``source`` (not through a symlink) to ``local`` with its sha256; None if it is not the
    regular file of ``size`` bytes that was listed."""
    digest = hashlib.sha256()
    total = 0
    fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            return None
        with local.open("wb") as out:
            while chunk := src.read(CHUNK_BYTES):
                total += len(chunk)
                if total > size:
                    return None
                digest.update(chunk)
                out.write(chunk)
    return digest.hexdigest() if total == size else None

"""The ``sftp_csv`` channel: CSV files picked up from an SFTP server, one mapped record per row.

A poll (run by :mod:`hms_ach.app.scheduler` on the channel's schedule, or ``hms-ach jobs run``) does,
for each file of the inbox that matches the glob:

1. **list**: only regular files with a safe name (no ``/``, ``\\``, control characters or ``..``)
   are taken; symlinks and odd names are recorded as errors once and left alone. A file must be
   ``min_file_age_seconds`` old and keep its size and mtime over ``stable_seconds``.
2. **claim**: polls of one channel never overlap (a lock here, ``max_instances=1`` and one
   scheduler per deployment); the file's message row is the durable claim.
3. **download** in chunks to a file of our own name under ``work_dir`` (never a remote name), with
   its **sha256**. The file is identified by (path, size, mtime, sha256): the idempotency key of
   its message row.
4. **process rows** in chunks, each chunk one job of the group-commit writer: a good row's records
   are upserted on their business keys; a bad row is stored as its own ``csv`` message (status
   ``error``, keyed on file key and line) so that it can be replayed after a fix.
5. **commit**: the file's message row gets its final status (``processed`` or ``error``).
6. **move** to ``processed/`` or ``error/`` (with a ``.err.csv`` report beside it), or delete.

If the engine dies anywhere in between, the next poll finds the same file again: a committed file
(status processed/error) is only moved; a half-processed one is processed again, which changes
nothing for the rows already written (keyed upserts that change nothing make no new version) and
adds no second error row (keyed). No step trusts a remote name as a local path, and connection
details (host, user, secrets) are never written to the store or the logs.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import fnmatch
import hashlib
import io
import json
import logging
import posixpath
import re
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from hms_ach.app.config import ChannelSettings
from hms_ach.core.errors import MessageError
from hms_ach.core.records import MappingResult
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.paths import CsvRecord
from hms_ach.store import messages
from hms_ach.store.repository import Repository, WriteOutcome

log = logging.getLogger("hms_ach.channels.sftp_csv")

_SAFE_NAME = re.compile(r"^[^/\\\x00-\x1f\x7f]{1,255}$")
_COLUMN = re.compile(r"column (?:'([^']*)'|\"([^\"]*)\")")
CHUNK_BYTES = 1 << 20
ROWS_PER_JOB = 500
REPORT_HEADER = ["file", "line", "column", "reason"]


class SftpCsvConfig(ChannelSettings):
    """CSV files polled from an SFTP server; each row mapped with the CSV mapping of ``dataset``."""

    type: str = Field("sftp_csv", description="sftp_csv")
    host: str = Field(description="SFTP server host name or address")
    port: int = Field(22, ge=1, le=65535, description="SFTP server TCP port")
    username: str = Field(description="SSH user name")
    password: SecretStr | None = Field(
        None, description="SSH password; use ${VAR} to take it from the environment"
    )
    password_file: str | None = Field(
        None, description="File whose first line is the SSH password (a mounted secret)"
    )
    private_key_file: str | None = Field(None, description="OpenSSH private key file for public-key login")
    private_key_passphrase: SecretStr | None = Field(
        None, description="Passphrase of private_key_file, if any"
    )
    known_hosts: str | None = Field(
        None,
        description="known_hosts file pinning the server's host key (required unless accept_any_host_key)",
    )
    accept_any_host_key: bool = Field(
        False,
        description="Development only: do not check the host key (trust on first use and after any change)",
    )
    remote_dir: str = Field("inbox", description="Remote directory polled for files")
    glob: str = Field(
        "*.csv", description="Shell pattern the file names must match (hidden files are skipped)"
    )
    processed_dir: str = Field(
        "processed", description="Remote directory files go to when every row was stored"
    )
    error_dir: str = Field(
        "error", description="Remote directory for files with bad rows, beside their .err.csv"
    )
    after: Literal["move", "delete"] = Field("move", description="move to processed_dir/error_dir, or delete")
    dataset: str = Field(description="The CSV mapping applied (its `match: {csv: DATASET}`)")
    encoding: str = Field(
        "utf-8", description="Python codec of the files; a UTF-8 byte order mark is skipped"
    )
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field separator")
    quotechar: str = Field('"', min_length=1, max_length=1, description="Quote character")
    header_row: bool = Field(True, description="The first record names the columns")
    columns: list[str] | None = Field(None, description="Column names when the files have no header row")
    poll_interval_seconds: float | None = Field(300, gt=0, description="Poll every this many seconds")
    poll_cron: str | None = Field(
        None, description="Poll on this crontab schedule instead (e.g. '15 2 * * *')"
    )
    min_file_age_seconds: float = Field(
        10, ge=0, description="Files modified more recently are left for later"
    )
    stable_seconds: float = Field(
        2, ge=0, description="A file whose size or mtime changes within this is left"
    )
    max_file_bytes: int = Field(8 << 30, gt=0, description="Larger files are refused (recorded as an error)")
    max_record_chars: int = Field(
        1_000_000,
        ge=1024,
        description="Longest CSV record, in characters (a line, or the lines of one record when a quoted field "
        "holds newlines). A longer one is an error naming its line, is never read whole, and stops "
        "the file (the rows before it are stored)",
    )
    work_dir: str = Field("work/sftp_csv", description="Local directory for downloads and reports")
    connect_timeout_seconds: float = Field(30, gt=0, description="Timeout of connect and login")
    io_timeout_seconds: float = Field(120, gt=0, description="Timeout of any one SFTP request")

    @model_validator(mode="after")
    def _check(self) -> SftpCsvConfig:
        if self.known_hosts is None and not self.accept_any_host_key:
            raise ValueError(
                "known_hosts is required (pin the server's host key); "
                "accept_any_host_key: true is for development only"
            )
        if self.password is None and self.password_file is None and self.private_key_file is None:
            raise ValueError("give password, password_file or private_key_file")
        if not self.header_row and not self.columns:
            raise ValueError("header_row: false needs `columns:`")
        try:
            codecs.lookup(self.encoding)
        except LookupError as exc:
            raise ValueError(f"unknown encoding {self.encoding!r}") from exc
        return self


class PollError(Exception):
    """A problem with the connection or one file, already redacted."""


@dataclass
class RowOutcome:
    line: int
    values: dict[str, str]
    result: MappingResult | None = None
    column: str = ""
    reason: str = ""


@dataclass
class FileReport:
    name: str
    status: str = ""
    rows: int = 0
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


def file_key(channel: str, path: str, size: int, mtime: int, sha256: str) -> str:
    """The idempotency key of one file: (path, size, mtime, sha256), per channel."""
    ident = json.dumps([channel, path, size, mtime, sha256])
    return "sftp:" + hashlib.sha256(ident.encode()).hexdigest()


def safe_name(name: str) -> bool:
    return bool(_SAFE_NAME.match(name)) and name not in (".", "..") and ".." not in name.split("/")


class SftpCsvChannel:
    Config = SftpCsvConfig

    def __init__(self, config: SftpCsvConfig, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline
        self._lock = asyncio.Lock()
        self.work = Path(config.work_dir).resolve() / _slug(config.name)
        #: test hook: called after the file's records are committed, before the move
        self.before_move: Any = None

    async def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        log.info("channel.started", extra={"channel": self.config.name, "type": "sftp_csv"})

    async def stop(self) -> None:
        return None

    # ------------------------------------------------------------------ poll
    async def poll(self) -> PollResult:
        """One poll of the inbox. Never raises for remote problems: they are stored and returned."""
        async with self._lock:
            self.work.mkdir(parents=True, exist_ok=True)
            try:
                return await self._poll()
            except PollError as exc:
                await self._record_error("connection", str(exc), daily=True)
                log.error("sftp.poll_failed", extra={"channel": self.config.name, "error": str(exc)})
                return PollResult(error=str(exc))

    async def _poll(self) -> PollResult:
        import asyncssh

        result = PollResult()
        try:
            async with await asyncio.wait_for(self._connect(), self.config.connect_timeout_seconds) as conn:
                async with conn.start_sftp_client() as sftp:
                    for entry in await self._candidates(sftp, result):
                        result.files.append(await self._process_file(sftp, entry))
        except asyncssh.HostKeyNotVerifiable as exc:
            raise PollError(f"the server's host key does not match known_hosts: {self._redact(exc)}") from exc
        except asyncssh.PermissionDenied as exc:
            raise PollError(f"login refused (wrong password or key): {self._redact(exc)}") from exc
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            raise PollError(f"{type(exc).__name__}: {self._redact(exc)}") from exc
        return result

    async def _connect(self) -> Any:
        import asyncssh

        cfg = self.config
        password = cfg.password.get_secret_value() if cfg.password else None
        if password is None and cfg.password_file:
            password = Path(cfg.password_file).read_text(encoding="utf-8").splitlines()[0]
        keys: list[Any] = []
        if cfg.private_key_file:
            phrase = cfg.private_key_passphrase.get_secret_value() if cfg.private_key_passphrase else None
            keys = [asyncssh.read_private_key(cfg.private_key_file, phrase)]
        return await asyncssh.connect(
            cfg.host,
            port=cfg.port,
            username=cfg.username,
            password=password,
            client_keys=keys or None,
            known_hosts=None if cfg.accept_any_host_key else cfg.known_hosts,
            agent_path=None,
            login_timeout=cfg.connect_timeout_seconds,
            config=[],
            preferred_auth="publickey,password" if keys else "password,keyboard-interactive",
        )

    def _redact(self, exc: BaseException) -> str:
        text = str(exc) or type(exc).__name__
        secrets = [self.config.host, self.config.username]
        if self.config.password:
            secrets.append(self.config.password.get_secret_value())
        for s in sorted((s for s in secrets if s), key=len, reverse=True):
            text = text.replace(s, "***")
        return text.replace("\n", " ")[:500]

    async def _candidates(self, sftp: Any, result: PollResult) -> list[tuple[str, int, int]]:
        cfg = self.config
        now = time.time()
        first: dict[str, tuple[int, int]] = {}
        for entry in await asyncio.wait_for(sftp.readdir(cfg.remote_dir), cfg.io_timeout_seconds):
            name = (
                entry.filename
                if isinstance(entry.filename, str)
                else entry.filename.decode("utf-8", "replace")
            )
            if name in (".", "..") or (name.startswith(".") and safe_name(name)):
                continue
            attrs = entry.attrs
            size, mtime = int(attrs.size or 0), int(attrs.mtime or 0)
            if not safe_name(name):
                await self._record_error(
                    "name",
                    f"unsafe remote file name {name[:120]!r}: not processed",
                    ident=[name, size, mtime],
                )
                result.skipped.append(name)
                continue
            if not fnmatch.fnmatchcase(name, cfg.glob):
                continue
            mode = attrs.permissions or 0
            if stat.S_ISLNK(mode) or attrs.type == 3:  # FILEXFER_TYPE_SYMLINK
                await self._record_error(
                    "symlink",
                    f"{name!r} is a symbolic link: not followed, not processed",
                    ident=[name, size, mtime],
                )
                result.skipped.append(name)
                continue
            if not (stat.S_ISREG(mode) or attrs.type == 1):  # FILEXFER_TYPE_REGULAR
                continue
            if size > cfg.max_file_bytes:
                await self._record_error(
                    "size",
                    f"{name!r} has {size} bytes, more than max_file_bytes "
                    f"{cfg.max_file_bytes}: not processed",
                    ident=[name, size, mtime],
                )
                result.skipped.append(name)
                continue
            if now - mtime < cfg.min_file_age_seconds:
                result.skipped.append(name)
                continue
            first[name] = (size, mtime)
        if first and cfg.stable_seconds > 0:
            await asyncio.sleep(cfg.stable_seconds)
        out = []
        for name in sorted(first):
            try:
                attrs = await asyncio.wait_for(
                    sftp.lstat(posixpath.join(cfg.remote_dir, name)), cfg.io_timeout_seconds
                )
            except Exception:  # noqa: BLE001 - gone since the listing: nothing to do
                continue
            if (int(attrs.size or 0), int(attrs.mtime or 0)) != first[name]:
                log.info("sftp.file_growing", extra={"channel": cfg.name})
                result.skipped.append(name)
                continue
            out.append((name, *first[name]))
        return out

    # ------------------------------------------------------------------ one file
    async def _process_file(self, sftp: Any, entry: tuple[str, int, int]) -> FileReport:
        name, size, mtime = entry
        cfg = self.config
        remote = posixpath.join(cfg.remote_dir, name)
        report = FileReport(name)
        local = self.work / f"{uuid.uuid4().hex}.part"
        try:
            sha = await self._download(sftp, remote, local, size)
            if sha is None:
                report.status, report.note = "skipped", "changed while downloading"
                return report
            key = file_key(cfg.name, remote, size, mtime, sha)
            meta = messages.MessageMeta(
                channel=cfg.name,
                content_type="csv",
                idempotency_key=key,
                control_id=name[:200],
                sending_application="sftp",
                message_type=f"CSV^{cfg.dataset}"[:50],
                raw=json.dumps({"file": remote, "size": size, "mtime": mtime, "sha256": sha}).encode(),
            )
            message_id, status = await self.pipeline.writer.run(_claim_job(meta))
            if status in ("processed", "error"):
                report.status, report.note = status, "already committed; moved only"
                report.errors = await self.pipeline.writer.run(_stored_errors_job(key))
            else:
                await self._rows(local, name, key, message_id, report)
                report.status = "error" if report.errors else "processed"
                await self.pipeline.writer.run(_finish_job(message_id, report))
            log.info(
                "sftp.file_committed",
                extra={
                    "channel": cfg.name,
                    "message_id": message_id,
                    "status": report.status,
                    "rows": report.rows,
                    "bad_rows": len(report.errors),
                },
            )
            if self.before_move is not None:
                self.before_move(report)
            await self._after(sftp, remote, name, sha, report)
        finally:
            local.unlink(missing_ok=True)
        return report

    async def _download(self, sftp: Any, remote: str, local: Path, size: int) -> str | None:
        digest = hashlib.sha256()
        total = 0
        timeout = self.config.io_timeout_seconds
        async with await asyncio.wait_for(sftp.open(remote, "rb"), timeout) as src:
            with local.open("wb") as out:
                while True:
                    chunk = await asyncio.wait_for(src.read(CHUNK_BYTES), timeout)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > size:
                        return None
                    digest.update(chunk)
                    out.write(chunk)
        return digest.hexdigest() if total == size else None

    async def _rows(self, local: Path, name: str, key: str, message_id: int, report: FileReport) -> None:
        engine = self.pipeline.engine
        rows = self._read_rows(local, name)
        done = False
        while not done:
            chunk, done = await asyncio.to_thread(_map_chunk, rows, engine, self.config.dataset, name)
            if chunk:
                stored = await self.pipeline.writer.run(_rows_job(self.config, chunk, key, message_id, name))
                report.rows += len(chunk)
                report.stored += stored
                report.errors.extend((r.line, r.column, r.reason) for r in chunk if r.reason)

    def _read_rows(self, local: Path, name: str) -> Iterator[RowOutcome]:
        cfg = self.config
        encoding = "utf-8-sig" if codecs.lookup(cfg.encoding).name == "utf-8" else cfg.encoding
        with local.open("r", encoding=encoding, newline="") as fh:
            lines = BoundedLines(fh, cfg.max_record_chars)
            reader = csv.reader(lines, delimiter=cfg.delimiter, quotechar=cfg.quotechar, strict=True)
            header: list[str] | None = None if cfg.header_row else list(cfg.columns or [])
            end = 0
            try:
                for record in reader:
                    lines.record_done()
                    line, end = end + 1, reader.line_num
                    if not record or all(not v.strip() for v in record):
                        continue
                    if header is None:
                        header = list(cfg.columns) if cfg.columns else [h.strip() for h in record]
                        continue
                    values = dict(zip(header, record, strict=False))
                    if len(record) != len(header):
                        yield RowOutcome(
                            line,
                            values,
                            column="",
                            reason=f"expected {len(header)} columns "
                            f"({', '.join(header)[:200]}), found {len(record)}",
                        )
                        continue
                    yield RowOutcome(line, values)
            except UnicodeDecodeError as exc:
                yield RowOutcome(
                    end + 1,
                    {},
                    reason=f"not valid {cfg.encoding} text at byte {exc.start} of a "
                    "line: the rest of the file was not read",
                )
            except csv.Error as exc:
                yield RowOutcome(
                    end + 1, {}, reason=f"unreadable CSV: {exc}; the rest of the file was not read"
                )
            except RecordTooLong as exc:
                yield RowOutcome(exc.line, {}, reason=str(exc))

    async def _after(self, sftp: Any, remote: str, name: str, sha: str, report: FileReport) -> None:
        cfg = self.config
        if cfg.after == "delete" and not report.errors:
            await sftp.remove(remote)
            return
        target_dir = cfg.error_dir if report.errors else cfg.processed_dir
        await _ensure_dir(sftp, target_dir)
        target = posixpath.join(target_dir, name)
        if await sftp.exists(target):
            stem, dot, ext = name.rpartition(".")
            target = posixpath.join(target_dir, f"{stem}.{sha[:12]}.{ext}" if dot else f"{name}.{sha[:12]}")
        if report.errors:
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\r\n")
            writer.writerow(REPORT_HEADER)
            for line, column, reason in report.errors:
                writer.writerow([name, line, column, reason])
            async with sftp.open(target + ".err.csv", "wb") as out:
                await out.write(buf.getvalue().encode("utf-8"))
        if cfg.after == "delete":
            await sftp.remove(remote)
        else:
            await sftp.rename(remote, target)

    # ------------------------------------------------------------------ errors not tied to a row
    async def _record_error(
        self, kind: str, text: str, ident: list[Any] | None = None, daily: bool = False
    ) -> None:
        parts: list[Any] = [self.config.name, kind] + (ident or [])
        if daily:
            parts.append(time.strftime("%Y-%m-%d", time.gmtime()) + ":" + text)
        key = "sftp-err:" + hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
        meta = messages.MessageMeta(
            channel=self.config.name,
            content_type="csv",
            idempotency_key=key,
            control_id=kind,
            sending_application="sftp",
            message_type=f"CSV^{self.config.dataset}"[:50],
            raw=json.dumps({"channel": self.config.name, "error": kind}).encode(),
        )

        def job(conn: Connection) -> None:
            if messages.find_by_key(conn, key) is not None:
                return
            message_id = messages.insert_message(conn, meta)
            messages.finish(conn, message_id, "error", "AE", None, error=text, error_location=kind)

        try:
            await self.pipeline.writer.run(job)
        except Exception:  # noqa: BLE001 - recording an error must never stop the poll
            log.exception("sftp.error_not_stored", extra={"channel": self.config.name})
        log.warning("sftp.%s_error", kind, extra={"channel": self.config.name, "error": text})


# ---------------------------------------------------------------------- helpers (no I/O on the loop)
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "channel"


async def _ensure_dir(sftp: Any, path: str) -> None:
    if not await sftp.isdir(path):
        try:
            await sftp.mkdir(path)
        except Exception:  # noqa: BLE001 - made by someone else meanwhile
            if not await sftp.isdir(path):
                raise


class RecordTooLong(Exception):
    """A CSV record longer than ``max_record_chars``; it was not read whole."""

    def __init__(self, line: int, limit: int):
        self.line = line
        super().__init__(
            f"the record at line {line} is longer than max_record_chars {limit} (a line without "
            "its end, or an unclosed quote): it was not read, nor the rest of the file"
        )


class BoundedLines:
    """The lines of a text file for ``csv.reader``, each read with ``readline(limit)``: a line, or the lines of
    one record, longer than ``limit`` characters raises :class:`RecordTooLong` after at most ``limit + 1``
    characters were read, so a huge file without a newline is never held in memory."""

    def __init__(self, fh: Any, limit: int):
        self.fh = fh
        self.limit = limit
        self.line = 0  # physical lines handed out
        self.pending = 0  # characters of the record being read

    def __iter__(self) -> BoundedLines:
        return self

    def __next__(self) -> str:
        text = self.fh.readline(self.limit - self.pending + 1)
        if not text:
            raise StopIteration
        self.line += 1
        self.pending += len(text)
        if self.pending > self.limit:
            raise RecordTooLong(self.line, self.limit)
        return str(text)

    def record_done(self) -> None:
        self.pending = 0


def _column_of(error: MessageError) -> str:
    m = _COLUMN.search(error.location or "") or _COLUMN.search(error.message)
    return (m.group(1) or m.group(2) or "") if m else ""


def map_row(engine: Any, dataset: str, row: RowOutcome, name: str) -> RowOutcome:
    """Map one row; a problem goes into ``row.reason`` / ``row.column``."""
    if row.reason:
        return row
    try:
        row.result = engine.map_input("csv", dataset, CsvRecord(row.values, row.line, name, list(row.values)))
    except MessageError as exc:
        row.column, row.reason = _column_of(exc), exc.message
    except Exception as exc:  # noqa: BLE001 - a mapping bug is that row's error, not a crash
        log.exception("sftp.row_unexpected_error")
        row.reason = f"internal error while mapping: {type(exc).__name__}: {exc}"
    return row


def _map_chunk(
    rows: Iterator[RowOutcome], engine: Any, dataset: str, name: str
) -> tuple[list[RowOutcome], bool]:
    out: list[RowOutcome] = []
    for row in rows:
        out.append(map_row(engine, dataset, row, name))
        if len(out) >= ROWS_PER_JOB:
            return out, False
    return out, True


def row_raw(values: dict[str, str]) -> bytes:
    """A row as a two-record CSV (header, values): what a row error stores for replay."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(list(values))
    writer.writerow(list(values.values()))
    return buf.getvalue().encode("utf-8")


def _claim_job(meta: messages.MessageMeta) -> Any:
    def job(conn: Connection) -> tuple[int, str]:
        row = messages.find_by_key(conn, meta.idempotency_key or "")
        if row is not None:
            return int(row.id), str(row.status)
        savepoint = conn.begin_nested()
        try:
            message_id = messages.insert_message(conn, meta)
            savepoint.commit()
        except IntegrityError:
            savepoint.rollback()
            row = messages.find_by_key(conn, meta.idempotency_key or "")
            if row is None:
                raise
            return int(row.id), str(row.status)
        return message_id, "received"

    return job


def _rows_job(cfg: SftpCsvConfig, chunk: list[RowOutcome], key: str, message_id: int, name: str) -> Any:
    def job(conn: Connection) -> int:
        stored = 0
        repo = Repository(conn)
        for row in chunk:
            if not row.reason and row.result is not None:
                savepoint = conn.begin_nested()
                try:
                    repo.apply(row.result, message_id)
                    savepoint.commit()
                    stored += 1
                    continue
                except MessageError as exc:
                    savepoint.rollback()
                    row.column, row.reason = _column_of(exc), exc.message
            row_key = f"{key}|{row.line}"
            if messages.find_by_key(conn, row_key) is not None:
                continue
            meta = messages.MessageMeta(
                channel=cfg.name,
                raw=row_raw(row.values),
                content_type="csv",
                idempotency_key=row_key,
                control_id=f"{name}:{row.line}"[:200],
                sending_application="sftp",
                message_type=f"CSV^{cfg.dataset}"[:50],
            )
            row_id = messages.insert_message(conn, meta)
            where = f"{name} line {row.line}" + (f" column {row.column}" if row.column else "")
            messages.finish(conn, row_id, "error", "AE", None, error=row.reason, error_location=where[:250])
        return stored

    return job


def _finish_job(message_id: int, report: FileReport) -> Any:
    def job(conn: Connection) -> None:
        error = None
        if report.errors:
            error = (
                f"{len(report.errors)} of {report.rows} rows not stored; see {report.name}.err.csv "
                "and the row messages of this file"
            )
        messages.finish(conn, message_id, report.status, "AE" if report.errors else "AA", None, error=error)

    return job


def _stored_errors_job(key: str) -> Any:
    t = messages.T

    def job(conn: Connection) -> list[tuple[int, str, str]]:
        rows = conn.execute(
            select(t.c.control_id, t.c.error, t.c.error_location)
            .where(t.c.idempotency_key.like(key + "|%"))
            .order_by(t.c.id)
        ).all()
        out = []
        for r in rows:
            line = int(str(r.control_id).rsplit(":", 1)[-1] or 0)
            loc = str(r.error_location or "")
            column = loc.split(" column ", 1)[1] if " column " in loc else ""
            out.append((line, column, str(r.error or "")))
        return out

    return job


@dataclass
class RowReplay:
    """What replaying one stored CSV row did (inside the caller's transaction)."""

    status: str
    error: str | None = None
    writes: list[WriteOutcome] = field(default_factory=list)


def replay_stored_row(conn: Connection, engine: Any, message_id: int) -> RowReplay:
    """Re-map the stored bad CSV row ``message_id`` with ``engine`` and write it on ``conn``.

    Only row messages (keyed ``file key|line``) hold a row; the message of a whole file, or of a
    name, size or connection problem, holds no data to run again: ValueError says so.
    """
    row = messages.get(conn, message_id)
    if row is None or row.content_type != "csv" or not str(row.message_type).startswith("CSV^"):
        raise KeyError(f"message {message_id} is not a stored CSV row")
    if "|" not in str(row.idempotency_key or ""):
        raise ValueError(
            f"message {message_id} records a whole file or a {row.control_id or 'channel'} problem, "
            "not a row: its bad rows are stored as messages of their own (replay those), and the "
            "file itself is taken again only when it is put back in the inbox"
        )
    records = list(csv.reader(io.StringIO(bytes(row.raw).decode("utf-8"), newline="")))
    if len(records) != 2:
        raise ValueError(f"message {message_id} is not a single CSV row")
    if not records[0]:
        raise ValueError(
            f"message {message_id} holds no row: {row.error_location or 'the file'} could not be read "
            f"({row.error or 'no reason stored'}); correct the file and put it in the inbox again"
        )
    dataset = str(row.message_type).split("^", 1)[1]
    name, _, line = str(row.control_id).rpartition(":")
    outcome = map_row(
        engine, dataset, RowOutcome(int(line or 0), dict(zip(records[0], records[1], strict=False))), name
    )
    writes: list[WriteOutcome] = []
    if not outcome.reason and outcome.result is not None:
        savepoint = conn.begin_nested()
        try:
            writes = Repository(conn).apply(outcome.result, message_id)
            savepoint.commit()
        except MessageError as exc:
            savepoint.rollback()
            outcome.reason, outcome.column = exc.message, _column_of(exc)
    status = "error" if outcome.reason else "processed"
    where = f"{name} line {line}" + (f" column {outcome.column}" if outcome.column else "")
    messages.finish(
        conn,
        message_id,
        status,
        "AE" if outcome.reason else "AA",
        None,
        error=outcome.reason or None,
        error_location=where[:250] if outcome.reason else None,
        replay=True,
    )
    return RowReplay(status, outcome.reason or None, writes)


def replay_row(pipeline: Pipeline, message_id: int) -> str:
    """Re-run one stored bad CSV row through the current mappings and commit; returns its new status."""
    return str(
        pipeline.writer.run_sync(lambda conn: replay_stored_row(conn, pipeline.engine, message_id).status)
    )

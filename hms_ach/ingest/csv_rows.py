"""CSV files into records, one mapped record per row, for any file channel (``sftp_csv``, ``file_drop``).

Given a local copy of a file and its key (:func:`hms_ach.ingest.files.file_key`),
:meth:`CsvIngest.ingest` does:

1. **claim** the file's message row (:class:`hms_ach.ingest.files.FileLog`): a file whose row is
   committed already (processed/error) is not read again, its stored bad rows rebuild the report;
2. **read** the rows with a bounded reader (:class:`BoundedLines`: a record longer than
   ``max_record_chars`` is an error naming its line and is never held whole);
3. **map** them in chunks of :data:`ROWS_PER_JOB` off the event loop, with the CSV mapping of the
   channel's ``dataset`` (``match: {csv: DATASET}``);
4. **commit** each chunk as one job of the group-commit writer: a good row's records are upserted
   on their business keys for the file's message; a bad row is stored as its own ``csv`` message
   (status ``error``, keyed on file key and line, through :func:`hms_ach.ingest.pipeline.commit`)
   so that it can be replayed after a fix;
   The records a row wrote then pass the row checks (:func:`use_row_check`: the workforce rules,
   subscribed by the composition root); a refusal rolls that row's writes back and makes it an
   error row with the rule's reason (``[timecard.unknown_employee] ...``);
5. **finish** the file's row with its status (``processed``, or ``error`` when a row was bad).

A half-processed file read again changes nothing for the rows already written (keyed upserts that
change nothing make no new version) and adds no second error row (keyed).
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hms_ach.core.errors import MessageError
from hms_ach.core.records import MappingResult
from hms_ach.core.redact import error_kind
from hms_ach.ingest.files import FileLog, FileReport
from hms_ach.ingest.pipeline import Finish, Pipeline, commit, only_finish, rerun, write_records
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.paths import CsvRecord
from hms_ach.store import messages
from hms_ach.store.port import Tx
from hms_ach.store.repository import WriteOutcome
from hms_ach.store.savepoint import savepoint

log = logging.getLogger("hms_ach.ingest.csv_rows")

_COLUMN = re.compile(r"column (?:'([^']*)'|\"([^\"]*)\")")
#: Rows mapped and committed per writer job.
ROWS_PER_JOB = 500

#: A check of the records one CSV row wrote (its mapped records, and what was written of them), in
#: the row's transaction: it raises a MessageError (its location naming the column,
#: ``column 'employee_id'``) to refuse the row.
RowCheck = Callable[[Tx, MappingResult, list[WriteOutcome]], None]
_row_checks: list[RowCheck] = []


def use_row_check(check: RowCheck) -> None:
    """Run ``check`` on the records of every CSV row from now on (again: no effect)."""
    if check not in _row_checks:
        _row_checks.append(check)


class _Refused(Exception):
    def __init__(self, error: MessageError):
        self.error = error


def write_row(
    tx: Tx, result: MappingResult, message_id: int
) -> tuple[list[WriteOutcome], MessageError | None]:
    """:func:`hms_ach.ingest.pipeline.write_records` of one row, then the row checks; a refusal
    rolls the row's writes back and is returned as its error."""
    if not _row_checks:
        return write_records(tx, result, message_id)
    try:
        with savepoint(tx):
            writes, error = write_records(tx, result, message_id)
            if error is None:
                for check in _row_checks:
                    try:
                        check(tx, result, writes)
                    except MessageError as exc:
                        raise _Refused(exc) from None
    except _Refused as refused:
        return [], refused.error
    return writes, error


class CsvFileSettings(BaseModel):
    """How a channel's CSV files are read and mapped (``channels.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="The CSV mapping applied (its `match: {csv: DATASET}`)")
    encoding: str = Field(
        "utf-8", description="Python codec of the files; a UTF-8 byte order mark is skipped"
    )
    delimiter: str = Field(",", min_length=1, max_length=1, description="Field separator")
    quotechar: str = Field('"', min_length=1, max_length=1, description="Quote character")
    header_row: bool = Field(True, description="The first record names the columns")
    columns: list[str] | None = Field(None, description="Column names when the files have no header row")
    max_record_chars: int = Field(
        1_000_000,
        ge=1024,
        description="Longest CSV record, in characters (a line, or the lines of one record when a quoted field "
        "holds newlines). A longer one is an error naming its line, is never read whole, and stops "
        "the file (the rows before it are stored)",
    )

    @model_validator(mode="after")
    def _check_csv(self) -> CsvFileSettings:
        if not self.header_row and not self.columns:
            raise ValueError("header_row: false needs `columns:`")
        try:
            codecs.lookup(self.encoding)
        except LookupError as exc:
            raise ValueError(f"unknown encoding {self.encoding!r}") from exc
        return self


@dataclass
class RowOutcome:
    line: int
    values: dict[str, str]
    result: MappingResult | None = None
    column: str = ""
    reason: str = ""


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

    def __init__(self, fh: IO[str], limit: int):
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


def read_rows(local: Path, cfg: CsvFileSettings) -> Iterator[RowOutcome]:
    """The rows of the CSV file ``local``; an unreadable rest of the file is one last row with its reason."""
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
            yield RowOutcome(end + 1, {}, reason=f"unreadable CSV: {exc}; the rest of the file was not read")
        except RecordTooLong as exc:
            yield RowOutcome(exc.line, {}, reason=str(exc))


def column_of(error: MessageError) -> str:
    """The CSV column a mapping error names (``column 'npi'``), or ""."""
    m = _COLUMN.search(error.location or "") or _COLUMN.search(error.message)
    return (m.group(1) or m.group(2) or "") if m else ""


def map_row(engine: MappingEngine, dataset: str, row: RowOutcome, name: str) -> RowOutcome:
    """Map one row; a problem goes into ``row.reason`` / ``row.column``."""
    if row.reason:
        return row
    try:
        row.result = engine.map_input("csv", dataset, CsvRecord(row.values, row.line, name, list(row.values)))
    except MessageError as exc:
        row.column, row.reason = column_of(exc), exc.message
    except Exception as exc:  # noqa: BLE001 - a mapping bug is that row's error, not a crash
        log.error("csv.row_unexpected_error", extra={"line": row.line, "error": error_kind(exc)})
        row.reason = f"internal error while mapping ({error_kind(exc)})"
    return row


def map_chunk(
    rows: Iterator[RowOutcome], engine: MappingEngine, dataset: str, name: str
) -> tuple[list[RowOutcome], bool]:
    """The next :data:`ROWS_PER_JOB` rows, mapped, and whether the file is done."""
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


def _where(name: str, line: int | str, column: str) -> str:
    return (f"{name} line {line}" + (f" column {column}" if column else ""))[:250]


def rows_job(
    files: FileLog, chunk: list[RowOutcome], key: str, message_id: int, name: str
) -> Callable[[Tx], int]:
    """The writer job of one chunk: good rows' records for the file's message, bad rows as messages."""

    def job(tx: Tx) -> int:
        stored = 0
        for row in chunk:
            if not row.reason and row.result is not None:
                _writes, error = write_row(tx, row.result, message_id)
                if error is None:
                    stored += 1
                    continue
                row.column, row.reason = column_of(error), error.message
            meta = files.envelope(f"{key}|{row.line}", f"{name}:{row.line}", row_raw(row.values))
            done = Finish(
                "error", "AE", None, error=row.reason, error_location=_where(name, row.line, row.column)
            )
            commit(tx, meta, only_finish(done))  # a row stored before stays as it is
        return stored

    return job


class CsvIngest:
    """The CSV files of one channel into the pipeline (see the module docstring)."""

    def __init__(self, pipeline: Pipeline, channel: str, settings: CsvFileSettings, source: str):
        self.pipeline = pipeline
        self.settings = settings
        self.files = FileLog(pipeline.writer, channel, source, "csv", f"CSV^{settings.dataset}")

    async def ingest(
        self, local: Path, name: str, key: str, ident: dict[str, object]
    ) -> tuple[int, FileReport]:
        """Claim, read, map and commit the local copy ``local`` of the file ``name``; its message id
        and report (status ``processed`` or ``error``; ``note`` says when it was committed before)."""
        report = FileReport(name)
        message_id, status = await self.files.claim(key, name, ident)
        if status in ("processed", "error"):
            report.status, report.note = status, "already committed; moved only"
            report.errors = await self.files.stored_errors(key)
            return message_id, report
        await self._rows(local, name, key, message_id, report)
        report.status = "error" if report.errors else "processed"
        await self.files.finish(message_id, report)
        return message_id, report

    async def _rows(self, local: Path, name: str, key: str, message_id: int, report: FileReport) -> None:
        engine = self.pipeline.engine
        rows = read_rows(local, self.settings)
        done = False
        while not done:
            chunk, done = await asyncio.to_thread(map_chunk, rows, engine, self.settings.dataset, name)
            if chunk:
                stored = await self.pipeline.writer.run(rows_job(self.files, chunk, key, message_id, name))
                report.rows += len(chunk)
                report.stored += stored
                report.errors.extend((r.line, r.column, r.reason) for r in chunk if r.reason)

    async def record_error(
        self, kind: str, text: str, ident: list[object] | None = None, daily: bool = False
    ) -> None:
        await self.files.record_error(kind, text, ident, daily)


# ---------------------------------------------------------------------- replay of a stored bad row
@dataclass
class RowReplay:
    """What replaying one stored CSV row did (inside the caller's transaction)."""

    status: str
    error: str | None = None
    writes: list[WriteOutcome] = field(default_factory=list)


def replay_stored_row(tx: Tx, engine: MappingEngine, message_id: int) -> RowReplay:
    """Re-map the stored bad CSV row ``message_id`` with ``engine`` and write it in ``tx``.

    Only row messages (keyed ``file key|line``) hold a row; the message of a whole file, or of a
    name, size or connection problem, holds no data to run again: ValueError says so.
    """
    row = messages.get(tx, message_id)
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

    def work(tx: Tx, mid: int) -> tuple[RowReplay, Finish]:
        writes: list[WriteOutcome] = []
        if not outcome.reason and outcome.result is not None:
            writes, error = write_row(tx, outcome.result, mid)
            if error is not None:
                outcome.reason, outcome.column = error.message, column_of(error)
        if outcome.reason:
            done = Finish("error", "AE", None, outcome.reason, _where(name, line, outcome.column))
        else:
            done = Finish("processed", "AA", None)
        return RowReplay(done.status, outcome.reason or None, writes), done

    return rerun(tx, message_id, work)

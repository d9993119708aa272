"""The ``sftp_csv`` channel: CSV files picked up from an SFTP server, one mapped record per row.

This module is the SFTP transport only. A poll (run by :mod:`hms_ach.app.scheduler` on the
channel's schedule, or ``hms-ach jobs run``) does, for each file of the inbox that matches the glob:

1. **list**: only regular files with a safe name (no ``/``, ``\\``, control characters or ``..``)
   are taken; symlinks and odd names are recorded as errors once and left alone. A file must be
   ``min_file_age_seconds`` old and keep its size and mtime over ``stable_seconds``.
2. **claim**: polls of one channel never overlap (a lock here, ``max_instances=1`` and one
   scheduler per deployment); the file's message row is the durable claim.
3. **download** in chunks to a file of our own name under ``work_dir`` (never a remote name), with
   its **sha256**. The file is identified by (path, size, mtime, sha256): the idempotency key of
   its message row (:func:`hms_ach.ingest.files.file_key`).
4. **ingest** the rows: :class:`hms_ach.ingest.csv_rows.CsvIngest` (bounded reader, chunks, one
   writer job per chunk, bad rows stored for replay, the file's row finished with its status).
5. **move** to ``processed/`` or ``error/`` (with a ``.err.csv`` report beside it), or delete.

If the engine dies anywhere in between, the next poll finds the same file again: a committed file
(status processed/error) is only moved; a half-processed one is processed again, which changes
nothing for the rows already written. No step trusts a remote name as a local path, and connection
details (host, user, secrets) are never written to the store or the logs.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import posixpath
import stat
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator

from hms_ach.channels.pausing import PauseSwitch
from hms_ach.core.redact import error_kind
from hms_ach.core.types import ChannelSettings
from hms_ach.ingest.csv_rows import CsvFileSettings, CsvIngest
from hms_ach.ingest.files import (
    CHUNK_BYTES,
    FileReport,
    PollResult,
    error_report,
    file_key,
    safe_name,
    slug,
    taken_name,
)
from hms_ach.ingest.pipeline import Pipeline

log = logging.getLogger("hms_ach.channels.sftp_csv")


class SftpCsvConfig(ChannelSettings, CsvFileSettings):
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
        return self


class PollError(Exception):
    """A problem with the connection or one file, already redacted."""


class SftpCsvChannel:
    Config = SftpCsvConfig

    def __init__(self, config: SftpCsvConfig, pipeline: Pipeline):
        self.config = config
        self.pipeline = pipeline
        self._lock = asyncio.Lock()
        self.pause_switch = PauseSwitch()  # the console's pause: polls are skipped
        self.work = Path(config.work_dir).resolve() / slug(config.name)
        self.csv = CsvIngest(pipeline, config.name, config, "sftp")
        #: test hook: called after the file's records are committed, before the move
        self.before_move: Any = None
        self._stopping = False  # set by stop(): a poll in progress ends after its current file

    async def start(self) -> None:
        self._stopping = False
        self.work.mkdir(parents=True, exist_ok=True)
        log.info("channel.started", extra={"channel": self.config.name, "type": "sftp_csv"})

    async def stop(self) -> None:
        self._stopping = True

    # ------------------------------------------------------------------ poll
    async def poll(self) -> PollResult:
        """One poll of the inbox. Never raises for remote problems: they are stored and returned."""
        if self.pause_switch.paused:  # the console paused the channel: this poll is skipped
            return PollResult(skipped=["channel paused"])
        async with self._lock:
            self.work.mkdir(parents=True, exist_ok=True)
            try:
                return await self._poll()
            except PollError as exc:
                await self.csv.record_error("connection", str(exc), daily=True)
                log.error(  # the server's text is stored with the error row, not logged
                    "sftp.poll_failed",
                    extra={"channel": self.config.name, "error": error_kind(exc.__cause__ or exc)},
                )
                return PollResult(error=str(exc))

    async def _poll(self) -> PollResult:
        import asyncssh

        result = PollResult()
        try:
            async with await asyncio.wait_for(self._connect(), self.config.connect_timeout_seconds) as conn:
                async with conn.start_sftp_client() as sftp:
                    for entry in await self._candidates(sftp, result):
                        if self._stopping:  # the engine is stopping: the rest waits for the next start
                            break
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
                await self.csv.record_error(
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
                await self.csv.record_error(
                    "symlink",
                    f"{name!r} is a symbolic link: not followed, not processed",
                    ident=[name, size, mtime],
                )
                result.skipped.append(name)
                continue
            if not (stat.S_ISREG(mode) or attrs.type == 1):  # FILEXFER_TYPE_REGULAR
                continue
            if size > cfg.max_file_bytes:
                await self.csv.record_error(
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
        local = self.work / f"{uuid.uuid4().hex}.part"
        try:
            sha = await self._download(sftp, remote, local, size)
            if sha is None:
                return FileReport(name, status="skipped", note="changed while downloading")
            key = file_key(cfg.name, remote, size, mtime, sha)
            ident: dict[str, object] = {"file": remote, "size": size, "mtime": mtime, "sha256": sha}
            message_id, report = await self.csv.ingest(local, name, key, ident)
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

    async def _after(self, sftp: Any, remote: str, name: str, sha: str, report: FileReport) -> None:
        cfg = self.config
        if cfg.after == "delete" and not report.errors:
            await sftp.remove(remote)
            return
        target_dir = cfg.error_dir if report.errors else cfg.processed_dir
        await _ensure_dir(sftp, target_dir)
        target = posixpath.join(target_dir, name)
        if await sftp.exists(target):
            target = posixpath.join(target_dir, taken_name(name, sha))
        if report.errors:
            async with sftp.open(target + ".err.csv", "wb") as out:
                await out.write(error_report(name, report))
        if cfg.after == "delete":
            await sftp.remove(remote)
        else:
            await sftp.rename(remote, target)


# ---------------------------------------------------------------------- helpers
async def _ensure_dir(sftp: Any, path: str) -> None:
    if not await sftp.isdir(path):
        try:
            await sftp.mkdir(path)
        except Exception:  # noqa: BLE001 - made by someone else meanwhile
            if not await sftp.isdir(path):
                raise

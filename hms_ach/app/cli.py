"""The ``hms-ach`` command line: run the engine, check config, send test messages, inspect and
replay stored messages, and check a corpus of HL7 files."""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import socket
import sys
import warnings
from contextlib import suppress
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from hms_ach.app.cli_common import ConfigOpt, MessageStatus, progress
from hms_ach.app.cli_common import load_or_exit as _load
from hms_ach.app.cli_common import parse_since as _parse_since
from hms_ach.app.cli_common import store_of as _store
from hms_ach.app.config import Config, LoggingSettings, load_config, tls_errors
from hms_ach.core.errors import ConfigError, ConfigErrors
from hms_ach.core.redact import error_kind, redact_url
from hms_ach.core.types import ChannelSettings

if TYPE_CHECKING:
    from hms_ach.app.runtime import Engine

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="hms-ach: an HL7 v2 / FHIR R4 integration engine.",
)


class _JsonLogFormatter(logging.Formatter):
    """One JSON object per line: ts, level, event (the message), logger, then the record's extra
    fields. An extra ``event`` string is the event's name (it wins over the message); another extra
    field named like one of the first four is written as ``field_<name>``. An
    exception is written as its kind and where it was raised, never its text (see _exception_fields)."""

    _skip = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}
    _reserved = frozenset({"ts", "level", "event", "logger"})

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        for key, value in vars(record).items():
            if key == "event" and isinstance(value, str):
                data["event"] = value  # a structured event's stable name (the message holds its k=v text)
            elif key not in self._skip:
                data[f"field_{key}" if key in self._reserved else key] = value
        if record.exc_info and record.exc_info[1] is not None:
            data.update(_exception_fields(record.exc_info[1]))
        return json.dumps(data, default=str)


def _exception_fields(exc: BaseException) -> dict[str, Any]:
    """An exception for a log line without its text, which can hold field values (a python-hl7
    decode error) or bound SQL parameters: its kind (type, SQLSTATE), its causes' kinds, and where
    it was raised (file:line in function, innermost last)."""
    import traceback

    causes: list[str] = []
    seen = exc.__cause__ or exc.__context__
    while seen is not None and len(causes) < 5:
        causes.append(error_kind(seen))
        seen = seen.__cause__ or seen.__context__
    frames = traceback.extract_tb(exc.__traceback__)[-8:]
    return {
        "exception": error_kind(exc),
        "exception_causes": causes,
        "exception_at": [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in frames],
    }


#: Libraries whose INFO/DEBUG lines carry values: httpx logs each request's URL (a conditional
#: FHIR URL holds an identifier), SQLAlchemy its statements, asyncssh file names, aio-pika frames.
#: They log warnings and errors only; uvicorn's access log is replaced by http.request events.
_QUIET_LOGGERS = ("httpx", "httpcore", "sqlalchemy", "asyncssh", "aio_pika", "aiormq", "uvicorn.access")


def _quiet_libraries() -> None:
    """Quiet the libraries that log values. python-hl7 logs the field it cannot unescape and the
    segment it cannot place, at WARNING and ERROR, under loggers named by its files' paths: those
    are silenced (what it could not decode still reaches our parser and its ERR)."""
    import hl7.containers
    import hl7.util

    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for module in (hl7.util, hl7.containers):
        logging.getLogger(module.__file__).setLevel(logging.CRITICAL + 1)


def _setup_logging(level: str = "INFO", settings: LoggingSettings | None = None, stream: Any = None) -> None:
    """Log JSON lines to ``stream`` (stderr) from the root logger at ``level``: exceptions without
    their text, repeated identical warnings and errors rate-limited as ``settings`` say (on by
    default), and the chatty libraries quieted. Called again once channels.yaml is read."""
    from hms_ach.core.logs import RateLimitedHandler

    settings = settings or LoggingSettings()
    handler: logging.Handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_JsonLogFormatter())
    if settings.rate_limit_enabled:
        handler = RateLimitedHandler(
            handler, burst=settings.rate_limit_burst, interval_seconds=settings.rate_limit_interval_seconds
        )
    root = logging.getLogger()
    for old in root.handlers:
        try:
            old.flush()  # a replaced rate limiter writes its pending summaries first
        except (ValueError, OSError):  # its stream is gone (closed): nothing more can be written there
            pass
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _quiet_libraries()


@app.command()
def run(
    config: ConfigOpt = Path("channels.yaml"),
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Start every channel in channels.yaml and the HTTP API (FHIR R4 at /fhir)."""
    from hms_ach.app import eventloop
    from hms_ach.app.runtime import Engine
    from hms_ach.channels.mllp import MllpChannelConfig

    _setup_logging(log_level)
    cfg = _load(config)
    _setup_logging(log_level, cfg.logging)
    unusable_tls = tls_errors(cfg)
    if unusable_tls:
        typer.echo("\n".join(unusable_tls), err=True)
        raise typer.Exit(2)
    try:
        engine = Engine(cfg)
    except (ConfigErrors, ConfigError) as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    except Exception as exc:  # noqa: BLE001 - the store cannot be opened (bad URL, unreachable): one line
        from hms_ach.store.db import database_url

        first = redact_url(str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        typer.echo(
            f"hms-ach: cannot open the store {redact_url(database_url(cfg.engine.database_url))}: "
            f"{type(exc).__name__}: {first}"[:500],
            err=True,
        )
        raise typer.Exit(1) from exc
    for ch in cfg.channels:
        port = ch.port if isinstance(ch, MllpChannelConfig) else None
        typer.echo(
            f"channel {ch.name} ({ch.type})"
            + (f" on port {port}{_mllp_tls_note(ch)}" if isinstance(ch, MllpChannelConfig) else ""),
            err=True,
        )
    if cfg.http.enabled:
        scheme = "https" if cfg.http.tls_files() else "http"
        shown = "localhost" if cfg.http.host in ("0.0.0.0", "::", "") else cfg.http.host  # an allowed Host
        typer.echo(f"FHIR R4 API on {scheme}://{shown}:{cfg.http.port}/fhir", err=True)
        typer.echo(_auth_line(cfg), err=True)
    typer.echo(f"store: {redact_url(engine.store.url)}; event loop: {eventloop.loop_name()}", err=True)
    try:
        eventloop.run(_serve(engine))
    except KeyboardInterrupt:
        pass
    except _StartError as exc:
        typer.echo(f"hms-ach: {exc}", err=True)
        raise typer.Exit(1) from None
    except _StopTimeout as exc:
        typer.echo(f"hms-ach: {exc}", err=True)
        _exit_now(1)  # what is still running (a stuck commit, a worker thread) must not hold the exit
    except SystemExit as exc:  # uvicorn exits from its task (out of the loop) when it cannot bind
        if not cfg.http.enabled or engine.http_port is not None:
            raise
        typer.echo(f"hms-ach: {_start_failure(engine, exc)}", err=True)
        raise typer.Exit(1) from None


def _mllp_tls_note(channel: Any) -> str:
    """How an mllp channel is reached, for the start-up lines: TLS or not, and from where."""
    from hms_ach.channels.mllp import effective_config

    settings = effective_config(channel)
    tls = settings.tls
    how = "" if tls is None else (", TLS with client certificates" if tls.client_ca else ", TLS")
    return f"{how}, from {', '.join(settings.allow_from)}"


class _StartError(Exception):
    """The engine could not start (a port in use...): the one line ``hms-ach run`` prints."""


class _StopTimeout(Exception):
    """The drain did not finish within ``engine.shutdown_grace_seconds`` (the line says what ran)."""


#: Seconds past ``engine.shutdown_grace_seconds`` after which a stuck process exits all the same.
_HARD_EXIT_MARGIN_SECONDS = 10.0


def _exit_now(code: int) -> None:
    """Flush what was written and end the process at once, without waiting for threads."""
    import os

    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    logging.shutdown()
    os._exit(code)


def _install_stop_signals(engine: Engine) -> list[int]:
    """SIGTERM and SIGINT drain the engine (:meth:`Engine.request_stop`); a second one during the
    drain exits at once with 128 + the signal's number. Returns the signals handled this way."""
    import signal
    import threading

    loop = asyncio.get_running_loop()
    log = logging.getLogger("hms_ach.app.cli")

    def on_signal(sig: signal.Signals) -> None:
        if engine.request_stop(sig.name):
            grace = engine.config.engine.shutdown_grace_seconds
            backstop = threading.Timer(grace + _HARD_EXIT_MARGIN_SECONDS, _backstop, args=(grace,))
            backstop.daemon = True  # the process hangs past the grace period: exit all the same
            backstop.start()
            return
        log.warning("engine.stop_forced", extra={"signal": sig.name, "phase": engine.stop_phase})
        _exit_now(128 + int(sig))

    def _backstop(grace: float) -> None:
        log.error("engine.stop_hung", extra={"grace_seconds": grace, "phase": engine.stop_phase})
        _exit_now(1)

    handled: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
        except (NotImplementedError, RuntimeError):  # no signal handlers on this loop (Windows)
            continue
        handled.append(sig)
    return handled


#: How long a thread holding the interpreter lock runs before a waiting one gets it (Python's
#: default is 5 ms). The event loop waits for it after every socket wait: while the writer or a
#: Bundle's validation keep the lock busy, 1 ms keeps the other channels' ACKs prompt.
SWITCH_INTERVAL_SECONDS = 0.001
#: Allocations between two young garbage collections (Python's default is 700). A request's or a
#: message's objects are mostly garbage before this many more are made, so they die young instead
#: of being promoted and walked again by full collections: with the default, a flood of
#: 1,000-entry Bundles triggered a full collection every half second, pausing every channel for up
#: to 0.1 s each time.
GC_YOUNG_THRESHOLD = 50_000


def tune_interpreter() -> None:
    """Set up the interpreter for serving (``hms-ach run`` calls it before it starts the engine).

    What is loaded by then (modules, FHIR models, the mappings) lives as long as the process:
    frozen (``gc.freeze``), it is left out of the full garbage collections, which otherwise pause
    every channel for about 0.3 s on a busy machine. Young collections run less often
    (``GC_YOUNG_THRESHOLD``), the switch interval is shortened, and the heap start-up freed is
    given back (:func:`release_free_heap`).
    """
    import gc

    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    release_free_heap()


def release_free_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Start-up frees most of what it allocates: compiling the mappings alone peaks about 30 MB above
    what it keeps. glibc keeps such freed memory in the process, so RSS stayed that much higher for
    the engine's whole life; trimming once here returns it (issue 20)."""
    import ctypes

    with suppress(OSError, AttributeError, TypeError):  # not glibc: no malloc_trim (or no CDLL(None))
        ctypes.CDLL(None).malloc_trim(0)


async def _serve(engine: Engine) -> None:
    """``engine.serve()`` with SIGTERM and SIGINT draining it gracefully, a failure to start (a
    port in use) turned into a _StartError, a store that stayed unreachable (the engine gave up on
    it) into one line too, and a drain past its grace period into a _StopTimeout."""
    from hms_ach.app.runtime import ShutdownTimeout
    from hms_ach.store.errors import StoreUnavailable

    handled = _install_stop_signals(engine)
    tune_interpreter()
    try:
        await engine.serve()
    except ShutdownTimeout as exc:
        raise _StopTimeout(str(exc)) from None
    except StoreUnavailable as exc:  # serve() stopped everything before it raised this
        raise _StartError(
            f"the store stayed unreachable; stopping so that a supervisor restarts: {exc}"
        ) from None
    except ConfigError as exc:  # auth refused (mode off on a public address), an unusable signing key
        with suppress(Exception):
            await engine.stop()
        raise _StartError(exc.render()) from None
    except OSError as exc:
        text = _start_failure(engine, exc)
        with suppress(Exception):
            await engine.stop()  # what did start (the writer, earlier channels) is stopped
        raise _StartError(text) from None
    finally:
        loop = asyncio.get_running_loop()
        for sig in handled:
            loop.remove_signal_handler(sig)


def _start_failure(engine: Engine, exc: BaseException) -> str:
    """Where the start failed and why: the first enabled channel that did not start, else HTTP."""
    import errno
    import os
    import socket

    from hms_ach.channels.mllp import MllpChannelConfig

    cfg: Config = engine.config
    failed = next((ch for ch in cfg.channels if ch.enabled and ch.name not in engine.channels), None)
    if isinstance(failed, MllpChannelConfig):
        host, port, what = failed.host, failed.port, f"channel {failed.name}"
    elif failed is not None:
        return f"channel {failed.name} ({failed.type}) cannot start: {type(exc).__name__}: {exc}"
    else:
        host, port, what = cfg.http.host, cfg.http.port, "the HTTP API"
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # uvicorn logged the reason and exited: find it by binding the address ourselves
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            try:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, port))
            except OSError as bind_error:
                code = bind_error.errno
    reason = (
        "address already in use"
        if code == errno.EADDRINUSE
        else (os.strerror(code).lower() if code else "it did not start")
    )
    return f"cannot listen on {host}:{port} ({what}): {reason}"


@app.command()
def check(config: ConfigOpt = Path("channels.yaml")) -> None:
    """Validate channels.yaml and every mapping; print file:line:col: message per error."""
    from hms_ach.mapping.loader import load_mappings

    errors: list[str] = []
    cfg: Config | None = None
    try:
        cfg = load_config(config)
    except ConfigErrors as exc:
        errors.extend(e.render() for e in exc.errors)
    if cfg is not None:
        errors.extend(_auth_errors(config, cfg))
        errors.extend(tls_errors(cfg))
    mappings_dir = cfg.mappings_dir if cfg else config.resolve().parent / "mappings"
    try:
        mset = load_mappings(mappings_dir)
    except ConfigErrors as exc:
        errors.extend(e.render() for e in exc.errors)
        mset = None
    if mset is not None:  # the workflow goldens replay cases through the workflows
        from hms_ach.cases import workflow_goldens

        for golden in workflow_goldens.discover(mappings_dir):
            errors.extend(r.report() for r in workflow_goldens.run_file(golden, mset) if not r.passed)
    if cfg is not None and mset is not None:
        from hms_ach.outbound.hl7_generate import generators
        from hms_ach.outbound.mllp_sink import unknown_transforms

        generated = set(generators(mset))
        errors.extend(unknown_transforms(list(cfg.sinks), set(mset.transforms), str(config), generated))
    for line in errors:
        typer.echo(line)
    if errors:
        typer.echo(f"{len(errors)} error(s)", err=True)
        raise typer.Exit(1)
    assert mset is not None
    typer.echo(
        f"ok: {config} with {len(cfg.channels) if cfg else 0} channel(s); "
        f"{len(mset.files())} mapping file(s) in {mappings_dir}"
    )


def _auth_line(cfg: Config) -> str:
    """How callers authenticate, for the start-up lines of ``hms-ach run``."""
    from hms_ach.auth.settings import with_environment

    try:
        settings = with_environment(cfg.auth)
    except ConfigError:
        return "auth: invalid (see the error below)"
    return {
        "local": 'auth: local (bearer tokens from: hms-ach token --scope "user/*.rs")',
        "oidc": f"auth: oidc, tokens of {settings.issuer}",
        "off": "auth: OFF (every request is let in; loopback only)",
    }[settings.mode]


def _auth_errors(path: Path, cfg: Config) -> list[str]:
    """What ``hms-ach run`` would refuse in ``auth:``: invalid environment overrides, ``mode: off``
    with a listener on a non-loopback address."""
    from hms_ach.app.runtime import auth_settings

    try:
        auth_settings(cfg)
    except ConfigError as exc:
        return [f"{path}: auth: {exc.render()}"]
    return []


@app.command()
def send(
    files: Annotated[list[Path], typer.Argument(help="HL7 files (one or more messages each)")],
    host: Annotated[
        str | None,
        typer.Option(help="default: the first MLLP channel's host in --config (127.0.0.1 for 0.0.0.0)"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="default: HMS_ACH_MLLP_PORT, else the first MLLP channel's port in --config, else 2575"
        ),
    ] = None,
    config: ConfigOpt = Path("channels.yaml"),
    timeout: Annotated[
        float, typer.Option(help="seconds to wait for each message's ACKs (those always asked for)")
    ] = 30.0,
    conditional_ack_wait: Annotated[
        float,
        typer.Option(
            help="seconds to wait for an ACK a message asks for only on error or only on success "
            "(MSH-15 or MSH-16 ER/SU), once the others are in"
        ),
    ] = 1.0,
    tls: Annotated[
        bool,
        typer.Option(
            "--tls",
            help="MLLP over TLS (1.2 or later); the server's certificate must be trusted (the system's "
            "CAs, or --cacert) and name --host",
        ),
    ] = False,
    cacert: Annotated[
        Path | None, typer.Option(help="PEM CA certificate(s) to trust for the server (with --tls)")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(help="PEM client certificate to present, for mutual TLS (with --tls)")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(help="PEM private key of --cert (default: inside the --cert file)")
    ] = None,
) -> None:
    """Send HL7 v2 files over MLLP and print each ACK: in enhanced mode the commit ACK as MSH-15 asks
    and the application ACK as MSH-16 asks (none is awaited for a message with MSH-15 and MSH-16 NE).

    A timeout or a lost connection fails that message only: the next one is sent on a new
    connection (a message whose MSH-16 AL asked for an application ACK fails when none came in
    time). The exit status is 1 when any message failed or got a negative ACK (not AA or CA)."""
    from hms_ach.core.errors import MessageError
    from hms_ach.core.tls import TlsConfigError, client_context
    from hms_ach.hl7v2.client import send_each, split_messages

    if not tls and (cacert or cert or key):
        typer.echo("--cacert, --cert and --key need --tls", err=True)
        raise typer.Exit(2)
    ssl_context = None
    if tls:
        try:
            ssl_context = client_context(
                str(cacert) if cacert else None, str(cert) if cert else None, str(key) if key else None
            )
        except TlsConfigError as exc:
            typer.echo(exc.render(), err=True)
            raise typer.Exit(2) from exc
    host, port = _send_address(config, host, port)
    batch: list[tuple[Path, bytes]] = []
    unreadable = 0  # a file that cannot be read fails alone: the others are still sent
    for f in files:
        try:
            batch.extend((f, msg) for msg in split_messages(f.read_bytes()))
        except OSError as exc:
            typer.echo(f"{f}: cannot read: {exc.strerror}", err=True)
            unreadable += 1
        except MessageError as exc:
            typer.echo(f"{f}: not an HL7 v2 message file: {exc}", err=True)
            unreadable += 1
    if not batch:
        typer.echo("no HL7 messages found in the files given", err=True)
        raise typer.Exit(1)
    results = asyncio.run(
        send_each(
            host,
            port,
            [m for _, m in batch],
            timeout=timeout,
            conditional_wait=conditional_ack_wait,
            ssl_context=ssl_context,
        )
    )
    failures = 0
    for (f, _), sent in zip(batch, results, strict=True):
        if sent.error is not None:
            failures += 1
            typer.echo(f"== {f} -> failed: {sent.error}\n", err=True)
            continue
        if not sent.acks:
            typer.echo(f"== {f} -> sent (MSH-15/16 NE: no ACK expected)\n")
            continue
        failed = False
        for ack in sent.acks:
            text = ack.decode("utf-8", errors="replace").replace("\r", "\n").strip()
            code = _msa_1(text)
            failed = failed or code not in ("AA", "CA")
            kind = "application ACK" if ack is sent.app_ack else "ACK"
            typer.echo(f"== {f} -> {kind} {code}\n{text}\n")
        failures += failed
    if failures:
        typer.echo(f"{failures} of {len(batch)} message(s) failed or got no positive ACK", err=True)
    if unreadable:
        typer.echo(f"{unreadable} file(s) could not be read or held no HL7 message", err=True)
    raise typer.Exit(1 if failures or unreadable else 0)


def _send_address(config: Path, host: str | None, port: int | None) -> tuple[str, int]:
    """Where ``hms-ach send`` connects: the options, else what ``hms-ach run`` listens on with the same
    environment (HMS_ACH_MLLP_PORT, or the first MLLP channel of ``config``), else 127.0.0.1:2575."""
    import os

    from hms_ach.channels.mllp import MllpChannelConfig

    env_port = os.environ.get("HMS_ACH_MLLP_PORT", "")
    if port is None and env_port.isdigit():
        port = int(env_port)
    if (host is None or port is None) and config.exists():
        channel = next((c for c in _load(config).channels if isinstance(c, MllpChannelConfig)), None)
        if channel is not None:
            bound = str(channel.host)
            host = host or ("127.0.0.1" if bound in ("0.0.0.0", "::", "") else bound)  # noqa: S104 - a client
            port = port if port is not None else int(channel.port)
    return host or "127.0.0.1", port if port is not None else 2575


def _msa_1(text: str) -> str:
    """MSA-1 of an ACK printed with LF between segments ('?' without an MSA)."""
    sep = text[3] if len(text) > 3 else "|"
    return next((line.split(sep)[1] for line in text.split("\n") if line.startswith("MSA" + sep)), "?")


def _os_user() -> str | None:
    """The operating-system user running this command (the actor of what it changes), or None."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER: a bare container
        return None


@app.command()
def replay(
    ids: Annotated[list[int] | None, typer.Argument(help="message ids (see hms-ach messages)")] = None,
    config: ConfigOpt = Path("channels.yaml"),
    status: Annotated[MessageStatus | None, typer.Option(help="replay the messages with this status")] = None,
    since: Annotated[
        str | None, typer.Option(help="replay the messages received since (ISO time or 2h, 7d)")
    ] = None,
    mapping_dir: Annotated[
        Path | None,
        typer.Option(help="use these mappings instead of the configured ones", exists=True, file_okay=False),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would change; write nothing")] = False,
    apply: Annotated[
        bool, typer.Option("--apply", help="write the changes (the default without --dry-run)")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no diffs, one line per message")] = False,
) -> None:
    """Re-run stored messages through the current (or --mapping-dir) mappings; --dry-run shows the diff.

    HL7 v2 messages, FHIR writes (fhir_rest) and bad CSV rows (sftp_csv) are each run again the way
    they came in."""
    from hms_ach.fhir.replay import fhir_replayer
    from hms_ach.hl7v2.policy import Hl7PolicySettings
    from hms_ach.ingest.replay import replay_messages, replayers
    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings
    from hms_ach.store import messages as store_messages

    if dry_run and apply:
        raise typer.BadParameter("give --dry-run or --apply, not both")
    cfg = _load(config) if config.exists() else Config()
    store = _store(config)
    try:
        mset = load_mappings(mapping_dir or cfg.mappings_dir)
    except ConfigErrors as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    targets = list(ids or [])
    if status or since:
        with store.read() as conn:
            targets += store_messages.ids_since(conn, _parse_since(since), status.value if status else None)
    if not targets:
        typer.echo("nothing to replay: give message ids, --status or --since", err=True)
        raise typer.Exit(1)
    policies = {
        ch.name: ch.hl7_policy(ch.name)
        for ch in cfg.channels
        if isinstance(ch, ChannelSettings) and isinstance(ch, Hl7PolicySettings)
    }
    from hms_ach.channels.fhir_rest import FhirRestChannelConfig

    bundle_limits = [ch.max_bundle_entries for ch in cfg.channels if isinstance(ch, FhirRestChannelConfig)]
    from hms_ach.app.wiring import wire_listeners
    from hms_ach.outbound import events

    engine = MappingEngine(mset, cfg.engine.timezone)
    wire_listeners()  # replayed changes write their events and claims, as in the engine
    events.use_engine(engine)  # the replayed changes' event payloads come from mappings/events/
    table = {  # content type -> replayer: how each kind of message is run again
        **replayers(engine, policies),
        "fhir+json": fhir_replayer(engine, max(bundle_limits, default=1000)),
    }
    from hms_ach.store.audit import actor_json

    who = actor_json(kind="replay", command="hms-ach replay", user=_os_user(), host=socket.gethostname())
    ids = sorted(set(targets))
    with progress("replay", len(ids)) as advance:
        reports = replay_messages(store, ids, table, apply=not dry_run, actor=who, on_each=advance)
    store.dispose()
    changed = 0
    for r in reports:
        changed += bool(r.changes)
        typer.echo(
            f"message {r.message_id} {r.message_type}: {r.status_before} -> {r.status_after} {r.ack_code}"
            + (f" ({r.error})" if r.error else "")
            + f", {len(r.changes)} record(s) would change".replace(
                "would change", "changed" if not dry_run else "would change"
            )
        )
        if not quiet:
            for c in r.changes:
                typer.echo(f"  {'new ' if c.created else ''}{c.reference}")
                if c.diff:
                    typer.echo("\n".join("    " + line for line in c.diff.splitlines()))
    verb = "would change" if dry_run else "changed"
    typer.echo(
        f"{len(reports)} message(s) replayed, {changed} {verb} the store"
        + (" (dry run: nothing written)" if dry_run else "")
    )
    failed = sum(1 for r in reports if r.status_after != "processed")
    raise typer.Exit(1 if failed and not dry_run else 0)


mapping_app = typer.Typer(no_args_is_help=True, help="Preview and test mappings without a running engine.")
app.add_typer(mapping_app, name="mapping")


def _mappings_dir(config: Path, mapping_dir: Path | None) -> Path:
    if mapping_dir is not None:
        return mapping_dir
    cfg = _load(config) if config.exists() else Config()
    return cfg.mappings_dir


class PreviewFormat(StrEnum):
    """How ``mapping preview`` prints."""

    text = "text"
    json = "json"


@mapping_app.command("preview")
def mapping_preview(
    sample: Annotated[
        Path,
        typer.Argument(
            help="an HL7 v2 file, a CSV file (with --dataset) or a FHIR resource as JSON",
            exists=True,
            dir_okay=False,
        ),
    ],
    config: ConfigOpt = Path("channels.yaml"),
    mapping_dir: Annotated[
        Path | None, typer.Option(help="mapping directory to use", exists=True, file_okay=False)
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(help="the CSV dataset (e.g. staff_roster): SAMPLE is a CSV file, each row previewed"),
    ] = None,
    row: Annotated[
        int | None, typer.Option(help="with --dataset: only the row on this line of the file")
    ] = None,
    fmt: Annotated[PreviewFormat, typer.Option("--format", help="text or json")] = PreviewFormat.text,
    timezone: str = "UTC",
    transform: Annotated[
        str | None,
        typer.Option(
            help="a kind: hl7 transform (mappings/hl7/): show the message after it and which rule changed what"
        ),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            help="a channel name: show where this source stands for each Practitioner element "
            "(workforce.survivorship of --config; docs/survivorship.md)"
        ),
    ] = None,
) -> None:
    """Show the input, the records and FHIR resources it yields, and field lineage. Writes nothing.

    HL7 v2 by default; a CSV file with --dataset (the mapping of that dataset, as the sftp_csv and
    file_drop channels use it); a .json file (or one starting with "{") as a FHIR write."""
    from hms_ach.core.errors import MessageError
    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings

    try:
        engine = MappingEngine(load_mappings(_mappings_dir(config, mapping_dir)), timezone)
    except ConfigErrors as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    data = sample.read_bytes()
    if transform is not None:
        previews = _transform_previews(engine, transform, data)
    elif dataset is not None:
        previews = _csv_previews(engine, sample, data, dataset, row)
    elif sample.suffix.lower() == ".json" or data.lstrip()[:1] == b"{":
        previews = _fhir_previews(engine, sample, data)
    else:
        previews = _hl7_previews(engine, data)
    failed = False
    for pv in previews:
        if isinstance(pv, MessageError):
            typer.echo(f"{sample}: {pv.ack_code} {pv.code} at {pv.location or '-'}: {pv.message}", err=True)
            failed = True
            continue
        standing = None
        if source is not None and hasattr(pv, "result"):  # a transform preview has no records
            standing = _survivorship_lines(config, pv.result, source)
        if fmt == "json":
            body = pv.to_dict() | ({"survivorship": standing} if standing is not None else {})
            typer.echo(json.dumps(body, indent=2, ensure_ascii=False))
        else:
            text = pv.to_text()
            if standing is not None:
                text += f"\n\n== survivorship (as source {source})\n" + "\n".join(f"  {x}" for x in standing)
            typer.echo(text)
    raise typer.Exit(1 if failed else 0)


def _transform_previews(engine: Any, name: str, data: bytes) -> list[Any]:
    """One transform preview per message of ``data`` (docs/hl7-routing.md)."""
    from hms_ach.hl7v2.client import split_messages
    from hms_ach.mapping.hl7_transform import TransformError
    from hms_ach.mapping.preview import preview_transform

    out: list[Any] = []
    generated = data.lstrip()[:1] == b"{"  # the records JSON of a generate file (docs/hl7-routing.md)
    for raw in [data] if generated else split_messages(data) or [data]:
        try:
            out.append(preview_transform(engine, name, raw))
        except KeyError as exc:
            typer.echo(str(exc.args[0]), err=True)
            raise typer.Exit(2) from exc
        except TransformError as exc:
            from hms_ach.core.errors import ContentError

            out.append(ContentError(exc.message, exc.location))
    return out


def _survivorship_lines(config: Path, result: Any, source: str) -> list[str]:
    """Where ``source`` stands for each element of the Practitioner records of ``result``."""
    from hms_ach.workforce.survivorship import explain

    rules = (_load(config) if config.exists() else Config()).workforce.survivorship
    lines: list[str] = []
    for rec in result.records:
        if rec.resource_type == "Practitioner":
            lines.append(f"Practitioner key {rec.key}")
            lines.extend(f"  {line}" for line in explain(rec.content, source, rules))
    return lines


def _hl7_previews(engine: Any, data: bytes) -> list[Any]:
    from hms_ach.core.errors import MessageError
    from hms_ach.hl7v2.client import split_messages
    from hms_ach.hl7v2.parse import parse
    from hms_ach.mapping.preview import preview

    out: list[Any] = []
    try:
        chunks = split_messages(data) or [data]
    except MessageError as exc:
        return [exc]
    for raw in chunks:
        try:
            out.append(preview(engine, parse(raw)))
        except MessageError as exc:
            out.append(exc)
    return out


def _csv_previews(engine: Any, sample: Path, data: bytes, dataset: str, row: int | None) -> list[Any]:
    """One preview per row of the CSV ``data`` (the header is line 1), or of line ``row`` only."""
    import csv
    import io

    from hms_ach.core.errors import MessageError
    from hms_ach.mapping.paths import CsvRecord
    from hms_ach.mapping.preview import preview_csv_row

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        typer.echo(f"{sample}: not UTF-8 text at byte {exc.start}", err=True)
        raise typer.Exit(1) from exc
    reader = csv.DictReader(io.StringIO(text))
    out: list[Any] = []
    for values in reader:
        line = reader.line_num
        if row is not None and line != row:
            continue
        record = CsvRecord(
            {k: v or "" for k, v in values.items() if k is not None}, line, sample.name, list(values)
        )
        try:
            out.append(preview_csv_row(engine, dataset, record))
        except MessageError as exc:
            out.append(exc)
    if not out:
        typer.echo(f"{sample}: no data row" + (f" on line {row}" if row is not None else ""), err=True)
        raise typer.Exit(1)
    return out


def _fhir_previews(engine: Any, sample: Path, data: bytes) -> list[Any]:
    """The preview of a FHIR resource, or of each entry's resource of a Bundle (a transaction or
    batch as a client would POST it)."""
    from hms_ach.core.errors import MessageError
    from hms_ach.mapping.preview import preview_fhir

    try:
        resource = json.loads(data)
    except ValueError as exc:
        typer.echo(f"{sample}: not JSON: {exc}", err=True)
        raise typer.Exit(1) from exc
    if not isinstance(resource, dict):
        typer.echo(f"{sample}: a FHIR resource is a JSON object", err=True)
        raise typer.Exit(1)
    resources = [resource]
    if resource.get("resourceType") == "Bundle":
        entries = resource.get("entry")
        listed: list[Any] = entries if isinstance(entries, list) else []
        resources = [
            e["resource"] for e in listed if isinstance(e, dict) and isinstance(e.get("resource"), dict)
        ]
    out: list[Any] = []
    for item in resources:
        try:
            out.append(preview_fhir(engine, item))
        except MessageError as exc:
            out.append(exc)
    return out


@mapping_app.command("coverage")
def mapping_coverage(
    samples: Annotated[list[Path], typer.Argument(help="HL7 v2 sample files")],
    config: ConfigOpt = Path("channels.yaml"),
    mapping_dir: Annotated[
        Path | None, typer.Option(help="mapping directory to use", exists=True, file_okay=False)
    ] = None,
) -> None:
    """List the fields populated in the samples that no mapping reads: what the mappings drop."""
    from hms_ach.core.errors import MessageError
    from hms_ach.hl7v2.client import split_messages
    from hms_ach.hl7v2.parse import parse
    from hms_ach.mapping.coverage import Coverage
    from hms_ach.mapping.engine import MappingEngine
    from hms_ach.mapping.loader import load_mappings

    try:
        engine = MappingEngine(load_mappings(_mappings_dir(config, mapping_dir)))
    except ConfigErrors as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    cov = Coverage()
    for sample in samples:
        try:
            chunks = split_messages(sample.read_bytes())
        except (OSError, MessageError) as exc:
            cov.errors.append(f"{sample}: {exc}")
            continue
        for raw in chunks:
            try:
                cov.add(engine, parse(raw))
            except MessageError as exc:
                cov.errors.append(f"{sample}: {exc}")
    typer.echo(cov.to_text())


@mapping_app.command("test")
def mapping_test(
    path: Annotated[Path | None, typer.Argument(help="a *_test.yaml file or a folder")] = None,
    config: ConfigOpt = Path("channels.yaml"),
    mapping_dir: Annotated[
        Path | None, typer.Option(help="mapping directory to use", exists=True, file_okay=False)
    ] = None,
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="after showing each failure's diff, rewrite that case's expect: with what it produces now",
        ),
    ] = False,
) -> None:
    """Run the golden tests (*_test.yaml beside the mappings); print a diff for each failure.

    With --update the failing cases' expectations are rewritten in their files (review them with
    git diff); the exit status is then 0 when every failing case was rewritten."""
    from hms_ach.hl7v2.parse import parse
    from hms_ach.mapping import goldens
    from hms_ach.mapping.loader import load_mappings

    root = _mappings_dir(config, mapping_dir)
    try:
        mset = load_mappings(root)
    except ConfigErrors as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    from hms_ach.cases import workflow_goldens
    from hms_ach.mapping.golden_update import update_golden_file

    target = path or root
    files = [target] if target.is_file() else goldens.discover(target)
    files = sorted({*files, *workflow_goldens.discover(target)})
    passed = failed = rewritten = 0
    updated: list[str]
    for f in files:
        if goldens.is_workflow_golden(f):  # replayed through the workflow (no --update for these)
            results, updated = workflow_goldens.run_file(f, mset), []
        elif update:
            try:
                results, updated = update_golden_file(f, mset, Path.cwd(), parse)
            except ConfigErrors as exc:
                results, updated = [goldens.CaseResult(f.name, False, message=str(exc), file=str(f))], []
        else:
            results, updated = goldens.run_golden_file(f, mset, Path.cwd(), parse), []
        for case in results:
            if case.passed:
                passed += 1
                typer.echo(f"PASS {f}::{case.name}")
            else:
                failed += 1
                typer.echo(f"FAIL {case.report()}")
                if case.name in updated:
                    rewritten += 1
                    typer.echo(f"UPDATED {f}::{case.name}: expect: now holds what it produces")
    typer.echo(f"{passed} passed, {failed} failed" + (f", {rewritten} updated" if update else ""))
    raise typer.Exit(1 if failed > rewritten else 0)


@app.command()
def docs(root: Annotated[Path, typer.Option(help="repository root")] = Path(".")) -> None:
    """Write docs/mapping-language.md, generated from the mapping schema and function registry."""
    from hms_ach.mapping.docs import write_docs

    typer.echo(f"wrote {write_docs(root)}")


schema_app = typer.Typer(no_args_is_help=True, help="JSON Schemas for editor completion.")
app.add_typer(schema_app, name="schema")


@schema_app.command("mapping")
def schema_mapping(output: Annotated[Path | None, typer.Option("--output", "-o")] = None) -> None:
    """Print (or write) the JSON Schema of mapping files."""
    from hms_ach.mapping.docs import json_schema

    text = json.dumps(json_schema(), indent=2)
    if output:
        output.write_text(text + "\n", encoding="utf-8")
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text)


from hms_ach.app import cli_corpus, cli_init, cli_messages  # noqa: E402 - corpus-check, init, messages
from hms_ach.app.jobs_cli import jobs_app  # noqa: E402 - `hms-ach jobs` and `hms-ach jobs run NAME`

app.add_typer(jobs_app, name="jobs")
from hms_ach.app.cli_console import console_command  # noqa: E402 - `hms-ach console`

app.command("console")(console_command)
app.add_typer(cli_messages.messages_app, name="messages")
app.command("init")(cli_init.init)
app.command("corpus-check")(cli_corpus.corpus_check)
from hms_ach.app.cli_notify import notify_app  # noqa: E402 - `hms-ach notify preview|test`

app.add_typer(notify_app, name="notify")

audit_app = typer.Typer(no_args_is_help=True, help="The audit trail of record changes.")
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    config: ConfigOpt = Path("channels.yaml"),
    database: Annotated[str | None, typer.Option(help="store URL (default: from the config)")] = None,
) -> None:
    """Check the audit trail against its key and its signed checkpoints (docs/audit.md).

    Exit 0 with "intact: N entries, last checkpoint at T"; exit 1 with one line naming what was
    found: an edited entry, a chain recomputed without the key, deleted entries, a truncated tail,
    a forged checkpoint."""
    from hms_ach.store import access_log, audit
    from hms_ach.store.audit_checkpoints import CheckpointError, read_checkpoints
    from hms_ach.store.audit_keys import attach, open_seal
    from hms_ach.store.db import Store, database_url

    cfg = _load(config) if config.exists() else Config()
    try:
        seal = open_seal(cfg.audit, cfg.data_dir, create=False)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc

    def broken(problem: str, reason: str) -> NoReturn:
        typer.echo(f"audit trail NOT intact: {problem}: {reason}", err=True)
        raise typer.Exit(1)

    cp_path = seal.checkpoint_path
    if seal.key is None:
        if cp_path is not None and cp_path.exists():
            broken("no-key", f"there is no audit key at {seal.key_path}, so the checkpoints in {cp_path} "
                   "cannot be checked (set audit.key_file or HMS_ACH_AUDIT_KEY_FILE)")  # fmt: skip
        checkpoints = []
    else:
        try:
            checkpoints = read_checkpoints(cp_path, seal) if cp_path is not None else []
        except CheckpointError as exc:
            broken(exc.kind, str(exc))
    url = database or database_url(cfg.engine.database_url)
    access: access_log.ChainResult | None = None
    try:
        store = Store(url)
        try:
            attach(store, seal)
            with store.read() as conn:
                result = audit.verify(conn, seal, checkpoints)
                if seal.key is not None:  # the access records are chained under the same key
                    access = access_log.verify_chain(conn, checkpoints)
        finally:
            store.dispose()
    except Exception as exc:  # noqa: BLE001 - the store cannot be read (bad URL, unreachable): one line
        typer.echo(f"hms-ach: cannot read the store {redact_url(url)}: {type(exc).__name__}", err=True)
        raise typer.Exit(2) from exc
    if not result.ok:
        broken(result.problem, result.reason)
    if access is not None and not access.ok:
        broken(access.problem, access.reason)
    last = result.last_checkpoint
    line = f"intact: {result.checked} entries, " + (
        f"last checkpoint at {last.at} ({last.count} entries)" if last else "no checkpoint yet"
    )
    if access is not None and access.checked:
        line += f"; {access.checked} access records chained"
    if seal.key is None:
        line += f"; no audit key at {seal.key_path}: only the unkeyed chain was checked"
    elif result.legacy:
        line += f"; the first {result.legacy} carry the unkeyed chain written before the key"
    typer.echo(line)


outbox_app = typer.Typer(help="The outbox of outbound events: what waits, what was delivered, dead letters.")
app.add_typer(outbox_app, name="outbox")
DatabaseOpt = Annotated[str | None, typer.Option(help="store URL (default: from the config)")]


class OutboxStatus(StrEnum):
    """The statuses of an outbox row."""

    pending = "pending"
    delivered = "delivered"
    dead = "dead"


@outbox_app.callback(invoke_without_command=True)
def outbox_list(
    ctx: typer.Context,
    config: ConfigOpt = Path("channels.yaml"),
    database: DatabaseOpt = None,
    status: Annotated[OutboxStatus | None, typer.Option(help="list the rows with this status")] = None,
    sink: Annotated[str | None, typer.Option(help="only this sink")] = None,
    limit: Annotated[int, typer.Option(help="rows listed")] = 50,
) -> None:
    """Counts per sink and status; with --status, the rows themselves (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    from hms_ach.store import outbox
    from hms_ach.store.db import Store

    store = Store(database) if database else _store(config)
    try:
        with store.read() as conn:
            counts = outbox.summary(conn)
            rows = outbox.list_rows(conn, status.value, sink, limit) if status else []
    finally:
        store.dispose()
    if not counts:
        typer.echo("outbox is empty")
    for c in counts:
        typer.echo(f"{c['destination']:<24} {c['status']:<10} {c['count']}")
    for r in rows:
        typer.echo(
            f"#{r['id']} {r['destination']} {r['event']} {r['status']} attempts={r['attempts']} "
            f"next={r['next_attempt_at']:%Y-%m-%d %H:%M:%S} error={r['last_error'] or '-'}"
            + (f" response={r['response'][:200]}" if r.get("response") else "")
        )


@outbox_app.command("show")
def outbox_show(
    row_id: Annotated[int, typer.Argument(help="outbox row id (see hms-ach outbox --status ...)")],
    config: ConfigOpt = Path("channels.yaml"),
    database: DatabaseOpt = None,
) -> None:
    """One row in full: its event and payload, its status and attempts, the last error and the
    receiver's answer (for an mllp sink: the ACK and the message sent, one segment per line)."""
    from hms_ach.store import outbox
    from hms_ach.store.db import Store

    store = Store(database) if database else _store(config)
    try:
        with store.read() as conn:
            row = outbox.get_row(conn, row_id)
    finally:
        store.dispose()
    if row is None:
        typer.echo(f"outbox row {row_id} does not exist (see `hms-ach outbox --status pending`)", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"#{row['id']} {row['destination']} {row['event']} {row['status']} attempts={row['attempts']}\n"
        f"payload: {row['payload']}\nerror: {row['last_error'] or '-'}\nanswer:\n{row['response'] or '-'}"
    )


@outbox_app.command("retry")
def outbox_retry(
    row_id: Annotated[int | None, typer.Argument(help="outbox row id (see hms-ach outbox)")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="retry every dead row")] = False,
    config: ConfigOpt = Path("channels.yaml"),
    database: DatabaseOpt = None,
) -> None:
    """Put a dead (or delivered) row, or every dead row, back in the queue with a fresh retry window."""
    from hms_ach.store import outbox
    from hms_ach.store.db import Store

    if row_id is None and not dead:
        typer.echo("give a row id or --dead", err=True)
        raise typer.Exit(2)
    store = Store(database) if database else _store(config)
    try:
        with store.transaction() as conn:
            count = outbox.retry(conn, row_id, dead=dead)
    finally:
        store.dispose()
    typer.echo(f"{count} row(s) queued again")
    if count == 0 and row_id is not None:
        raise typer.Exit(1)


@app.command("reindex")
def reindex_command(
    resource_types: Annotated[
        list[str] | None,
        typer.Option("--type", help="only this record type (repeatable); default: every type"),
    ] = None,
    config: ConfigOpt = Path("channels.yaml"),
    database: DatabaseOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="records per transaction")] = 500,
    validate: Annotated[
        bool,
        typer.Option(
            "--validate",
            help="instead: check every stored version against FHIR R4 and list those that fail "
            "(exit 1 when any does); changes nothing",
        ),
    ] = False,
) -> None:
    """Rebuild the search index of the stored records from the current search-parameter declarations
    (after adding or changing a parameter); prints the counts per record type. With --validate,
    report the stored versions that are not valid R4 instead."""
    from hms_ach.store.db import Store
    from hms_ach.store.reindex import ReindexCount, UnknownRecordTypeError, record_total, reindex

    if validate:
        _validate_stored(Store(database) if database else _store(config), resource_types, batch_size)
        return

    def report(c: ReindexCount) -> None:
        typer.echo(
            f"{c.resource_type:<17} {c.records} record(s) reindexed, {c.cleared} deleted, "
            f"{c.rows} index row(s), {c.batches} batch(es)"
        )

    store = Store(database) if database else _store(config)
    try:
        total = record_total(store, resource_types)
        with progress("reindex", total) as advance:
            counts = reindex(
                store, resource_types, batch_size=batch_size, progress=report, batch_done=advance
            )
    except UnknownRecordTypeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    finally:
        store.dispose()
    typer.echo(
        f"reindexed {sum(c.records for c in counts)} record(s) of {len(counts)} type(s), "
        f"{sum(c.rows for c in counts)} index row(s)"
    )


def _validate_stored(store: Any, resource_types: list[str] | None, batch_size: int) -> None:
    """``reindex --validate``: one line per stored version that fails R4, then a summary."""
    from hms_ach.store.reindex import UnknownRecordTypeError, invalid_versions, version_total

    checked: dict[str, int] = {}
    bad = 0
    try:
        with progress("validate", version_total(store, resource_types)) as advance:
            for found in invalid_versions(
                store,
                resource_types,
                batch_size=batch_size,
                checked=lambda t, n: checked.update({t: n}),
                batch_done=advance,
            ):
                bad += 1
                typer.echo(found.render())
    except UnknownRecordTypeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    finally:
        store.dispose()
    typer.echo(f"{bad} invalid version(s) of {sum(checked.values())} checked in {len(checked)} type(s)")
    if bad:
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="the short run (under two minutes)")] = False,
) -> None:
    """Run the benchmark suite and print its table; other options go to `python -m benchmarks`."""
    import subprocess

    root = Path(__file__).resolve().parents[1]  # benchmarks/ is not installed: it lives in the checkout
    if not (root / "benchmarks" / "__main__.py").is_file():
        typer.echo(f"no benchmarks/ in {root}: hms-ach bench runs from a source checkout", err=True)
        raise typer.Exit(2)
    argv = [sys.executable, "-m", "benchmarks", *(["--quick"] if quick else []), *ctx.args]
    raise typer.Exit(subprocess.call(argv, cwd=root))


@app.command("token")
def token_command(
    scope: Annotated[
        str,
        typer.Option(
            "--scope",
            help='SMART scopes for /fhir, space-separated: "patient/*.read", "user/Practitioner.rs", '
            '"system/*.cruds"; none for a token that only carries roles (/api/v1, /metrics)',
        ),
    ] = "",
    patient: Annotated[
        str | None, typer.Option("--patient", help="the patient id patient/ scopes are limited to")
    ] = None,
    sub: Annotated[str, typer.Option("--sub", help="the subject: who the token is for")] = "hms-ach-cli",
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role", help="an /api/v1 role (repeatable): hr_admin, scheduler, employee, auditor, integration"
        ),
    ] = None,
    employee_id: Annotated[
        str | None, typer.Option("--employee-id", help="the employee the employee role acts as")
    ] = None,
    department: Annotated[
        list[str] | None,
        typer.Option("--department", help="a department the scheduler role covers (repeatable)"),
    ] = None,
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", help="lifetime: 3600, 15m, 1h, 7d (default auth.local_token_ttl_seconds)"),
    ] = None,
    config: ConfigOpt = Path("channels.yaml"),
) -> None:
    """Print a bearer token of the engine's local issuer (auth.mode local); the signing key is created
    in the data directory on first use."""
    from hms_ach.auth.local_issuer import (
        KeyFileError,
        TokenRequest,
        issue_token,
        load_or_create_key,
        parse_ttl,
        split_values,
        token_ttl,
    )
    from hms_ach.auth.roles import ROLES
    from hms_ach.auth.settings import with_environment

    cfg = _load(config)
    try:
        settings = with_environment(cfg.auth)
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    if settings.mode != "local":
        typer.echo(
            f"auth mode is {settings.mode}: hms-ach token issues tokens of the local issuer only"
            + (" (get tokens from the OpenID provider)" if settings.mode == "oidc" else ""),
            err=True,
        )
        raise typer.Exit(2)
    try:
        ttl_seconds = token_ttl(settings, parse_ttl(ttl) if ttl is not None else None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ttl") from exc
    roles = split_values(role or [])
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise typer.BadParameter(
            f"unknown role {', '.join(unknown)}; one of {', '.join(ROLES)}", param_hint="--role"
        )
    if not scope.split() and not roles:
        raise typer.BadParameter("give at least one scope (or a --role)", param_hint="--scope")
    try:
        key = load_or_create_key(cfg.data_dir)
    except KeyFileError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from exc
    request = TokenRequest(
        scope=scope,
        sub=sub,
        patient=patient,
        roles=roles,
        employee_id=employee_id,
        departments=split_values(department or []),
        ttl_seconds=ttl_seconds,
    )
    try:
        token = issue_token(settings, key, request)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--ttl") from exc
    typer.echo(token)


#: Libraries whose import-time warnings are for their own maintainers, not for our users: asyncssh
#: (imported by the SFTP channel and sink) warns five times that cryptography deprecates DSA.
_QUIET_WARNING_MODULES = r"(asyncssh|cryptography)(\..*)?$"


def quiet_dependency_warnings() -> None:
    """No warning of those libraries reaches the user (every ``hms-ach`` command)."""
    warnings.filterwarnings("ignore", module=_QUIET_WARNING_MODULES)


def main() -> None:
    quiet_dependency_warnings()
    _quiet_libraries()  # every command: the ones that log nothing themselves parse HL7 too
    app()


if __name__ == "__main__":
    main()

"""One engine process: the store, the group-commit writer, the pipeline, every channel declared in
channels.yaml, and the HTTP API, on one asyncio loop.

``hms-ach run`` builds an :class:`Engine` and calls :meth:`Engine.serve`. Tests build one on a
temporary database with ports set to 0 and use :meth:`Engine.start` / :meth:`Engine.stop`.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hms_ach.app.config import Config, load_config
from hms_ach.app.scheduler import Scheduler, build_jobs
from hms_ach.app.wiring import wire_listeners
from hms_ach.auth.authenticate import Authenticator, create_authenticator
from hms_ach.auth.settings import AuthSettings, check_off_mode, with_environment
from hms_ach.channels import CHANNEL_TYPES
from hms_ach.channels.fhir_rest import FhirRestChannel
from hms_ach.core.errors import ConfigError, ConfigErrors
from hms_ach.core.types import Channel
from hms_ach.hl7v2.mllp import MllpConfig
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import load_mappings
from hms_ach.outbound import events
from hms_ach.outbound.outbox import Dispatcher
from hms_ach.store.db import Store, database_url
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.writer import StoreWriter

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("hms_ach.app.runtime")


class Engine:
    def __init__(self, config: Config, database: str | None = None):
        self.config = config
        self.store = Store(database or database_url(config.engine.database_url))
        self.writer = StoreWriter(self.store, commit_timeout=config.engine.commit_timeout_seconds)
        self.mappings = load_mappings(config.mappings_dir)
        self.pipeline = Pipeline(self.writer, MappingEngine(self.mappings, config.engine.timezone))
        wire_listeners()  # record changes -> outbox events, discharge -> Claim (hms_ach/app/wiring.py)
        events.use_engine(self.pipeline.engine)  # event payloads come from mappings/events/
        self.channels: dict[str, Channel] = {}
        self.health: dict[str, Any] = {
            "status": "ok",
            "started_at": datetime.now(UTC).isoformat(),
            "last_reload": None,
            "reload_error": None,
        }
        self.authenticator: Authenticator | None = None  # created when the HTTP API starts
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self.http_port: int | None = None
        self.dispatcher: Dispatcher | None = None  # when sinks are declared
        self._change_feed = False  # this engine has a sink that wants record.changed
        self.scheduler: Scheduler | None = None  # polls and the jobs of JOB_TYPES, when jobs are enabled
        self._watchdog: asyncio.Task[None] | None = None  # restarts the writer thread if it exits
        self.store_lost = asyncio.Event()  # set when the store stayed unreachable too long

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.config.http.enabled:  # first: a refused auth mode or an unwritable key starts nothing
            self.authenticator = create_authenticator(auth_settings(self.config), self.config.data_dir)
        self.writer.start()
        self._watchdog = asyncio.create_task(self._watch_writer())
        await self._start_outbound()  # before the channels: a new sink gets every event from here on
        for settings in self.config.channels:
            if not settings.enabled:
                continue
            channel: Channel = CHANNEL_TYPES.load(settings.type)(settings, self.pipeline)
            await channel.start()
            self.channels[settings.name] = channel
        if self.config.http.enabled:
            await self._start_http()
        await self._start_scheduler()

    async def _start_scheduler(self) -> None:
        """One scheduler per deployment (hms_ach/app/scheduler.py); on PostgreSQL the others stand by."""
        if not self.config.jobs.enabled:
            return
        jobs = build_jobs(self.config.jobs, self.writer, self.channels)
        self.scheduler = Scheduler(self.store, self.writer, jobs, self.config.jobs)
        await self.scheduler.start()

    async def _start_outbound(self) -> None:
        """Deliver the outbox to the sinks of channels.yaml (inbound never waits for them)."""
        if not self.config.sinks:
            return
        from hms_ach.outbound import SINK_TYPES

        sinks = [SINK_TYPES.load(s.type)(s, self.store) for s in self.config.sinks]
        self._change_feed = any(
            s.wants("record.changed") for s in self.config.sinks
        )  # disabled ones too: rows wait
        if self._change_feed:
            events.subscribe_change_feed()
        self.dispatcher = Dispatcher(self.store, sinks)
        await self.dispatcher.start()

    def _fhir_write_channel(self) -> FhirRestChannel | None:
        """The running ``fhir_rest`` channel, if one is configured: it takes the FHIR writes."""
        return next((ch for ch in self.channels.values() if isinstance(ch, FhirRestChannel)), None)

    async def _start_http(self) -> None:
        import uvicorn

        from hms_ach.app.http import create_app

        if self.authenticator is None:
            self.authenticator = create_authenticator(auth_settings(self.config), self.config.data_dir)
        await self.authenticator.start()
        app = create_app(
            self.store, lambda: self.pipeline, self._fhir_write_channel, authenticator=self.authenticator
        )
        app.state.health = self.health
        app.state.readiness = self.readiness
        config = uvicorn.Config(
            app,
            host=self.config.http.host,
            port=self.config.http.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            log_config=None,  # uvicorn's own handlers would print a second line when the port is taken
        )
        self._http = uvicorn.Server(config)
        self._http.install_signal_handlers = lambda: None  # type: ignore[attr-defined]  # uvicorn < 0.29: the engine handles signals
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises the startup error (port in use...)
            await asyncio.sleep(0.02)
        sockets = [s for server in self._http.servers for s in server.sockets]
        self.http_port = sockets[0].getsockname()[1] if sockets else self.config.http.port
        log.info("http.started", extra={"port": self.http_port})

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        if self.dispatcher is not None:
            await self.dispatcher.stop()
            self.dispatcher = None
        if self._change_feed:
            events.unsubscribe_change_feed()
            self._change_feed = False
        for channel in list(self.channels.values()):
            await channel.stop()
        self.channels.clear()
        if self._http is not None:
            self._http.should_exit = True
            if self._http_task is not None:
                await self._http_task
            self._http = None
        if self.authenticator is not None:
            await self.authenticator.aclose()
            self.authenticator = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        self.writer.stop()
        self.store.dispose()

    # ------------------------------------------------------------------ health
    async def _watch_writer(self) -> None:
        """The writer's supervisor, every second: start its thread again if it exited; while the
        store fails, keep trying a trivial commit, and set :attr:`store_lost` when it has failed for
        ``engine.store_unreachable_exit_seconds``."""
        while True:
            await asyncio.sleep(1.0)
            self.writer.check()
            health = self.writer.health
            if not health.consecutive_failures:
                continue
            await self.writer.probe(self.config.engine.ready_probe_seconds)
            limit = self.config.engine.store_unreachable_exit_seconds
            since = health.failing_since
            if limit and since is not None and time.monotonic() - since >= limit:
                log.critical(
                    "store.unreachable",
                    extra={"seconds": limit, "last_error": health.last_error},
                )
                self.store_lost.set()
                return

    async def readiness(self) -> dict[str, str]:
        """The failed readiness checks (name -> why); empty when the engine can take messages."""
        failed: dict[str, str] = {}
        self.writer.check()
        if not self.writer.alive:
            failed["writer"] = "the writer thread is not running"
        else:
            reason = await self.writer.probe(self.config.engine.ready_probe_seconds)
            if reason is not None:
                failed["store"] = f"a trivial transaction did not commit: {reason}"
        self.health["writer"] = self.writer.health.as_dict()
        disk = self._disk_problem()
        if disk is not None:
            failed["disk"] = disk
        if self.health.get("reload_error"):
            failed["mappings"] = "the last reload of channels.yaml or the mappings failed"
        return failed

    async def serve(self) -> None:
        """Run until cancelled (Ctrl-C / SIGTERM), reloading mappings when files change.

        Raises :class:`StoreUnavailable` (after stopping everything) when the store stayed
        unreachable for ``engine.store_unreachable_exit_seconds``: ``hms-ach run`` then exits
        non-zero, so that a supervisor (systemd, Docker) restarts the process."""
        await self.start()
        main = asyncio.create_task(self._watch() if self.config.engine.watch else asyncio.Event().wait())
        lost = asyncio.create_task(self.store_lost.wait())
        try:
            done, _ = await asyncio.wait({main, lost}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                main.result()
            else:
                seconds = self.config.engine.store_unreachable_exit_seconds
                raise StoreUnavailable(f"every commit failed for {seconds:g} s")
        finally:
            for task in (main, lost):
                task.cancel()
            await asyncio.gather(main, lost, return_exceptions=True)
            await self.stop()

    # ------------------------------------------------------------------ hot reload
    def reload_mappings(self) -> bool:
        """Load the mapping files again; apply them only if they are all valid."""
        try:
            mset = load_mappings(self.config.mappings_dir)
        except (ConfigErrors, ConfigError) as exc:
            self.health["reload_error"] = str(exc)
            self.health["status"] = "degraded"
            log.error("config.reload_failed", extra={"errors": str(exc)})
            return False
        self.mappings = mset
        self.pipeline.engine = MappingEngine(mset, self.config.engine.timezone)
        events.use_engine(self.pipeline.engine)
        self.health.update(status="ok", reload_error=None, last_reload=datetime.now(UTC).isoformat())
        log.info("config.reloaded")
        return True

    async def reload_config(self) -> bool:
        """Re-read channels.yaml: restart only the channels whose settings changed, then the mappings.

        An invalid file is refused: the running channels and mappings stay as they are.
        """
        try:
            new = load_config(self.config.source)
        except (ConfigErrors, ConfigError) as exc:
            self.health.update(status="degraded", reload_error=str(exc))
            log.error("config.reload_failed", extra={"errors": str(exc)})
            return False
        old = {c.name: c for c in self.config.channels}
        wanted = {c.name: c for c in new.channels if c.enabled}
        for name in list(self.channels):
            if name not in wanted or wanted[name] != old.get(name):
                await self.channels.pop(name).stop()
        self.config = new
        if not self.reload_mappings():
            return False
        for name, settings in wanted.items():
            if name not in self.channels:
                channel: Channel = CHANNEL_TYPES.load(settings.type)(settings, self.pipeline)
                await channel.start()
                self.channels[name] = channel
        await self._reload_scheduler()
        return True

    async def _reload_scheduler(self) -> None:
        """Rebuild the jobs from the new config and the channels now running (a restarted channel is a
        new object: its poll job must poll it). A changed time zone or ``enabled`` restarts the scheduler."""
        jobs = self.config.jobs
        if self.scheduler is not None and (
            not jobs.enabled or self.scheduler.settings.timezone != jobs.timezone
        ):
            await self.scheduler.stop()
            self.scheduler = None
        if self.scheduler is None:
            await self._start_scheduler()
            return
        self.scheduler.replace_jobs(build_jobs(jobs, self.writer, self.channels), jobs)

    async def _watch(self) -> None:
        """Poll channels.yaml and the mapping files' modification times (no extra dependency needed)."""
        snapshot = self._snapshot()
        while True:
            await asyncio.sleep(1.0)
            current = self._snapshot()
            if current == snapshot:
                continue
            config_changed = current.get("config") != snapshot.get("config")
            snapshot = current
            if config_changed and self.config.source:
                await self.reload_config()
            else:
                self.reload_mappings()

    def _snapshot(self) -> dict[str, float]:
        snap = _mtimes(self.config.mappings_dir)
        if self.config.source:
            try:
                snap["config"] = Path(self.config.source).stat().st_mtime
            except OSError:
                pass
        return snap

    def _disk_problem(self) -> str | None:
        """Why the SQLite database's disk is too full, or None (PostgreSQL: the server's business)."""
        if self.store.dialect != "sqlite" or "sqlite:///" not in self.store.url:
            return None
        path = Path(self.store.url.split("sqlite:///", 1)[1].split("?", 1)[0])
        try:
            free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
        except OSError:
            return None
        wanted = self.config.engine.min_free_disk_mb * 1024 * 1024
        if free < wanted:
            return f"{free // (1024 * 1024)} MiB free, {self.config.engine.min_free_disk_mb} MiB wanted"
        return None


def listener_hosts(config: Config) -> list[str]:
    """The bind address of every listener of ``config``: the HTTP API and each enabled MLLP channel."""
    hosts = [config.http.host] if config.http.enabled else []
    hosts += [c.host for c in config.channels if c.enabled and isinstance(c, MllpConfig)]
    return hosts


def auth_settings(config: Config) -> AuthSettings:
    """``auth:`` of ``config`` with the environment overrides applied; a ConfigError when they are
    invalid, or when ``mode: off`` is asked for while a listener binds to a non-loopback address."""
    settings = with_environment(config.auth)
    check_off_mode(settings, listener_hosts(config))
    return settings


def _mtimes(root: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    for path in root.rglob("*.yaml"):
        try:
            out[str(path)] = path.stat().st_mtime
        except OSError:
            continue
    return out

"""One engine process: the store, the group-commit writer, the pipeline, every channel declared in
channels.yaml, and the HTTP API, on one asyncio loop.

``hms-ach run`` builds an :class:`Engine` and calls :meth:`Engine.serve`. Tests build one on a
temporary database with ports set to 0 and use :meth:`Engine.start` / :meth:`Engine.stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from hms_ach.app import cluster_config
from hms_ach.app.config import Config, load_config, tls_errors
from hms_ach.app.metrics import EngineState, release_state, serve_state
from hms_ach.app.scheduler import Scheduler, build_jobs
from hms_ach.app.wiring import wire_listeners
from hms_ach.auth.authenticate import Authenticator, create_authenticator
from hms_ach.auth.settings import AuthSettings, check_off_mode, with_environment
from hms_ach.cases.forms import publish_forms
from hms_ach.channels import CHANNEL_TYPES
from hms_ach.channels.fhir_rest import FhirRestChannel
from hms_ach.channels.mllp import MllpChannel
from hms_ach.core import metrics
from hms_ach.core.errors import ConfigError, ConfigErrors
from hms_ach.core.redact import error_kind
from hms_ach.core.types import Channel
from hms_ach.fhir.export import ExportManager
from hms_ach.hl7v2.mllp import MllpConfig
from hms_ach.ingest.pipeline import Pipeline
from hms_ach.ingest.workers import MapWorkers, compiled_engine
from hms_ach.mapping.engine import MappingEngine
from hms_ach.mapping.loader import MappingSet, load_mappings
from hms_ach.outbound import events
from hms_ach.outbound.outbox import Dispatcher
from hms_ach.store import audit, audit_checkpoints
from hms_ach.store import outbox as outbox_rows
from hms_ach.store.access_log import AccessLog
from hms_ach.store.db import Store, database_url
from hms_ach.store.errors import StoreUnavailable
from hms_ach.store.writer import StoreWriter
from hms_ach.workforce import settings as workforce_settings

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("hms_ach.app.runtime")
T = TypeVar("T")


class ShutdownTimeout(Exception):
    """The drain did not finish within ``engine.shutdown_grace_seconds``; ``still_running`` says
    what was still going on (``hms-ach run`` prints it and exits 1)."""

    def __init__(self, grace_seconds: float, still_running: list[str]):
        self.grace_seconds = grace_seconds
        self.still_running = still_running
        super().__init__(
            f"not stopped within the grace period of {grace_seconds:g} s; still running: "
            + ("; ".join(still_running) or "nothing known")
        )


class Engine:
    def __init__(self, config: Config, database: str | None = None):
        self.config = config
        self.store = Store(database or database_url(config.engine.database_url))
        audit.install(self.store, config.audit, config.data_dir)  # the audit key, the anchor (docs/audit.md)
        self.writer = StoreWriter(self.store, commit_timeout=config.engine.commit_timeout_seconds)
        # Access records of reads (docs/audit.md), queued by the HTTP routes and written in batches.
        self.access_audit = AccessLog(
            self.writer.run_sync,
            max_queue_entries=config.audit.access_queue_entries,
            max_batch_entries=config.audit.access_batch_entries,
            flush_interval_seconds=config.audit.access_flush_interval_seconds,
            overflow_wait_seconds=config.audit.access_overflow_wait_seconds,
        )
        self.mappings = load_mappings(config.mappings_dir)
        self.pipeline = Pipeline(self.writer, _compiled_engine(self.mappings, config.engine.timezone))
        wire_listeners()  # record changes -> outbox events, discharge -> Claim (hms_ach/app/wiring.py)
        events.use_engine(self.pipeline.engine)  # event payloads come from mappings/events/
        workforce_settings.use(config.workforce)  # the workforce rules' limits (docs/workforce-rules.md)
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
        self._stop_requested = asyncio.Event()  # set by request_stop (SIGTERM/SIGINT in hms-ach run)
        self.stop_reason: str | None = None  # what asked for the stop (the signal's name)
        self._metrics: EngineState | None = None  # what /metrics reads from this engine while it runs
        self.stop_phase: str | None = None  # the phase of stop() running now, for the timeout report
        self.exports: ExportManager | None = None  # the Bulk Data $export worker, with the HTTP API
        # PostgreSQL: the mapping version shared by every instance on the database (docs/scale-out.md)
        self.cluster: cluster_config.ClusterConfig | None = None
        self._cluster_task: asyncio.Task[None] | None = None
        self._forms_task: asyncio.Task[None] | None = None  # publishing the forms after a reload
        self._reloading = asyncio.Lock()  # one mapping reload at a time (reload_mappings_off_loop)
        # engine.map_workers > 0: the worker processes that parse and map HL7 v2 (ingest/workers.py)
        self.map_workers: MapWorkers | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.config.http.enabled:  # first: a refused auth mode or an unwritable key starts nothing
            self.authenticator = create_authenticator(auth_settings(self.config), self.config.data_dir)
        self.writer.start()
        self.access_audit.start()
        self._watchdog = asyncio.create_task(self._watch_writer())
        await self._start_cluster_config()
        await self._publish_forms()  # the workflows' forms as Questionnaire/<id> (docs/review-cases.md)
        await self._start_outbound()  # before the channels: a new sink gets every event from here on
        await self._start_map_workers()  # before the channels: their first message may go there
        for settings in self.config.channels:
            if not settings.enabled:
                continue
            channel: Channel = CHANNEL_TYPES.load(settings.type)(settings, self.pipeline)
            await channel.start()
            self.channels[settings.name] = channel
        if self.config.http.enabled:
            await self._start_http()
        await self._start_scheduler()
        self._metrics = self._metrics_state()
        serve_state(self._metrics)

    async def _start_map_workers(self) -> None:
        count = self.config.engine.map_workers
        if count <= 0 or self.map_workers is not None:
            return
        pool = MapWorkers(
            count, self.mappings, self.config.engine.timezone, self.config.engine.commit_timeout_seconds
        )
        await pool.start()
        self.map_workers = pool
        self.pipeline.remote = pool.evaluate

    async def _stop_map_workers(self) -> None:
        pool, self.map_workers = self.map_workers, None
        self.pipeline.remote = None
        if pool is not None:
            await pool.stop(self.config.engine.shutdown_grace_seconds)

    async def _start_cluster_config(self) -> None:
        """PostgreSQL: publish the mapping files this instance started with as the cluster's version,
        then follow the versions the other instances publish (docs/scale-out.md)."""
        if self.store.dialect != "postgresql":
            return
        instance = f"{socket.gethostname()}:{os.getpid()}"
        cluster = cluster_config.ClusterConfig(self.store, self.config.data_dir, instance)
        files = await asyncio.to_thread(cluster_config.mapping_files, self.config.mappings_dir)
        await asyncio.to_thread(cluster.start, files)
        self.cluster = cluster
        self.health["config_version"] = {"seq": cluster.seq, "digest": cluster.digest[:16]}
        self._cluster_task = asyncio.create_task(self._follow_cluster())

    async def _follow_cluster(self) -> None:
        """Every ``POLL_SECONDS``: publish a local reload, load a version another instance published.
        Never ends on a failure: the store being down or a version failing the check is logged and
        shown in the readiness report, and the last good mappings keep running."""
        assert self.cluster is not None
        cluster = self.cluster
        while True:
            await asyncio.sleep(cluster_config.POLL_SECONDS)
            try:
                newer = await asyncio.wait_for(asyncio.to_thread(cluster.poll), 30)
                if newer is not None:
                    await self._load_cluster_version(newer)
            except Exception as exc:  # noqa: BLE001 - the store is down: the writer's health says so
                log.warning("config.version_check_failed", extra={"error": error_kind(exc)})

    async def _load_cluster_version(self, newer: cluster_config.Newer) -> None:
        assert self.cluster is not None
        try:
            folder = await asyncio.to_thread(self.cluster.materialise, newer)
            mset = await asyncio.to_thread(load_mappings, folder)
            engine = await asyncio.to_thread(_compiled_engine, mset, self.config.engine.timezone)
        except (ConfigErrors, ConfigError, ValueError, OSError) as exc:
            why = f"config version {newer.seq} ({newer.digest[:16]}) refused: {exc}"
            self.health.update(status="degraded", reload_error=why)
            metrics.CONFIG_LOADS.labels("cluster", "refused").inc()
            log.error("config.cluster_version_refused", extra={"seq": newer.seq, "errors": str(exc)})
            await asyncio.to_thread(self.cluster.refuse, newer, why)
            return
        self._use_mappings(mset, engine)
        self.cluster.adopt(newer)  # with the swap: what health and readiness say matches what runs
        await asyncio.to_thread(self.cluster.record)
        self.health["config_version"] = {"seq": newer.seq, "digest": newer.digest[:16]}
        metrics.CONFIG_LOADS.labels("cluster", "ok").inc()
        log.info("config.cluster_version_loaded", extra={"seq": newer.seq, "digest": newer.digest[:16]})

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

    def _metrics_state(self) -> EngineState:
        """What a scrape of /metrics reads from this engine (hms_ach/app/metrics.py)."""

        def open_rows() -> list[tuple[str, str, int]]:
            with self.store.read() as conn:
                return outbox_rows.open_counts(conn)

        def connections() -> list[tuple[str, int]]:
            out = []
            for name, channel in list(self.channels.items()):
                count = getattr(getattr(channel, "server", None), "connection_count", None)
                if isinstance(count, int):
                    out.append((name, count))
            return out

        return EngineState(
            writer_queue=lambda: self.writer.queued,
            writer_up=lambda: self.writer.alive,
            writer_failures=lambda: self.writer.health.consecutive_failures,
            outbox_rows=open_rows,
            pools=self.store.pool_states,
            access_queue=lambda: self.access_audit.queued,
            access_dropped=lambda: self.access_audit.dropped,
            connections=connections,
            checkpointer=self.store.checkpointer,
        )

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
            self.store,
            lambda: self.pipeline,
            self._fhir_write_channel,
            settings=self.config.http,
            authenticator=self.authenticator,
        )
        app.state.health = self.health
        app.state.readiness = self.readiness
        self.exports = ExportManager(self.store, self.config.data_dir / "exports", self.config.bulk_export)
        self.exports.start()  # resumes the exports a previous run left unfinished
        app.state.exports = self.exports
        app.state.console_engine = self  # the console's channel control, replay and workbench
        ssl_context = self.config.http.ssl_context()  # TlsConfigError (a ConfigError): one line
        app.state.tls = ssl_context is not None  # HTTPS: the security headers add HSTS
        if self.config.audit.access_records:
            app.state.access_audit = self.access_audit
        config = uvicorn.Config(
            app,
            host=self.config.http.host,
            port=self.config.http.port,
            log_level="warning",
            lifespan="off",
            access_log=False,
            log_config=None,  # uvicorn's own handlers would print a second line when the port is taken
            timeout_graceful_shutdown=math.ceil(self.config.engine.shutdown_grace_seconds),
        )
        if ssl_context is not None:
            # our context (TLS 1.2 floor, AEAD suites) instead of the one uvicorn would build from files
            config.load()
            config.ssl = ssl_context
        self._http = uvicorn.Server(config)
        # The engine handles SIGTERM/SIGINT (hms-ach run drains everything, HTTP included): uvicorn
        # must neither take the signals over while it serves nor raise them again when it ends.
        self._http.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises the startup error (port in use...)
            await asyncio.sleep(0.02)
        sockets = [s for server in self._http.servers for s in server.sockets]
        self.http_port = sockets[0].getsockname()[1] if sockets else self.config.http.port
        log.info("http.started", extra={"port": self.http_port})

    def request_stop(self, reason: str) -> bool:
        """Ask :meth:`serve` to drain and return (``hms-ach run`` calls it on SIGTERM/SIGINT).
        False when a stop was already requested: the caller then decides (a second signal exits)."""
        if self._stop_requested.is_set():
            return False
        self.stop_reason = reason
        self._stop_requested.set()
        return True

    async def stop(self) -> bool | None:
        """Stop everything, in an order that loses nothing; safe to call again.

        1. ``intake``: at once on every channel stop accepting (the scheduler's polls, the MLLP
           listeners, HTTP); the frames, requests and polls in flight finish and are answered.
        1b. ``map_workers`` (``engine.map_workers``): the parse-and-map worker processes exit (they
           are idle: no frame is in flight after the intake stopped); one that does not is killed.
        2. ``outbound``: the sinks' deliveries stop and this process's outbox leases are released,
           so that the next start (or another instance) delivers at once instead of after the lease.
        3. ``access_audit``: the queued access records are written (through the writer), then its
           thread ends (docs/audit.md).
        4. ``writer``: the jobs still queued are committed, then the writer thread ends.
        5. ``store``: a signed audit checkpoint is appended (docs/audit.md), SQLite's WAL is
           checkpointed into the database file and truncated, and every connection is closed.

        Returns whether the WAL checkpoint completed (None on PostgreSQL)."""
        if self._cluster_task is not None:
            self._cluster_task.cancel()
            await asyncio.gather(self._cluster_task, return_exceptions=True)
            self._cluster_task = None
        await self._phase("intake", self._stop_intake())
        await self._phase("map_workers", self._stop_map_workers())  # no frame is in flight any more
        await self._phase("outbound", self._stop_outbound())
        if self._watchdog is not None:
            self._watchdog.cancel()
            await asyncio.gather(self._watchdog, return_exceptions=True)
            self._watchdog = None
        if self._forms_task is not None:  # the forms of the last reload: written, or at the next start
            await asyncio.gather(self._forms_task, return_exceptions=True)
            self._forms_task = None
        await self._phase("access_audit", asyncio.to_thread(self.access_audit.stop))  # flushed via the writer
        await self._phase("writer", asyncio.to_thread(self.writer.stop))
        if self._metrics is not None:
            release_state(self._metrics)
        checkpointed: bool | None = await self._phase("store", asyncio.to_thread(self._close_store))
        self.stop_phase = None
        return checkpointed

    def _close_store(self) -> bool | None:
        audit_checkpoints.final_checkpoint(self.store)  # the trail's head, signed, outside the store
        return self.store.close()

    async def _phase(self, name: str, work: Coroutine[Any, Any, T]) -> T:
        self.stop_phase = name
        started = time.monotonic()
        result = await work
        log.info("engine.stop_phase", extra={"phase": name, "seconds": round(time.monotonic() - started, 3)})
        return result

    async def _stop_intake(self) -> None:
        async def scheduler() -> None:
            if self.scheduler is not None:
                await self.scheduler.stop()  # no new polls or jobs; runs in progress finish
                self.scheduler = None

        async def channel(name: str, ch: Channel) -> None:
            await ch.stop()  # MLLP: no new connections, busy ones finish their frame and its ACK
            self.channels.pop(name, None)

        async def http() -> None:
            if self._http is not None:
                self._http.should_exit = True  # uvicorn stops accepting and finishes open requests
                if self._http_task is not None:
                    await self._http_task
                self._http = None
            if self.exports is not None:  # a running export pauses; the next start resumes it
                await asyncio.to_thread(self.exports.stop)
                self.exports = None

        parts = [scheduler(), http(), *(channel(n, ch) for n, ch in list(self.channels.items()))]
        for failure in await asyncio.gather(*parts, return_exceptions=True):
            if isinstance(failure, BaseException):
                if isinstance(failure, asyncio.CancelledError):
                    raise failure
                log.error("engine.stop_failed", extra={"phase": "intake", "error": error_kind(failure)})
        self.channels.clear()

    async def _stop_outbound(self) -> None:
        if self.dispatcher is not None:
            owner = self.dispatcher.owner
            await self.dispatcher.stop()
            self.dispatcher = None
            # The dispatcher released each sink's lease; a lease renewal that was already running in
            # a worker thread when it stopped may have taken one again. Release them all once more.
            try:
                released = await asyncio.to_thread(self._release_leases, owner)
            except Exception as exc:  # noqa: BLE001 - the store is down: the leases expire anyway
                log.warning("outbox.lease_release_failed", extra={"error": error_kind(exc)})
            else:
                if released:
                    log.info("outbox.leases_released", extra={"count": released})
        if self._change_feed:
            events.unsubscribe_change_feed()
            self._change_feed = False
        if self.authenticator is not None:  # HTTP has stopped: no request needs it any more
            await self.authenticator.aclose()
            self.authenticator = None

    def _release_leases(self, owner: str) -> int:
        with self.store.transaction() as tx:
            return outbox_rows.release_leases(tx, owner)

    def still_running(self) -> list[str]:
        """What a stop that is taking too long is waiting for, in words (no field values)."""
        out: list[str] = []
        if self.stop_phase is not None:
            out.append(f"phase {self.stop_phase}")
        if self.scheduler is not None and self.scheduler.running_jobs:
            out.append("scheduler jobs " + ", ".join(self.scheduler.running_jobs))
        for name, ch in self.channels.items():
            if isinstance(ch, MllpChannel) and ch.server.connection_count:
                out.append(f"channel {name}: {ch.server.connection_count} MLLP connection(s) open")
            else:
                out.append(f"channel {name} stopping")
        if self._http is not None:
            out.append("HTTP requests in progress")
        if self.dispatcher is not None:
            out.append("outbox deliveries")
        busy = self.writer.health.busy_since
        if busy is not None:
            out.append(f"a store commit running for {time.monotonic() - busy:.1f} s")
        return out

    async def shutdown(self, grace_seconds: float) -> list[str]:
        """:meth:`stop` within ``grace_seconds``, logging ``engine.stopping`` and ``engine.stopped``
        (or ``engine.stop_timeout``). Returns what was still running when the grace period ended:
        empty when the engine stopped cleanly."""
        started = time.monotonic()
        log.info(
            "engine.stopping",
            extra={"reason": self.stop_reason or "stop", "grace_seconds": grace_seconds},
        )
        try:
            async with asyncio.timeout(grace_seconds):
                checkpointed = await self.stop()
        except TimeoutError:
            still = self.still_running()
            log.error("engine.stop_timeout", extra={"grace_seconds": grace_seconds, "still_running": still})
            return still or ["the stop sequence"]
        log.info(
            "engine.stopped",
            extra={"seconds": round(time.monotonic() - started, 3), "wal_checkpointed": checkpointed},
        )
        return []

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
        checkpointer = self.store.checkpointer()
        if checkpointer is not None:  # SQLite in a file: the WAL checkpoint thread (store/db.py)
            wal = checkpointer.problem(self.config.engine.wal_checkpoint_max_age_seconds)
            self.health["wal_checkpoint"] = checkpointer.health()
            if wal is not None:
                failed["wal_checkpoint"] = wal
        disk = self._disk_problem()
        if disk is not None:
            failed["disk"] = disk
        access_problem = self.access_audit.problem()
        self.health["access_audit"] = self.access_audit.health()
        if access_problem is not None:
            failed["access_audit"] = access_problem
        if self.health.get("reload_error"):
            failed["mappings"] = "the last reload of channels.yaml or the mappings failed"
            if self.cluster is not None and self.cluster.refused is not None:
                seq = self.cluster.refused[0]
                failed["mappings"] = (
                    f"config version {seq}, published by another instance, failed the check here;"
                    f" version {self.cluster.seq} still runs"
                )
        return failed

    async def serve(self) -> None:
        """Run until :meth:`request_stop` (SIGTERM/SIGINT in ``hms-ach run``) or cancellation,
        reloading mappings when files change; then drain within ``engine.shutdown_grace_seconds``
        (:meth:`shutdown`).

        Raises :class:`ShutdownTimeout` when the drain did not finish in time, and
        :class:`StoreUnavailable` (after stopping everything) when the store stayed unreachable for
        ``engine.store_unreachable_exit_seconds``: ``hms-ach run`` then exits non-zero, so that a
        supervisor (systemd, Docker) restarts the process."""
        await self.start()
        main = asyncio.create_task(self._watch() if self.config.engine.watch else asyncio.Event().wait())
        lost = asyncio.create_task(self.store_lost.wait())
        asked = asyncio.create_task(self._stop_requested.wait())
        drain = False  # True once only the stop request is left to act on
        try:
            done, _ = await asyncio.wait({main, lost, asked}, return_when=asyncio.FIRST_COMPLETED)
            if main in done:
                main.result()
            elif lost in done:
                seconds = self.config.engine.store_unreachable_exit_seconds
                raise StoreUnavailable(f"every commit failed for {seconds:g} s")
            drain = True
        finally:
            for task in (main, lost, asked):
                task.cancel()
            await asyncio.gather(main, lost, asked, return_exceptions=True)
            if not drain:
                await self.stop()  # a failure or a cancellation: stop without a deadline
        grace = self.config.engine.shutdown_grace_seconds
        still_running = await self.shutdown(grace)
        if still_running:
            raise ShutdownTimeout(grace, still_running)

    # ------------------------------------------------------------------ hot reload
    def reload_mappings(self) -> bool:
        """Load the mapping files again; apply them only if they are all valid.

        On PostgreSQL (:attr:`cluster`) files unchanged since this instance last read them are not
        loaded again (the version the cluster runs stays); changed and valid ones are published,
        and every other instance loads them within seconds (docs/scale-out.md)."""
        return self._apply_reload(self._prepare_reload())

    async def reload_mappings_off_loop(self) -> bool:
        """:meth:`reload_mappings` with the reading, checking and compiling of the mappings in a
        thread, so that the event loop (and the ACKs waiting on it) is not held for them; only the
        swap to the new mappings runs on the loop. One reload at a time (the file watcher, a
        channels.yaml reload and the console's button may ask at once); a preparation past
        :data:`RELOAD_DEADLINE_SECONDS` (a hung mount) is shown as ``reload_stalled_since``."""
        async with self._reloading:
            prepared = await self._watched_thread(self._prepare_reload, "reload", RELOAD_DEADLINE_SECONDS)
            return self._apply_reload(prepared)

    def _prepare_reload(self) -> tuple[MappingSet, MappingEngine, dict[str, str] | None] | Exception | None:
        """The new mappings compiled, with the files read for the cluster; None when the cluster's
        files did not change; the error when they cannot be loaded. Changes no state but the
        cluster's record of the files read last, so it may run in a thread."""
        files: dict[str, str] | None = None
        try:
            if self.cluster is not None:
                files = cluster_config.mapping_files(self.config.mappings_dir)
                if not self.cluster.local_changed(files):
                    return None
            mset = load_mappings(self.config.mappings_dir)
        except (ConfigErrors, ConfigError, OSError, UnicodeDecodeError) as exc:
            return exc
        return mset, _compiled_engine(mset, self.config.engine.timezone), files

    def _apply_reload(
        self, prepared: tuple[MappingSet, MappingEngine, dict[str, str] | None] | Exception | None
    ) -> bool:
        if prepared is None:
            return True
        if isinstance(prepared, Exception):
            self.health["reload_error"] = str(prepared)
            self.health["status"] = "degraded"
            metrics.CONFIG_LOADS.labels("local", "refused").inc()
            log.error("config.reload_failed", extra={"errors": str(prepared)})
            return False
        mset, engine, files = prepared
        self._use_mappings(mset, engine)
        if self.cluster is not None and files is not None:
            self.cluster.queue_publish(files)  # published by _follow_cluster within POLL_SECONDS
        metrics.CONFIG_LOADS.labels("local", "ok").inc()
        log.info("config.reloaded")
        return True

    def _use_mappings(self, mset: MappingSet, engine: MappingEngine | None = None) -> None:
        """Run ``mset`` (compiled as ``engine``, else now) from the next message on (the pipeline,
        the event payloads), and publish its forms in the background."""
        self.mappings = mset
        self.pipeline.engine = engine or _compiled_engine(mset, self.config.engine.timezone)
        if self.map_workers is not None:
            self.map_workers.use(mset)  # each worker loads it before its next message
        events.use_engine(self.pipeline.engine)
        if self.writer.alive:  # published in the background; a failure is logged, never fatal
            with contextlib.suppress(RuntimeError):  # no running loop (a test's direct call): at start
                self._forms_task = asyncio.get_running_loop().create_task(self._publish_forms())
        self.health.update(status="ok", reload_error=None, last_reload=datetime.now(UTC).isoformat())

    async def _publish_forms(self) -> None:
        """Write the forms of the mappings (forms/<id>.json) as Questionnaire/<id>; the same content
        again writes nothing. A failure is logged (the forms are published at the next reload)."""
        forms = {form_id: f.model for form_id, f in self.mappings.forms.items()}
        for attempt in range(3):  # a store that failed a commit is often back a moment later
            try:
                await self.writer.run(lambda tx: publish_forms(tx, forms))
                return
            except Exception as exc:  # the engine runs on; findings are checked against the files
                log.error("forms.publish_failed", extra={"error": error_kind(exc), "attempt": attempt + 1})
            await asyncio.sleep(0.5 * (attempt + 1))

    async def reload_config(self) -> bool:
        """Re-read channels.yaml: restart only the channels whose settings changed, then the mappings.

        An invalid file is refused: the running channels and mappings stay as they are.
        """
        try:
            new = load_config(self.config.source)
            unusable_tls = tls_errors(new)  # a channel must not stop for a certificate it cannot load
            if unusable_tls:
                raise ConfigError("; ".join(unusable_tls))
        except (ConfigErrors, ConfigError) as exc:
            self.health.update(status="degraded", reload_error=str(exc))
            log.error("config.reload_failed", extra={"errors": str(exc)})
            return False
        old = {c.name: c for c in self.config.channels}
        wanted = {c.name: c for c in new.channels if c.enabled}
        for name in list(self.channels):
            if name not in wanted or wanted[name] != old.get(name):
                await self.channels.pop(name).stop()
        if new.engine.map_workers != self.config.engine.map_workers:  # the pool is made at start only
            log.warning("config.restart_needed", extra={"setting": "engine.map_workers"})
        self.config = new
        workforce_settings.use(new.workforce)
        if not await self.reload_mappings_off_loop():
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
        """Poll channels.yaml and the mapping files' modification times (no extra dependency needed),
        off the event loop: walking a few hundred files takes a millisecond or more, which the MLLP
        and HTTP listeners sharing the loop would otherwise wait through every second."""
        snapshot = await self._snapshot_off_loop()
        while True:
            await asyncio.sleep(1.0)
            current = await self._snapshot_off_loop()
            if current == snapshot:
                continue
            config_changed = current.get("config") != snapshot.get("config")
            snapshot = current
            if config_changed and self.config.source:
                await self.reload_config()
            else:
                await self.reload_mappings_off_loop()

    async def _snapshot_off_loop(self) -> dict[str, float]:
        """:meth:`_snapshot` in a worker thread, watched by :meth:`_watched_thread` (a walk past
        :data:`WATCH_DEADLINE_SECONDS` is shown as ``watch_stalled_since``)."""
        return await self._watched_thread(self._snapshot, "watch", WATCH_DEADLINE_SECONDS)

    async def _watched_thread(self, call: Callable[[], T], what: str, deadline: float) -> T:
        """``call()`` in a worker thread, awaited with a deadline that does not give up on it: a
        call past ``deadline`` seconds (a hung network mount under the mapping folder) is not left
        to stop the watcher or the reloads silently. It is logged (``engine.<what>_stalled``, no
        paths or values) and shown in ``/health`` as ``<what>_stalled_since`` until it returns;
        the same call is waited for, never a second one started beside it (the default thread
        pool, which Bundle parsing uses too, cannot fill with stalled calls)."""
        running = asyncio.ensure_future(asyncio.to_thread(call))
        try:
            return await asyncio.wait_for(asyncio.shield(running), deadline)
        except TimeoutError:
            log.warning(f"engine.{what}_stalled", extra={"seconds": deadline})
            self.health[f"{what}_stalled_since"] = datetime.now(UTC).isoformat()
            try:
                return await running
            finally:
                self.health.pop(f"{what}_stalled_since", None)

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


#: How long one walk of the mapping files may take before the watcher says it is stalled.
WATCH_DEADLINE_SECONDS = 30.0
#: How long reading, checking and compiling the mappings for a reload may take before it is shown
#: as stalled (about a second for the shipped mappings on a 2-core machine).
RELOAD_DEADLINE_SECONDS = 60.0


def _mtimes(root: Path) -> dict[str, float]:
    """The modification time of each mapping and form file under ``root`` (``*.yaml``, ``*.json``),
    by path. ``os.walk``: pathlib's ``rglob`` took 2.5 times as long over the 270 files shipped."""
    out: dict[str, float] = {}
    for folder, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith((".yaml", ".json")):
                path = os.path.join(folder, name)
                try:
                    out[path] = os.stat(path).st_mtime
                except OSError:
                    continue
    return out


def _compiled_engine(mset: MappingSet, timezone: str) -> MappingEngine:
    """A mapping engine whose HL7 v2 message mappings are compiled now, not on their first message
    (docs/mapping-language.md, "Compiled mappings"); those that fall back to the interpreter are logged."""
    engine = compiled_engine(mset, timezone)
    log.info(
        "mappings.compiled", extra={"mappings": len(mset.messages), "interpreted": sorted(engine.fallbacks)}
    )
    return engine

"""``GET /metrics``: the Prometheus text format, and the states read at each scrape (docs/metrics.md).

The events (messages, ACK latency, commits, deliveries, job runs, HTTP requests) are counted where
they happen, in the objects of :mod:`hms_ach.core.metrics`. This module adds what is a state rather
than an event, read from the running engine when Prometheus scrapes:

* ``hms_ach_writer_queue_jobs``: jobs waiting for the writer; ``hms_ach_writer_up`` (1 while its
  thread runs) and ``hms_ach_writer_consecutive_failures``;
* ``hms_ach_outbox_rows{sink,status}``: rows ``pending`` and ``dead`` per sink (one indexed count);
* ``hms_ach_db_pool_connections{pool,state}``: the store's pools, ``in_use`` and ``idle``;
* ``hms_ach_access_audit_queue_records`` and ``hms_ach_access_audit_dropped_records_total``;
* ``hms_ach_channel_connections{channel}``: open MLLP connections;
* SQLite in a file: ``hms_ach_wal_bytes`` (the WAL file's size), ``hms_ach_wal_checkpointer_up``
  and ``hms_ach_wal_last_checkpoint_timestamp_seconds`` (the last checkpoint that completed);
* ``hms_ach_up``: 1, with the engine's version as a label.

Access: the route is authenticated like every other; the caller needs the ``metrics.read`` action
(roles ``operator`` and ``integration``; see :mod:`hms_ach.auth.roles`), so a Prometheus server
scrapes with a bearer token (``authorization: credentials_file`` in its scrape config).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata

from fastapi import FastAPI, Request, Response
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from hms_ach.auth.caller import Caller
from hms_ach.store.db import Checkpointer

log = logging.getLogger("hms_ach.app.metrics")


@lru_cache(maxsize=1)
def _version() -> str:
    """The installed version, read once (it cannot change while the process runs)."""
    try:
        return metadata.version("hms-ach")
    except metadata.PackageNotFoundError:  # run from a source tree that was not installed
        return "unknown"


@dataclass
class EngineState:
    """The states of a running engine that a scrape reads, as functions (each may fail alone)."""

    writer_queue: Callable[[], int] = lambda: 0
    writer_up: Callable[[], bool] = lambda: False
    writer_failures: Callable[[], int] = lambda: 0
    outbox_rows: Callable[[], Iterable[tuple[str, str, int]]] = lambda: ()
    pools: Callable[[], Iterable[tuple[str, int, int]]] = lambda: ()  # (pool, in use, idle)
    access_queue: Callable[[], int] = lambda: 0
    access_dropped: Callable[[], int] = lambda: 0
    connections: Callable[[], Iterable[tuple[str, int]]] = lambda: ()
    checkpointer: Callable[[], Checkpointer | None] = lambda: None  # SQLite in a file only


class EngineCollector(Collector):
    """Yields the states of the engine that :func:`serve_state` names (none when no engine runs)."""

    def __init__(self) -> None:
        self.state: EngineState | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("hms_ach_up", "1 while an engine runs in this process", labels=["version"])
        up.add_metric([_version()], 1.0 if self.state is not None else 0.0)
        yield up
        state = self.state
        if state is None:
            return
        yield from _safe("writer", lambda: _writer(state))
        yield from _safe("outbox", lambda: _outbox(state))
        yield from _safe("pool", lambda: _pools(state))
        yield from _safe("access_audit", lambda: _access(state))
        yield from _safe("connections", lambda: _connections(state))
        yield from _safe("wal", lambda: _wal(state))


def _safe(part: str, make: Callable[[], list[Metric]]) -> list[Metric]:
    """The metrics of one part; none (and one log line) when reading it fails, so that a store that
    is down does not take the whole scrape with it."""
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - a scrape never fails for one part
        log.warning("metrics.collect_failed", extra={"part": part, "error": type(exc).__name__})
        return []


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _writer(state: EngineState) -> list[Metric]:
    return [
        _gauge("hms_ach_writer_queue_jobs", "Jobs waiting for the writer", state.writer_queue()),
        _gauge("hms_ach_writer_up", "1 while the writer thread runs", 1.0 if state.writer_up() else 0.0),
        _gauge(
            "hms_ach_writer_consecutive_failures",
            "Group commits failed in a row (0 once one commits)",
            state.writer_failures(),
        ),
    ]


def _outbox(state: EngineState) -> list[Metric]:
    g = GaugeMetricFamily(
        "hms_ach_outbox_rows",
        "Outbox rows waiting (pending) or dead-lettered, by sink",
        labels=["sink", "status"],
    )
    for sink, status, count in state.outbox_rows():
        g.add_metric([sink, status], count)
    return [g]


def _pools(state: EngineState) -> list[Metric]:
    g = GaugeMetricFamily(
        "hms_ach_db_pool_connections", "Database connections by pool and state", labels=["pool", "state"]
    )
    for pool, in_use, idle in state.pools():
        g.add_metric([pool, "in_use"], in_use)
        g.add_metric([pool, "idle"], idle)
    return [g]


def _access(state: EngineState) -> list[Metric]:
    dropped = CounterMetricFamily(
        "hms_ach_access_audit_dropped_records", "Access records dropped because the queue stayed full"
    )
    dropped.add_metric([], state.access_dropped())
    return [
        _gauge(
            "hms_ach_access_audit_queue_records", "Access records waiting to be written", state.access_queue()
        ),
        dropped,
    ]


def _connections(state: EngineState) -> list[Metric]:
    g = GaugeMetricFamily("hms_ach_channel_connections", "Open connections by channel", labels=["channel"])
    for channel, count in state.connections():
        g.add_metric([channel], count)
    return [g]


def _wal(state: EngineState) -> list[Metric]:
    checkpointer = state.checkpointer()
    if checkpointer is None:
        return []
    out: list[Metric] = [
        _gauge("hms_ach_wal_bytes", "Size of the SQLite WAL file", checkpointer.wal_bytes()),
        _gauge(
            "hms_ach_wal_checkpointer_up",
            "1 while the SQLite WAL checkpoint thread runs",
            1.0 if checkpointer.alive else 0.0,
        ),
    ]
    done = checkpointer.last_completed_at
    if done is not None:  # none yet since the start: left out rather than 0
        out.append(
            _gauge(
                "hms_ach_wal_last_checkpoint_timestamp_seconds",
                "Unix time of the last SQLite WAL checkpoint that copied every frame",
                done,
            )
        )
    return out


COLLECTOR = EngineCollector()
REGISTRY.register(COLLECTOR)


def serve_state(state: EngineState) -> None:
    """Name the running engine whose states the scrapes read (the last one started)."""
    COLLECTOR.state = state


def release_state(state: EngineState) -> None:
    """The engine of ``state`` stops: scrapes read no states from it any more."""
    if COLLECTOR.state is state:
        COLLECTOR.state = None


def may_read_metrics(caller: Caller | None) -> bool:
    """Whether ``caller`` may scrape: the ``metrics.read`` action (roles operator and integration);
    anyone when authentication is off (loopback only)."""
    if caller is None:
        return False
    return not caller.authenticated or caller.grant("metrics.read").allowed


def install_metrics_route(app: FastAPI) -> None:
    """``GET /metrics`` on ``app`` (authenticated by the app's middleware; 403 without the action)."""

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        if not may_read_metrics(getattr(request.state, "caller", None)):
            body = (
                b'{"type":"about:blank","title":"Forbidden","status":403,'
                b'"detail":"/metrics needs the metrics.read action: the operator or integration role"}'
            )
            return Response(body, status_code=403, media_type="application/problem+json")
        # the format Prometheus asks for in Accept (OpenMetrics, or the text format it knows)
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(REGISTRY), headers={"Content-Type": content_type})

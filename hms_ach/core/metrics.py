"""The engine's Prometheus metrics: one place that names them all (docs/metrics.md).

The counters and histograms below are module-level objects of ``prometheus_client``'s default
registry. The parts that make the events increment them where they happen (a channel, the
writer, the dispatcher, the scheduler, the HTTP middleware); values that are states rather than
events (the writer's queue, outbox rows pending and dead, the database pool, the access-audit
queue) are read when Prometheus scrapes, by the collector that :mod:`hms_ach.app.metrics`
registers for the running engine. ``GET /metrics`` serves them in the Prometheus text format.

Names follow Prometheus's conventions: ``hms_ach_`` prefix, base units (seconds), ``_total`` for
counters. Labels are bounded: channel, sink and job names come from channels.yaml, message types
are cut to ``TYPE^EVENT``, HTTP routes are path templates (never concrete paths, which hold ids),
and no label ever carries a field value.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

#: Buckets for latencies from a fraction of a millisecond to half a minute (ACKs, commits, HTTP).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Buckets for outbox delivery lag (event written -> delivered), up to a day.
LAG_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)

MESSAGES = Counter(
    "hms_ach_messages",
    "Inbound messages answered, by channel, message type (TYPE^EVENT), outcome status and ACK code",
    ["channel", "message_type", "status", "ack_code"],
)
ACK_LATENCY = Histogram(
    "hms_ach_ack_latency_seconds",
    "Time from a complete MLLP frame to its ACK being ready (parse, map, commit), by channel",
    ["channel"],
    buckets=LATENCY_BUCKETS,
)
FHIR_SEARCHES = Counter(
    "hms_ach_fhir_searches",
    "FHIR searches answered, by where they ran: event_loop (SQLite, within the inline deadline), "
    "read_thread (PostgreSQL), read_thread_after_deadline (SQLite: past the deadline, run again)",
    ["ran"],
)
WRITER_BATCH_SECONDS = Histogram(
    "hms_ach_writer_batch_seconds",
    "Time the writer spent on one group commit (its jobs, then the commit)",
    buckets=LATENCY_BUCKETS,
)
WRITER_BATCH_JOBS = Histogram(
    "hms_ach_writer_batch_jobs",
    "Jobs committed together in one group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
CONFIG_LOADS = Counter(
    "hms_ach_config_loads",
    "Mapping loads by source (local: this instance's files; cluster: a version another instance"
    " published) and outcome (ok; refused: the last good mappings stay)",
    ["source", "outcome"],
)
WRITER_FAILURES = Counter(
    "hms_ach_writer_failures",
    "Group commits that failed in the store, by stage (connect, begin, statement, commit...)",
    ["stage"],
)
OUTBOX_DELIVERIES = Counter(
    "hms_ach_outbox_deliveries",
    "Outbox delivery attempts by sink and result (delivered, retry, dead)",
    ["sink", "result"],
)
OUTBOX_LAG = Histogram(
    "hms_ach_outbox_delivery_lag_seconds",
    "Time from an event being written to its delivery, by sink",
    ["sink"],
    buckets=LAG_BUCKETS,
)
JOB_RUNS = Counter(
    "hms_ach_job_runs",
    "Scheduled job runs by job and outcome (ok, error)",
    ["job", "outcome"],
)
HTTP_REQUESTS = Histogram(
    "hms_ach_http_request_seconds",
    "HTTP request latency by method, route template and status class (2xx, 4xx...)",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
NOTIFY_UNRESOLVED = Counter(
    "hms_ach_notify_unresolved_recipients",
    "Notification recipients the notify sink could not resolve, by sink and rule (employee, managers, peers)",
    ["sink", "rule"],
)
WAL_CHECKPOINTER_RESTARTS = Counter(
    "hms_ach_wal_checkpointer_restarts",
    "SQLite WAL checkpoint threads started again after one exited (at most 5 a minute)",
)
WAL_RESTARTS = Counter(
    "hms_ach_wal_restarts",
    "Checkpoints by the writer that let its next transaction start the SQLite WAL over (about once per 128 MiB of WAL)",
)


def message_type_label(message_type: str | None) -> str:
    """``ADT^A01`` from a stored MSH-9 (``ADT^A01^ADT_A01``); bounded, never a field value."""
    if not message_type:
        return "unknown"
    parts = message_type.split("^")
    label = "^".join(p for p in parts[:2] if p)[:16]
    return label if label.replace("^", "").isalnum() else "invalid"


def status_class(status: int) -> str:
    """``2xx``, ``4xx``... of an HTTP status."""
    return f"{status // 100}xx"

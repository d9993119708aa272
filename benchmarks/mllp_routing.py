"""Routed HL7 v2 throughput (issue 16): receive -> transform -> send -> downstream ACK, and the inbound
ACK latency with and without a slow downstream.

``python -m benchmarks.mllp_routing [--seconds S] [--delay-ms D] [--database URL] [--out FILE]``

Three rounds, each on a fresh store, each with ``hms-ach run`` in its own process, the load driver
(:mod:`benchmarks.mllp_load`, one sender waiting for every ACK) in another, and the downstream
receiver (:mod:`benchmarks.hl7_downstream`) in a third:

1. ``baseline``: no sink; the inbound msg/s and ACK latency alone;
2. ``routed``: an ``mllp`` sink routing every ADT of ``adt_in`` through ``mappings/hl7/adt_to_downstream``
   to a receiver that answers at once; after the load, the engine drains the outbox, and the routed
   throughput is the rows delivered over the span from the first row written to the last delivered
   (from the rows' own times), with the lag (delivered - written) per row; the backlog left when the
   load stopped, over the time it took to deliver it, is the outbound rate alone;
3. ``slow``: the same with a receiver that waits ``--delay-ms`` before each ACK: the inbound ACK
   latency must not move (inbound never waits for outbound), while the outbox falls behind.

Prints one JSON object and writes it to ``--out`` when given. The machine is shared: compare rounds
of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.procs import (
    Service,
    child_env,
    free_port,
    hms_ach_command,
    run_driver,
    start_module,
    write_engine_config,
)
from benchmarks.stats import latency_summary

SINK = """sinks:
  - name: downstream
    type: mllp
    host: 127.0.0.1
    port: {port}
    ack_timeout_seconds: 30
    routes:
      - channel: adt_in
        message_types: ["ADT^*"]
        transform: adt_to_downstream
"""


def _rows(database_url: str) -> list[dict[str, Any]]:
    from hms_ach.store import outbox
    from hms_ach.store.db import Store

    store = Store(database_url)
    try:
        with store.read() as conn:
            return outbox.list_rows(conn, destination="downstream", limit=1_000_000)
    finally:
        store.dispose()


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _routed(rows: list[dict[str, Any]], load_end: datetime) -> dict[str, Any]:
    for r in rows:
        r["created_at"] = _utc(r["created_at"])
        r["delivered_at"] = _utc(r["delivered_at"]) if r["delivered_at"] is not None else None
    done = [r for r in rows if r["status"] == "delivered" and r["delivered_at"] is not None]
    if not done:
        return {"rows": len(rows), "delivered": 0}
    after = [r for r in done if r["delivered_at"] > load_end]  # the backlog left when the load stopped
    drain = (max(r["delivered_at"] for r in after) - load_end).total_seconds() if after else 0.0
    first = min(r["created_at"] for r in rows)
    last = max(r["delivered_at"] for r in done)
    span = (last - first).total_seconds()
    lags = [(r["delivered_at"] - r["created_at"]).total_seconds() * 1000.0 for r in done]
    return {
        "rows": len(rows),
        "delivered": len(done),
        "span_seconds": round(span, 3),
        "routed_msg_per_s": round(len(done) / span, 2) if span > 0 else None,
        "backlog_at_load_end": len(after),
        "backlog_drain_msg_per_s": round(len(after) / drain, 2) if drain > 0 else None,
        "lag": latency_summary(lags),
    }


def round_(name: str, folder: Path, seconds: float, delay_ms: float | None, drain: bool) -> dict[str, Any]:
    folder.mkdir(parents=True)
    database_url = f"sqlite:///{folder / 'store.db'}"
    mllp, http = free_port(), free_port()
    config = write_engine_config(folder, database_url, mllp, http)
    services: list[Service] = []
    try:
        if delay_ms is not None:
            port = free_port()
            services.append(
                start_module(
                    "downstream",
                    "benchmarks.hl7_downstream",
                    ["--port", str(port), "--delay-ms", str(delay_ms)],
                    folder,
                    [port],
                )
            )
            with config.open("a", encoding="utf-8") as fh:
                fh.write(SINK.format(port=port))
        engine = Service(
            "engine",
            [*hms_ach_command(), "run", "--config", str(config)],
            folder / "engine.log",
            folder,
            child_env(),
        )
        services.append(engine)
        engine.wait_ports([mllp, http], timeout=90)
        load = run_driver(
            "benchmarks.mllp_load",
            ["--port", str(mllp), "--seconds", str(seconds), "--reps", "1", "--warmup", "50", "--tag", name],
            timeout=seconds + 120,
        )
        load_end = datetime.now(UTC)
        out: dict[str, Any] = {"round": name, "downstream_delay_ms": delay_ms, "inbound": load["runs"][0]}
        if delay_ms is not None:
            if drain:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    rows = _rows(database_url)
                    if rows and all(r["status"] != "pending" for r in rows):
                        break
                    time.sleep(0.5)
            out["outbound"] = _routed(_rows(database_url), load_end)
        return out
    finally:
        for svc in reversed(services):
            svc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="inbound load per round")
    p.add_argument("--delay-ms", type=float, default=50.0, help="the slow receiver's wait before each ACK")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hms-ach-routing-") as tmp:
        base = Path(tmp)
        rounds = [
            round_("baseline", base / "baseline", args.seconds, None, drain=False),
            round_("routed", base / "routed", args.seconds, 0.0, drain=True),
            round_("slow", base / "slow", args.seconds, args.delay_ms, drain=False),
        ]
    by = {r["round"]: r for r in rounds}
    p50 = {k: r["inbound"]["p50_ms"] for k, r in by.items()}
    result = {
        "rounds": rounds,
        "summary": {
            "inbound_msg_per_s": {k: r["inbound"]["msg_per_s"] for k, r in by.items()},
            "inbound_ack_p50_ms": p50,
            "inbound_ack_p99_ms": {k: r["inbound"]["p99_ms"] for k, r in by.items()},
            "routed_msg_per_s": by["routed"]["outbound"].get("routed_msg_per_s"),
            "backlog_drain_msg_per_s": by["routed"]["outbound"].get("backlog_drain_msg_per_s"),
            "routed_lag_p50_ms": by["routed"]["outbound"].get("lag", {}).get("p50_ms"),
            "slow_over_routed_ack_p50": round(p50["slow"] / p50["routed"], 3) if p50["routed"] else None,
            "routed_over_baseline_ack_p50": round(p50["routed"] / p50["baseline"], 3)
            if p50["baseline"]
            else None,
        },
    }
    text = json.dumps(result, indent=2, default=str)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()

"""Bulk ``$export`` figure: the rate and peak RSS of a system-level export of N resources.

For each size the store (SQLite, or PostgreSQL with ``--postgres``) is grown with
:mod:`benchmarks.bulk_load` (Practitioners, Patients, Encounters, Locations), then a fresh process
runs the export worker (:class:`hms_ach.fhir.export.ExportManager`, the engine's own) over it and
reports the resources written, the seconds, and its RSS after start-up and at its peak
(``VmHWM``). The store grows in place from one size to the next, so the sizes are measured in
one run. A flat peak across sizes is what bounded memory means.

    python -m benchmarks.export --sizes 10000,100000 --out benchmarks/results/issue-15/export.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.bulk_load import LoadState, load


def _status_kib(field: str) -> int:
    """A line of /proc/self/status in KiB: ``VmRSS`` (now) or ``VmHWM`` (the peak of this program).
    Not ``ru_maxrss``: Linux carries the parent's peak over a fork and exec into it, and the parent
    here is the loader, whose peak is not the export's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def run_export(url: str, root: str, batch_size: int) -> dict[str, Any]:
    """In this process: one system export of every served type, run to the end by the worker."""
    from hms_ach.core.records import FHIR_SERVED
    from hms_ach.fhir.export import ExportManager, ExportSettings
    from hms_ach.store import export_queries
    from hms_ach.store.db import Store

    store = Store(url)
    manager = ExportManager(store, Path(root), ExportSettings(batch_size=batch_size))
    Path(root).mkdir(parents=True, exist_ok=True)
    export_id = uuid.uuid4().hex
    now = datetime.now(UTC)
    row = {
        "id": export_id,
        "status": "accepted",
        "kind": "system",
        "sub": "benchmark",
        "client_id": None,
        "request": "benchmark",
        "base": "http://localhost/fhir",
        "types": orjson.dumps(list(FHIR_SERVED)).decode(),
        "since": None,
        "transaction_time": now,
        "directory": str(Path(root) / export_id),
        "progress": orjson.dumps({"index": 0, "after": None, "offset": 0, "count": 0, "output": []}).decode(),
        "created_at": now,
    }
    with store.transaction() as tx:
        export_queries.insert_export(tx, row)
    rss_start = _status_kib("VmRSS")
    t0 = time.perf_counter()
    manager.run_pending()
    seconds = time.perf_counter() - t0
    with store.read() as conn:
        done = export_queries.export_row(conn, export_id)
    assert done is not None and done["status"] == "complete", done
    output = orjson.loads(done["progress"])["output"]
    written = sum(int(o["count"]) for o in output)
    size = sum((Path(root) / export_id / o["file"]).stat().st_size for o in output)
    store.dispose()
    return {
        "resources": written,
        "files": {o["type"]: o["count"] for o in output},
        "bytes": size,
        "seconds": round(seconds, 3),
        "resources_per_second": round(written / seconds, 1) if seconds else None,
        "rss_after_start_mib": round(rss_start / 1024, 1),
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        "batch_size": batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000", help="resources in the store, comma-separated")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL instead of a SQLite file")
    parser.add_argument("--out", default=None, help="write the figure's JSON here")
    parser.add_argument("--child", nargs=2, metavar=("URL", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_export(args.child[0], args.child[1], args.batch_size)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="hms-ach-export-"))
    url = args.postgres or f"sqlite:///{work}/store.db"
    state = LoadState(seed=15)
    runs = []
    for size in (int(s) for s in args.sizes.split(",")):
        patients = max(1, (size - size // 100) // 3)  # each patient comes with two encounters
        load_average_before = os.getloadavg()
        t0 = time.perf_counter()
        load(url, state, practitioners=size // 100, patients=patients)
        loaded = time.perf_counter() - t0
        child = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.export",
                "--batch-size",
                str(args.batch_size),
                "--child",
                url,
                str(work / f"exports-{size}"),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
        result |= {
            "size_asked": size,
            "load_seconds": round(loaded, 1),
            "store_counts": state.counts(),
            # the machine is shared: 1/5/15-minute load averages before seeding and after the export
            "load_average_before": [round(x, 2) for x in load_average_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
        print(json.dumps(result), flush=True)
        runs.append(result)
    figure = {
        "figure": "bulk $export (system level, every served type), one worker",
        "database": "postgresql" if args.postgres else "sqlite",
        "runs": runs,
        "peak_rss_ratio_last_to_first": round(runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"], 3),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(figure, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

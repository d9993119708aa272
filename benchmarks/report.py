"""The results of a run: the table (figure, value, ceiling/peer, ratio), the JSON file, and the
README performance table rendered from a results file.

The table rows are derived from the figures' data by :func:`table_rows`, both when a run ends and
when the README table is rendered from a saved file, so the two never disagree.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.procs import REPO
from benchmarks.stats import ratio

RESULTS_DIR = REPO / "benchmarks" / "results"
README_HEADING = "## Performance"


# ------------------------------------------------------------------------------------------- machine
def _event_loop() -> str:
    from hms_ach.app.eventloop import loop_name

    try:
        import httptools  # noqa: F401
    except ImportError:
        return f"{loop_name()}, h11"
    return f"{loop_name()}, httptools"


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "event_loop": _event_loop(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="utf-8") as fh:
            info["memory_gb"] = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        import sqlite3

        info["sqlite"] = sqlite3.sqlite_version
    except ImportError:
        pass
    versions = {}
    for dist in ("hl7", "hl7apy", "SQLAlchemy", "fastapi", "uvicorn", "psycopg", "orjson"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:  # noqa: BLE001 - a missing package is just not listed
            continue
    info["packages"] = versions
    return info


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10
        ).stdout.strip()

    info: dict[str, Any] = {"code_digest": code_digest()}
    try:
        info.update(
            commit=git("rev-parse", "HEAD"),
            dirty=bool(git("status", "--porcelain", "--", "hms_ach", "mappings")),
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def code_digest() -> str:
    """sha256 over the engine's code and mappings as they are on disk (uncommitted edits included)."""
    import hashlib

    h = hashlib.sha256()
    for folder in ("hms_ach", "mappings"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".yaml"):
                h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- formatting
def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".strip()


def _spread(s: dict[str, Any] | None, unit: str) -> str:
    """``median (min–max) unit``."""
    if not s or s.get("median") is None:
        return "n/a"
    return f"{_num(s['median'])} ({_num(s['min'])}–{_num(s['max'])}) {unit}".strip()


def _ratio_text(r: float | None) -> str:
    if r is None:
        return "n/a"
    return f"{r:.3g}×"


def _med(s: dict[str, Any] | None) -> float | None:
    return None if not s else s.get("median")


def _row(
    figure: str, measure: str, value: str, ceiling: str, r: float | None, note: str = ""
) -> dict[str, Any]:
    return {
        "figure": figure,
        "measure": measure,
        "value": value,
        "ceiling": ceiling,
        "ratio": r,
        "ratio_text": _ratio_text(r),
        "note": note,
    }


def _lat(d: dict[str, Any]) -> str:
    return f"p50 {_num(_med(d.get('p50_ms')))} / p99 {_num(_med(d.get('p99_ms')))} ms"


# ------------------------------------------------------------------------------------------- rows
def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The summary table of a run: one row per figure and ceiling/peer, with the ratio."""
    rows: list[dict[str, Any]] = []
    figs = results.get("figures", {})
    a = figs.get("A")
    if a and "evaluate_msg_per_s" in a:
        ev = a["evaluate_msg_per_s"]
        label = f"parse + map ADT^A01, 1 thread ({a['messages']['mean_bytes']} B msgs)"
        for key, name in (
            ("hl7_parse_msg_per_s", "hl7.parse alone"),
            ("hl7apy_msg_per_s", "hl7apy parse_message alone"),
            ("split_msg_per_s", "ceiling: str.split to components"),
        ):
            rows.append(
                _row(
                    "A",
                    label,
                    _spread(ev, "msg/s"),
                    f"{name}: {_spread(a[key], 'msg/s')}",
                    ratio(_med(ev), _med(a[key])),
                )
            )
    elif a:
        rows.append(_row("A", "parse + map", a.get("status", "not measured"), "", None))
    rows += _b_rows(figs.get("B"), "B", "")
    for label, c in (("C", figs.get("C")),):
        rows += _c_rows(c, label, "")
    rows += _d_rows(figs.get("D"))
    e = figs.get("E")
    if e and e.get("peak_rss_kb"):
        rows.append(
            _row(
                "E",
                f"peak RSS (VmHWM) of hms-ach run over {e['messages_ingested']:,} msgs "
                f"({_STOPPED.get(e['stopped_by'], e['stopped_by'])})",
                f"{_num(e['peak_rss_kb'] / 1024, 'MiB')}",
                f"RSS right after start: {_num((e.get('rss_kb_after_start') or 0) / 1024, 'MiB')}",
                ratio(e["peak_rss_kb"], e.get("rss_kb_after_start")),
                note=_growth_note(e),
            )
        )
    elif e:
        rows.append(_row("E", "peak RSS", e.get("status", "not measured"), "", None))
    f = figs.get("F")
    if f and "B" in f:
        rows += _b_rows(f["B"], "F", " (PostgreSQL)")
        rows += _c_rows(f.get("C"), "F", " (PostgreSQL)")
    elif f:
        rows.append(_row("F", "PostgreSQL", f.get("status", "not measured"), "", None))
    return rows


def _d_rows(d: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not d:
        return []
    if "poll_rows_per_s" not in d:
        return [_row("D", "SFTP CSV roster, rows/s", d.get("status", "not measured"), "", None)]
    poll = d["poll_rows_per_s"]
    label = f"SFTP CSV: one poll of a {d['rows']:,}-row staff roster ({_num(d['file_bytes'] / 1e6)} MB)"
    cpu = [p["engine_cpu_percent"] for p in d.get("polls", [])]
    note = f"poll CPU (engine side) {sorted(cpu)[len(cpu) // 2]}% of one core" if cpu else ""
    dl = d["download_rows_per_s"]

    def fine_ratio(
        a: float | None, b: float | None
    ) -> float | None:  # far below 1: keep 3 significant digits
        return None if a is None or not b else float(f"{a / b:.3g}")

    return [
        _row(
            "D",
            label,
            _spread(poll, "rows/s"),
            f"csv module alone: {_spread(d['csv_rows_per_s'], 'rows/s')}",
            fine_ratio(_med(poll), _med(d["csv_rows_per_s"])),
            note=note,
        ),
        _row(
            "D",
            label,
            _spread(poll, "rows/s"),
            f"raw SFTP download: {_spread(d['download_mb_per_s'], 'MB/s')} = {_num(_med(dl), 'rows/s')}",
            fine_ratio(_med(poll), _med(dl)),
        ),
    ]


def _growth_note(e: dict[str, Any]) -> str:
    rss = [s["rss_kb"] for s in e.get("samples", []) if s.get("rss_kb")]
    parts = []
    if rss:
        parts.append(f"RSS {_num(rss[0] / 1024)} → {_num(rss[-1] / 1024)} MiB over the run")
    growth = e.get("growth", {}).get("kb_per_10k_messages")
    if growth is not None:
        parts.append(f"slope over its 2nd half {_num(growth / 1024)} MiB per 10k msgs")
    return "; ".join(parts)


def _b_rows(b: dict[str, Any] | None, fig: str, suffix: str) -> list[dict[str, Any]]:
    if not b:
        return []
    if "1_connection" not in b:
        return [_row(fig, "MLLP ingest" + suffix, b.get("status", "not measured"), "", None)]
    rows = []
    echo = b.get("echo", {})
    commit = b.get("commit_ceiling", {})
    for key, n in (("1_connection", "1 connection"), ("8_connections", "8 connections")):
        run = b[key]
        problem = run.get("problem", "")
        peer = echo.get(key)
        rows.append(
            _row(
                fig,
                f"MLLP ingest{suffix}, {n}, msg/s",
                _spread(run["msg_per_s"], "msg/s"),
                f"no-parse MLLP echo, {n}: {_spread(peer and peer['msg_per_s'], 'msg/s')}",
                ratio(_med(run["msg_per_s"]), _med(peer and peer["msg_per_s"])),
                note=(problem + f" engine CPU {run.get('engine_cpu_percent')}%").strip(),
            )
        )
        rows.append(
            _row(
                fig,
                f"MLLP ingest{suffix}, {n}, ACK latency",
                _lat(run),
                f"echo: {_lat(peer) if peer else 'n/a'}",
                ratio(_med(run["p99_ms"]), _med(peer and peer["p99_ms"])),
                note="ratio of p99",
            )
        )
        if key == "8_connections" and commit:
            rows.append(
                _row(
                    fig,
                    f"MLLP ingest{suffix}, {n}, msg/s",
                    _spread(run["msg_per_s"], "msg/s"),
                    f"bare commit loop, 1 row/commit: {_spread(commit['commits_per_s'], 'commits/s')}",
                    ratio(_med(run["msg_per_s"]), _med(commit["commits_per_s"])),
                )
            )
    return rows


_STOPPED = {"count": "all requested", "time limit": "stopped by the time limit"}
_C_LABELS = {
    "read": "read Practitioner by id",
    "family": "Practitioner?family=X&_count=20",
    "encounter": "Encounter?patient&date=ge&_include=Encounter:location",
    "create": "POST /fhir/Practitioner (FHIR ingest)",
}


def _c_rows(c: dict[str, Any] | None, fig: str, suffix: str) -> list[dict[str, Any]]:
    if not c:
        return []
    if "sizes" not in c:
        return [_row(fig, "FHIR API" + suffix, c.get("status", "not measured"), "", None)]
    rows = []
    http = c.get("http_ceiling")
    sizes = list(c["sizes"].values())
    for entry in sizes:
        n = entry["counts"]["Practitioner"]
        size = f"{n:,} Practitioners" + ("" if entry.get("complete", True) else " (load budget hit)")
        for kind in ("read", "family", "encounter", "create"):
            if kind not in entry:
                continue
            run = entry[kind]
            value = f"{_spread(run['req_per_s'], 'req/s')}; {_lat(run)}"
            store = entry.get("store_ceiling", {}).get(kind, {}).get("queries_per_s")
            rows.append(
                _row(
                    fig,
                    f"{_C_LABELS[kind]}{suffix} @ {size}, concurrency 8",
                    value,
                    f"same query in-process, 1 thread, no HTTP: {_spread(store, 'q/s')}" if store else "",
                    ratio(_med(run["req_per_s"]), _med(store)) if store else None,
                    note=run.get("problem", ""),
                )
            )
            secured = entry.get(kind + "_secured")
            if secured:
                rows.append(
                    _row(
                        fig,
                        f"{_C_LABELS[kind]}{suffix} @ {size}, auth + access audit on",
                        f"{_spread(secured['req_per_s'], 'req/s')}; {_lat(secured)}",
                        f"same, auth and access audit off: {_spread(run['req_per_s'], 'req/s')}",
                        ratio(_med(secured["req_per_s"]), _med(run["req_per_s"])),
                        note=secured.get("problem", ""),
                    )
                )
            if kind == "read" and http:
                rows.append(
                    _row(
                        fig,
                        f"{_C_LABELS[kind]}{suffix} @ {size}, concurrency 8",
                        _spread(run["req_per_s"], "req/s"),
                        f"HTTP no-op (uvicorn, bare ASGI): {_spread(http['req_per_s'], 'req/s')}",
                        ratio(_med(run["req_per_s"]), _med(http["req_per_s"])),
                    )
                )
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        n1, n2 = small["counts"]["Practitioner"], large["counts"]["Practitioner"]
        for kind in ("read", "family", "encounter"):
            if kind in small and kind in large:
                rows.append(
                    _row(
                        fig,
                        f"{_C_LABELS[kind]}{suffix}: {n2:,} vs {n1:,}",
                        f"{_num(_med(large[kind]['req_per_s']), 'req/s')}, p99 {_num(_med(large[kind]['p99_ms']), 'ms')}",
                        f"at {n1:,}: {_num(_med(small[kind]['req_per_s']), 'req/s')}, "
                        f"p99 {_num(_med(small[kind]['p99_ms']), 'ms')}",
                        ratio(_med(large[kind]["req_per_s"]), _med(small[kind]["req_per_s"])),
                        note=f"p99 ratio {_ratio_text(ratio(_med(large[kind]['p99_ms']), _med(small[kind]['p99_ms'])))}",
                    )
                )
    return rows


# ------------------------------------------------------------------------------------------- output
def print_table(rows: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    widths = {"figure": 3, "measure": 0, "value": 0, "ceiling": 0, "ratio_text": 7}
    for r in rows:
        for k in ("measure", "value", "ceiling"):
            widths[k] = min(max(widths[k], len(r[k])), 72)
    head = (
        f"{'fig':<3}  {'measure':<{widths['measure']}}  {'value (median (min–max))':<{widths['value']}}  "
        f"{'ceiling / peer, same run':<{widths['ceiling']}}  ratio"
    )
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        print(
            f"{r['figure']:<3}  {r['measure']:<{widths['measure']}}  {r['value']:<{widths['value']}}  "
            f"{r['ceiling']:<{widths['ceiling']}}  {r['ratio_text']}"
            + (f"   [{r['note']}]" if r["note"] else ""),
            file=out,
        )


def results_path(mode: str, when: datetime, folder: Path = RESULTS_DIR) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{when.strftime('%Y%m%dT%H%M%SZ')}-{mode}.json"


def latest_results(folder: Path = RESULTS_DIR, mode: str | None = "full") -> Path | None:
    pattern = f"*-{mode}.json" if mode else "*.json"
    files = sorted(folder.glob(pattern))
    return files[-1] if files else None


def readme_table(results: dict[str, Any], source: str = "") -> str:
    """The README performance section body, in markdown, from one results document."""
    m = results.get("machine", {})
    lines = [
        f"Measured by `python -m benchmarks` ({results.get('mode')} mode) on {results.get('started_at', '?')[:10]}: "
        f"{m.get('cores')} cores ({m.get('cpu', 'unknown CPU')}), Python {m.get('python')}, SQLite "
        f"{m.get('sqlite', '?')}, {m.get('platform', '')}"
        + (f"; event loop and HTTP parser: {m['event_loop']}" if m.get("event_loop") else "")
        + ". Medians of several runs with (min–max); every "
        "ceiling or peer was measured in the same run. Generated from "
        f"`{source or 'a results file'}` by `python -m benchmarks --readme`.",
        "",
        "| figure | measure | value | ceiling / peer (same run) | ratio |",
        "|---|---|---|---|---|",
    ]
    for r in table_rows(results):
        note = f" ({r['note']})" if r["note"] else ""
        cells = [r["figure"], r["measure"], r["value"], r["ceiling"] or "–", r["ratio_text"] + note]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    notes = results.get("notes", [])
    if notes:
        lines.append("")
        lines += [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_readme_section(readme: Path, body: str) -> None:
    """Replace what follows ``## Performance`` (up to the next ``## `` heading) with ``body``."""
    text = readme.read_text(encoding="utf-8")
    start = text.find(README_HEADING)
    if start < 0:
        text = text.rstrip("\n") + f"\n\n{README_HEADING}\n\n{body}"
    else:
        body_start = start + len(README_HEADING)
        nxt = text.find("\n## ", body_start)
        tail = text[nxt:] if nxt >= 0 else ""
        text = text[:body_start] + "\n\n" + body + tail
    readme.write_text(text, encoding="utf-8")


def now() -> datetime:
    return datetime.now(UTC)

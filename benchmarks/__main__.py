"""``python -m benchmarks [--quick | --smoke] [--only A,B,...]`` runs the suite, prints the table and
writes ``benchmarks/results/<timestamp>-<mode>.json``.

``python -m benchmarks --readme [RESULTS.json] [--write-readme]`` renders the README performance
table from a results file (by default the newest full run) and prints it, or writes it into
README.md under ``## Performance``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from benchmarks import figures, report
from benchmarks.procs import REPO, BenchmarkError
from hms_ach.app.cli_common import progress

ALL_FIGURES = ("A", "B", "C", "D", "E", "F")

NOTES = [
    "The engine is `hms-ach run --config <temporary channels.yaml>` (log level INFO, written to a file), on a "
    "temporary SQLite file (WAL, synchronous=FULL) unless the figure says PostgreSQL.",
    "Load comes from separate processes on loopback; on this 2-core machine they share the CPUs with the engine.",
    "B: every sender waits for each ACK before sending the next message; each message has a new MSH-10, so "
    "nothing is answered as a duplicate. The mix is ADT A01/A08/A03 with some MFN^M02.",
    "C: the store is filled directly (record rows and search-index rows; no history rows), then served by "
    "hms-ach run; searches are sent as the issue names them, without _total, so (since issue 20) a page carries "
    "Bundle.total only when every match is on it, and nothing is counted otherwise.",
    "D: one poll of the sftp_csv channel in the benchmark process, on a fresh SQLite store each time, from an "
    "asyncssh SFTP server in its own process on loopback; every row is a new Practitioner.",
    "E: 8 senders for as long as the time limit allows; RSS is sampled from /proc/<pid>/status.",
]


def _measure(
    name: str, fn: Callable[[], dict[str, Any]], run: figures.Run, failures: list[str]
) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 - one figure failing must not lose the others
        run.say(f"{name}: FAILED: {str(exc)[:500]}")
        failures.append(name)
        _figure_done(1)
        return {
            "status": f"failed: {type(exc).__name__}: {exc}"[:2000],
            "traceback": traceback.format_exc()[-4000:],
        }
    out["wall_seconds"] = round(time.monotonic() - t0, 1)
    out["load_average_at_end"] = os.getloadavg()  # a high value says other work shared the CPUs
    _figure_done(1)
    return out


def _no_progress(_n: int = 1) -> None:
    return None


#: Advances the progress bar of the run (a figure done); set by :func:`run_suite`.
_figure_done: Callable[[int], None] = _no_progress


def run_suite(
    mode_name: str,
    only: set[str],
    with_pg: bool | None,
    out_dir: Path,
    keep: bool,
    sizes: tuple[int, ...] | None = None,
    map_workers: list[int] | None = None,
) -> int:
    mode = figures.MODES[mode_name]
    if sizes:  # figure C (and F's C) at these store sizes instead of the mode's
        mode = dataclasses.replace(mode, c_sizes=sizes, f_sizes=sizes)
    run = figures.Run(mode, keep=keep)
    run.map_workers = map_workers or [0]
    started = report.now()
    results: dict[str, Any] = {
        "schema": 1,
        "mode": mode_name,
        "started_at": started.isoformat(),
        "machine": report.machine_info(),
        "git": report.git_info(),
        "settings": {**figures.mode_settings(mode), "map_workers": run.map_workers},
        "notes": list(NOTES),
        "figures": {},
        "load_average_at_start": os.getloadavg(),
    }
    if results["load_average_at_start"][0] > 1.0:
        results["notes"].append(
            f"The 1-minute load average was {results['load_average_at_start'][0]:.2f} on "
            f"{os.cpu_count()} cores when this run started: other work may have shared the CPUs."
        )
    figs = results["figures"]
    failures: list[str] = []
    run.say(f"benchmarks, {mode_name} mode; scratch folder {run.tmp}")
    global _figure_done
    bar = contextlib.ExitStack()  # the progress bar: on stderr, on a terminal only
    _figure_done = bar.enter_context(progress("bench figures", len(only & set(ALL_FIGURES))))
    try:
        if "A" in only:
            figs["A"] = _measure("A", lambda: figures.figure_a(run), run, failures)
        if "B" in only:

            def b() -> dict[str, Any]:
                out = figures.figure_b(run)
                out["echo"] = figures.echo_ceiling(run)
                mean = figs.get("A", {}).get("messages", {}).get("mean_bytes", 1300)
                out["commit_ceiling"] = figures.commit_ceiling_sqlite(
                    run.folder("b-commit"), mode.b_commit_seconds, mode.reps, mean
                )
                run.say(
                    f"B: echo 1/8 connections {out['echo']['1_connection']['msg_per_s']['median']}/"
                    f"{out['echo']['8_connections']['msg_per_s']['median']} msg/s; commit ceiling "
                    f"{out['commit_ceiling']['commits_per_s']['median']} commits/s"
                )
                return out

            figs["B"] = _measure("B", b, run, failures)
        http_ceiling: dict[str, Any] | None = None
        if "C" in only or "F" in only:
            try:
                http_ceiling = figures.http_ceiling(run)
            except BenchmarkError as exc:
                run.say(f"HTTP ceiling failed: {exc}")
        if "C" in only:

            def c() -> dict[str, Any]:
                out = figures.figure_c(run)
                out["http_ceiling"] = http_ceiling
                return out

            figs["C"] = _measure("C", c, run, failures)
        if "D" in only:
            figs["D"] = _measure("D", lambda: figures.figure_d(run), run, failures)
        if "E" in only:
            figs["E"] = _measure("E", lambda: figures.figure_e(run), run, failures)
        if "F" in only:
            pg = mode.f_default if with_pg is None else with_pg
            if pg:

                def f() -> dict[str, Any]:
                    out = figures.figure_f(run)
                    if "B" in out and "B" in figs and "echo" in figs["B"]:
                        out["B"]["echo"] = figs["B"][
                            "echo"
                        ]  # the socket ceiling does not depend on the store
                    if "C" in out:
                        out["C"]["http_ceiling"] = http_ceiling
                    return out

                figs["F"] = _measure("F", f, run, failures)
            else:
                figs["F"] = {"status": f"skipped in {mode_name} mode (run with --pg to include PostgreSQL)"}
    finally:
        bar.close()
        _figure_done = _no_progress
        run.cleanup()
    finished = report.now()
    results["finished_at"] = finished.isoformat()
    results["load_average_at_end"] = os.getloadavg()
    results["wall_seconds"] = round((finished - started).total_seconds(), 1)
    results["failures"] = failures
    rows = report.table_rows(results)
    results["table"] = rows
    path = report.results_path(mode_name, started, out_dir)
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    print()
    print(
        f"hms-ach benchmarks, {mode_name} mode: {results['machine'].get('cores')} cores, "
        f"Python {results['machine'].get('python')}, {results['machine'].get('platform')}"
    )
    report.print_table(rows)
    print()
    print(f"results: {path}")
    print(
        f"wall time: {results['wall_seconds']:.1f} s"
        + (f"; FAILED: {', '.join(failures)}" if failures else "")
    )
    return 1 if failures else 0


def render_readme(source: str | None, write: bool) -> int:
    path = Path(source) if source else (report.latest_results() or report.latest_results(mode=None))
    if path is None or not path.exists():
        print("no results file found; run python -m benchmarks first", file=sys.stderr)
        return 2
    results = orjson.loads(path.read_bytes())
    try:
        shown = path.resolve().relative_to(REPO)
    except ValueError:
        shown = path
    body = report.readme_table(results, str(shown))
    if write:
        report.write_readme_section(REPO / "README.md", body)
        print(f"README.md: performance table written from {shown}")
    else:
        sys.stdout.write(body)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the short run (under two minutes)")
    size.add_argument("--smoke", action="store_true", help="a tiny run that only checks the code works")
    p.add_argument("--only", help=f"comma-separated figures to run (default all: {','.join(ALL_FIGURES)})")
    pg = p.add_mutually_exclusive_group()
    pg.add_argument("--pg", dest="pg", action="store_true", default=None, help="include F (PostgreSQL)")
    pg.add_argument("--no-pg", dest="pg", action="store_false", help="skip F (PostgreSQL)")
    p.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="folder for the results JSON")
    p.add_argument("--keep-tmp", action="store_true", help="keep the scratch folder (databases, engine logs)")
    p.add_argument(
        "--readme",
        nargs="?",
        const="",
        default=None,
        metavar="RESULTS.json",
        help="print the README performance table from a results file (default: newest full run)",
    )
    p.add_argument("--write-readme", action="store_true", help="with --readme: write it into README.md")
    p.add_argument(
        "--sizes",
        help="comma-separated Practitioner counts the store of figure C (and F) is grown to, in turn "
        "(default: the mode's, e.g. 100000,1000000 in the full run)",
    )
    p.add_argument(
        "--map-workers",
        default="0",
        metavar="N[,N...]",
        help="engine.map_workers of figure B's engine (SQLite), comma-separated values run back to back "
        "(default 0: parse and map in the engine process); F uses the first value",
    )
    args = p.parse_args(argv)
    if args.readme is not None:
        return render_readme(args.readme or None, args.write_readme)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    only = (
        set(ALL_FIGURES) if not args.only else {x.strip().upper() for x in args.only.split(",") if x.strip()}
    )
    unknown = only - set(ALL_FIGURES)
    if unknown:
        p.error(f"unknown figures {sorted(unknown)}; known: {', '.join(ALL_FIGURES)}")
    try:
        sizes = tuple(int(x) for x in args.sizes.split(",") if x.strip()) if args.sizes else None
    except ValueError:
        p.error(f"--sizes takes comma-separated whole numbers, got {args.sizes!r}")
    if sizes is not None and (not sizes or min(sizes) < 20 or list(sizes) != sorted(sizes)):
        p.error(f"--sizes takes growing counts of at least 20, got {args.sizes!r}")
    try:
        map_workers = [int(x) for x in args.map_workers.split(",") if x.strip()]
    except ValueError:
        p.error(f"--map-workers takes comma-separated whole numbers, not {args.map_workers!r}")
    if not map_workers or min(map_workers) < 0:
        p.error("--map-workers takes one or more values of 0 or more")
    return run_suite(mode, only, args.pg, args.out, args.keep_tmp, sizes, map_workers)


if __name__ == "__main__":
    sys.exit(main())

"""The benchmark suite runs and writes a valid results file. No timing is asserted here: the
numbers belong to benchmarks/results/, not to the test suite."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.data import ROSTER_COLUMNS, AdtStream, a01_messages, is_valid_npi, nth_npi, roster_csv
from benchmarks.stats import percentile, summary

ROOT = Path(__file__).resolve().parents[2]


def test_generated_npis_pass_the_luhn_check_with_the_80840_prefix() -> None:
    assert is_valid_npi("1234567893")  # the CMS example
    assert not is_valid_npi("1234567890")
    npis = [nth_npi(i) for i in range(5000)]
    assert len(set(npis)) == 5000
    assert all(is_valid_npi(n) and n[0] in "12" for n in npis)


def test_the_generator_is_seeded_and_varied() -> None:
    assert a01_messages(5, seed=3) == a01_messages(5, seed=3)
    stream = AdtStream(1, "T")
    messages = stream.messages(300)
    assert len(set(messages)) == 300
    assert {"A01", "A08", "A03"} <= set(stream.counts)
    control_ids = [m.split(b"\r")[0].split(b"|")[9] for m in messages]
    assert len(set(control_ids)) == 300


def test_the_roster_is_seeded_with_unique_employees_and_valid_npis() -> None:
    data = roster_csv(2000, seed=5)
    assert data == roster_csv(2000, seed=5)
    rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    assert len(rows) == 2000 and tuple(rows[0]) == ROSTER_COLUMNS
    assert len({r["employee_id"] for r in rows}) == 2000 and len({r["npi"] for r in rows}) == 2000
    assert all(is_valid_npi(r["npi"]) for r in rows)
    assert ROSTER_COLUMNS == tuple(
        (ROOT / "samples" / "csv" / "staff_roster.csv").read_text().splitlines()[0].split(",")
    )


def test_stats_helpers() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert summary([3.0, 1.0, 2.0])["median"] == 2.0


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--smoke", "--no-pg", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*-smoke.json"))
    assert len(files) == 1, proc.stdout
    return files[0]


def test_smoke_run_writes_valid_results(smoke_results: Path) -> None:
    results = json.loads(smoke_results.read_text())
    assert results["mode"] == "smoke"
    assert results["machine"]["cores"] >= 1 and results["machine"]["python"]
    assert results["failures"] == []
    figures = results["figures"]
    assert set(figures) == {"A", "B", "C", "D", "E", "F"}
    assert figures["A"]["evaluate_msg_per_s"]["median"] > 0
    assert figures["B"]["1_connection"]["msg_per_s"]["samples"]
    assert set(figures["B"]["1_connection"]["ack_codes"]) <= {"AA", "CA"}
    assert figures["C"]["sizes"]
    for entry in figures["C"]["sizes"].values():  # each query with auth + access audit on, beside off
        for kind in ("read", "family", "encounter"):
            assert entry[kind + "_secured"]["req_per_s"]["median"] > 0
            assert "problem" not in entry[kind + "_secured"], entry[kind + "_secured"]["problem"]
            assert entry[kind + "_secured_ratio"] is not None
    d = figures["D"]
    assert (
        d["rows"] > 0
        and d["poll_rows_per_s"]["median"] > 0
        and len(d["polls"]) == results["settings"]["reps"]
    )
    assert d["csv_rows_per_s"]["median"] > 0 and d["download_mb_per_s"]["median"] > 0
    assert [r for r in results["table"] if r["figure"] == "D" and r["ratio"] is not None]
    assert figures["E"]["peak_rss_kb"] > 0
    assert results["table"] and all(
        {"figure", "value", "ceiling", "ratio"} <= set(r) for r in results["table"]
    )


def test_readme_table_renders_from_results(smoke_results: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--readme", str(smoke_results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| figure | measure | value | ceiling / peer (same run) | ratio |" in proc.stdout
    assert "cores" in proc.stdout

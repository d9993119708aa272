"""docs/metrics.md and the Grafana dashboard stay true: every metric they name is one the engine
serves, and every metric the engine defines is documented."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import hms_ach.app.metrics  # noqa: F401 - registers the engine's collector
import hms_ach.core.metrics  # noqa: F401 - defines the event metrics

ROOT = Path(__file__).resolve().parents[3]
SUFFIXES = ("_bucket", "_count", "_sum", "_created", "_total")


def base(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def served() -> set[str]:
    names = {m.name for m in REGISTRY.collect() if m.name.startswith("hms_ach_")}
    source = (ROOT / "hms_ach" / "app" / "metrics.py").read_text()  # the states: named in the collector
    names |= {base(n) for n in re.findall(r'"(hms_ach_[a-z_]+)"', source)}
    return {base(n) for n in names}


def test_every_documented_metric_is_served_and_every_served_one_documented() -> None:
    documented = {
        base(n) for n in re.findall(r"`(hms_ach_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text())
    }
    assert documented == served()


def test_the_dashboard_queries_only_served_metrics() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {base(n) for e in exprs for n in re.findall(r"hms_ach_[a-z_]+", e)}
    assert used and used <= served()

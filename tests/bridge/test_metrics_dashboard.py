"""The shipped Grafana dashboard speaks only of metrics the bridge exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bridge.metrics import Metrics

DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "edrone-bridge.json"


def test_dashboard_queries_exported_metrics():
    """Every metric a panel queries exists in the registry (a renamed metric breaks this
    test, not a dashboard in production)."""
    exported = {
        sample.name for family in Metrics().registry.collect() for sample in family.samples
    } | {family.name for family in Metrics().registry.collect()}
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queried = {
        name
        for panel in panels
        for target in panel["targets"]
        for name in re.findall(r"edrone_bridge_[a-z_]+", target["expr"])
    }
    assert queried, "the dashboard queries nothing"
    # Histogram series carry _bucket/_sum/_count and counters _total in the exposition.
    missing = {
        name
        for name in queried
        if name not in exported
        and not any(
            name == f"{base}{suffix}"
            for base in exported
            for suffix in ("_bucket", "_sum", "_count", "_total")
        )
    }
    assert missing == set()

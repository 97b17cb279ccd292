"""What each part of the deployment costs per webhook under the end-to-end load, from the CPU
its processes used over each measured run (``deployment.CpuMeter``: CPU seconds over the webhooks
sent, so idle time and background work in the span count too), and what the same work needs on
more cores."""

from __future__ import annotations

import os

from benchmarks.report import Row, median

# The parts whose work grows with the webhooks; the load generator and the trace forwarder with
# fake-edrone (busy with their own trickle of shop events) run beside them.
PATH_PARTS = ("ingress", "broker", "subscriptions", "postgres")


def capacity_row(samples: list[dict[str, float]], rate_per_s: float, label: str) -> Row:
    """``samples``: per run, µs of CPU per webhook of each group, and ``machine_cores``."""
    path = [sum(s[part] for part in PATH_PARTS) for s in samples]
    total = median(path)
    cores = os.cpu_count() or 1
    machine = median([s["machine_cores"] for s in samples])
    names = [
        name for name in (samples[0] if samples else {}) if name not in ("machine", "machine_cores")
    ]
    parts = ", ".join(f"{name} {median([s[name] for s in samples]):.0f}" for name in names)
    note = (
        f"at {rate_per_s:,.0f} webhooks/s, us of CPU per webhook: {parts}; the machine was busy"
        f" {machine:.2f} of {cores} cores. The webhook's path (ingress, broker, consumer,"
        f" PostgreSQL) takes {total:.0f} us: {cores} cores carry at most"
        f" {cores / total * 1e6:,.0f}/s of it, 4 cores {4 / total * 1e6:,.0f}/s; at this rate"
        f" it keeps {rate_per_s * total / 1e6 / cores:.0%} of {cores} cores busy, of 4"
        f" {rate_per_s * total / 1e6 / 4:.0%}"
    )
    return Row(f"end to end: CPU per webhook, {label}", "us", path, note=note)

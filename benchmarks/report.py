"""Figures, their medians and ratios, the pass/fail verdict, the printed table and its JSON."""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass
class Target:
    """What a figure must reach: bounds on its ratio to its baseline (``min_ratio`` /
    ``max_ratio``), or on the value itself (``min_value`` / ``max_value``)."""

    text: str
    min_ratio: float | None = None
    max_ratio: float | None = None
    min_value: float | None = None
    max_value: float | None = None

    def passed(self, value: float | None, ratio: float | None) -> bool | None:
        if value is None or (value != value):  # NaN: nothing was measured
            return False
        checks = []
        if self.min_ratio is not None:
            checks.append(ratio is not None and ratio >= self.min_ratio)
        if self.max_ratio is not None:
            checks.append(ratio is not None and ratio <= self.max_ratio)
        if self.min_value is not None:
            checks.append(value >= self.min_value)
        if self.max_value is not None:
            checks.append(value <= self.max_value)
        return all(checks) if checks else None


@dataclass
class Row:
    """One line of the table: a figure (the median of its repeats) beside its baseline.

    ``ratio`` is the median of the per-repeat ratios: each repeat's figure and baseline ran
    back to back, so a ratio is steadier than either figure on a noisy machine."""

    figure: str
    unit: str
    samples: list[float]
    baseline: str = ""
    baseline_samples: list[float] = field(default_factory=list)
    target: Target | None = None
    note: str = ""
    # "max" for a figure that must hold in every repeat (the worst one counts).
    aggregate: str = "median"

    @property
    def value(self) -> float:
        if self.aggregate == "max":
            return max(self.samples, default=math.nan)
        return median(self.samples)

    @property
    def baseline_value(self) -> float | None:
        return median(self.baseline_samples) if self.baseline_samples else None

    @property
    def ratio(self) -> float | None:
        if not self.baseline_samples:
            return None
        pairs = [
            a / b for a, b in zip(self.samples, self.baseline_samples, strict=False) if b and a == a
        ]
        return median(pairs) if pairs else None

    @property
    def passed(self) -> bool | None:
        return self.target.passed(self.value, self.ratio) if self.target else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            value=_finite(self.value),
            baseline_value=_finite(self.baseline_value),
            ratio=_finite(self.ratio),
            passed=self.passed,
            target=self.target.text if self.target else None,
        )
        return data


def median(values: Sequence[float]) -> float:
    finite = [v for v in values if v == v]
    return statistics.median(finite) if finite else math.nan


def cores_note(
    run_name: str, samples: Sequence[dict[str, float]], rates: Sequence[float], main: str, unit: str
) -> str:
    """One run's cores per process group (medians over repeats), and the CPU of its main group
    per item: "ingress run: server 1.10, broker 0.60 cores (server 280 us/message)"."""
    cores = {name: median([s[name] for s in samples]) for name in samples[0]}
    rate = median(rates)
    per_item = cores[main] / rate * 1e6 if rate else math.nan
    used = ", ".join(f"{name} {value:.2f}" for name, value in cores.items())
    return f"{run_name} run: {used} cores ({main} {per_item:.0f} us/{unit})"


def _finite(value: float | None) -> float | None:
    return None if value is None or value != value else round(value, 4)


def _number(value: float | None, unit: str = "") -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def _verdict(passed: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "info"}[passed]


def render(rows: Sequence[Row]) -> str:
    """The table: figure | value (median) | baseline (median) | ratio | target | verdict."""
    header = ("figure", "value", "baseline", "ratio", "target", "result")
    lines = [
        (
            row.figure,
            _number(row.value, row.unit) + (" (max)" if row.aggregate == "max" else ""),
            f"{row.baseline}: {_number(row.baseline_value, row.unit)}" if row.baseline else "",
            f"{row.ratio:.2f}" if row.ratio is not None else "",
            row.target.text if row.target else "",
            _verdict(row.passed),
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [
        " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "-+-".join("-" * w for w in widths),
    ]
    out += [" | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    notes = [f"  - {row.figure}: {row.note}" for row in rows if row.note]
    if notes:
        out += ["", "notes:", *notes]
    return "\n".join(out)


def machine() -> dict[str, Any]:
    """What the run ran on: the figures mean little without it."""
    import os

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            info["memory_mb"] = int(meminfo.readline().split()[1]) // 1024
    except OSError:
        pass
    return info


def write_json(path: Path, rows: Sequence[Row], config: dict[str, Any], elapsed_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed_s, 1),
        "machine": machine(),
        "config": config,
        "rows": [row.to_json() for row in rows],
        "passed": all(row.passed is not False for row in rows),
    }
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")

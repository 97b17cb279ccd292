"""``python -m benchmarks``: run the benchmarks against the local RabbitMQ and PostgreSQL, print
the table of medians and ratios, and write the same as JSON."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import backfill, endtoend, ingress, subscriptions, traces
from benchmarks.report import Row, render, write_json
from benchmarks.worker import quiet

BENCHMARKS = ("ingress", "subscriptions", "traces", "endtoend", "backfill")
RESULTS = Path(__file__).resolve().parent / "results"
# Small sizes for trying a change on a busy machine; the defaults are the sizes.
QUICK = {
    "ingress_requests": 2_000,
    "drain_events": 2_000,
    "naive_events": 500,
    "traces": 600,
    "limited_s": 4.0,
    "latency_s": 3.0,
    "soak_s": 10.0,
    "backfill_rows": 20_000,
    "reconcile_rows": "10000,50000",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--only", default=",".join(BENCHMARKS), help=f"comma-separated, of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement (3)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument(
        "--ingress-requests", type=int, default=20_000, help="webhooks per ingress run (20000)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="HTTP connections (64)")
    parser.add_argument(
        "--ingress-workers",
        type=int,
        default=2,
        help="EDRONE_BRIDGE_INGRESS_WORKERS of the measured ingress (2)",
    )
    parser.add_argument("--drain-events", type=int, default=50_000, help="preloaded (50000)")
    parser.add_argument(
        "--naive-events", type=int, default=3_000, help="the naive consumer's sample (3000)"
    )
    parser.add_argument("--traces", type=int, default=3_000, help="shop events per run (3000)")
    parser.add_argument(
        "--limited-s", type=float, default=6.0, help="seconds of each 100/s run (6)"
    )
    parser.add_argument(
        "--latency-s", type=float, default=8.0, help="seconds of each latency run (8)"
    )
    parser.add_argument(
        "--soak-s", type=float, default=90.0, help="seconds of the memory soak (90; 300 = 5 min)"
    )
    parser.add_argument(
        "--backfill-rows", type=int, default=1_000_000, help="rows backfilled (1000000)"
    )
    parser.add_argument(
        "--backfill-repeats",
        type=int,
        default=1,
        help="runs of the backfill and reconcile measurements (1: one takes about 40 minutes)",
    )
    parser.add_argument(
        "--reconcile-rows",
        default="100000,1000000",
        help="comma-separated table sizes reconciled (100000,1000000)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="end-to-end webhooks/s (default: half the ingress maximum measured in this run)",
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "latest.json", help="where to write the results"
    )
    parser.add_argument(
        "--log-dir", type=Path, default=RESULTS / "logs", help="the child processes' output"
    )
    return parser


async def run(args: argparse.Namespace) -> list[Row]:
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    rows: list[Row] = []
    rate = args.rate
    run_started = time.perf_counter()
    for name in chosen:
        started = time.perf_counter()
        done = len(rows)
        print(f"== {name}", file=sys.stderr, flush=True)
        if name == "ingress":
            found, figures = await ingress.run(
                repeats=args.repeats,
                requests=args.ingress_requests,
                concurrency=args.concurrency,
                workers=args.ingress_workers,
                log_dir=args.log_dir,
            )
            rows += found
            if rate is None and figures.max_rate:
                rate = figures.max_rate / 2
        elif name == "subscriptions":
            rows += await subscriptions.run(
                repeats=args.repeats,
                events=args.drain_events,
                naive_events=args.naive_events,
                log_dir=args.log_dir,
            )
        elif name == "traces":
            rows += await traces.run(
                repeats=args.repeats,
                traces=args.traces,
                limited_s=args.limited_s,
                log_dir=args.log_dir,
            )
        elif name == "backfill":
            rows += await backfill.run(
                repeats=args.backfill_repeats,
                rows=args.backfill_rows,
                reconcile_rows=[int(n) for n in args.reconcile_rows.split(",") if n.strip()],
                log_dir=args.log_dir,
            )
        else:
            rows += await endtoend.run(
                repeats=args.repeats,
                rate_per_s=rate or 500.0,
                latency_s=args.latency_s,
                soak_s=args.soak_s,
                workers=args.ingress_workers,
                log_dir=args.log_dir,
            )
        print(f"   {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        # Each part's figures as soon as it ends, and the file so far: a long run stopped
        # midway keeps what it measured.
        print(render(rows[done:]), flush=True)
        write_json(args.json, rows, config(args), time.perf_counter() - run_started)
    return rows


def config(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == build_parser().get_default(key):
                setattr(args, key, value)
    quiet()
    started = time.perf_counter()
    rows = asyncio.run(run(args))
    elapsed = time.perf_counter() - started
    print(render(rows))
    # run() wrote the file as each part ended, the last time with every row.
    print(f"\n{elapsed:.0f} s; results in {args.json}")
    return 0 if all(row.passed is not False for row in rows) else 1

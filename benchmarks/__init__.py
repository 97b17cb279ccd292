"""Benchmarks: every path of the bridge beside the raw ceiling of the same machine, measured in
the same run (``python -m benchmarks``, or ``make bench``)."""

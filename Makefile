# Benchmarks run against the local RabbitMQ and PostgreSQL (the tests' services); see
# docs/benchmarks.md.
PYTHON ?= .venv/bin/python
BENCH_ARGS ?=

.PHONY: test bench bench-quick soak lowest

test:
	.venv/bin/pytest

# Every benchmark, the issue's sizes, 3 repeats (the backfill and reconcile 1: --backfill-repeats):
# about 50 minutes on the 2-core machine, the 1,000,000-row backfill about 40 of them;
# BENCH_ARGS="--only ingress,subscriptions,traces,endtoend" leaves it out: 8 minutes. Each part's
# figures print as it ends.
bench:
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

# Small sizes, for trying a change on a busy machine (about 2 minutes).
bench-quick:
	$(PYTHON) -m benchmarks --quick $(BENCH_ARGS)

# The 5-minute memory soak (with the ingress run first, for its maximum rate): about 7 minutes.
soak:
	$(PYTHON) -m benchmarks --only ingress,endtoend --soak-s 300 $(BENCH_ARGS)

# The suite (without the long fault and convergence tests) on the lowest versions that
# pyproject.toml's floors admit (requirements/lowest.txt), in a venv of its own: the last run of
# .ci/run, alone (about 4 minutes).
lowest:
	rm -rf .ci/venv-lowest && python3 -m venv .ci/venv-lowest
	.ci/venv-lowest/bin/pip install -q -c requirements/lowest.txt -e '.[test]'
	.ci/venv-lowest/bin/pytest -q -p no:cacheprovider --ignore=tests/faults --ignore=tests/test_convergence.py

# Development shortcuts. `make bench` regenerates every table in benchmarks/README.md.
PYTHON ?= python
# One torch thread per benchmark: on the shared, loaded 2-core machine it is faster and far steadier
# than two threads stalling on each other. On an idle machine run `make bench BENCH_ARGS=`.
BENCH_ARGS ?= --threads 1

.PHONY: bench bench-quick

bench:
	$(PYTHON) -m benchmarks $(BENCH_ARGS)

bench-quick:
	$(PYTHON) -m benchmarks --quick $(BENCH_ARGS)

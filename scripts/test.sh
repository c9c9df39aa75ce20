#!/usr/bin/env bash
# Runs every check and test of the project: formatting, lints, the Rust tests, and the
# JavaScript compatibility tests with unchanged Logux clients against the release binary,
# and the Redux example in headless Chromium (Debian's chromium, installed when missing).
# Needs only the Rust toolchain and Node.js/npm; npm packages come from the lockfile.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
  echo "== installing promtool (Debian package prometheus) for the metrics format test"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "promtool is missing and apt-get is not available: install Prometheus' promtool" >&2
    exit 1
  fi
fi

if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM_BIN:-}" ]; then
  echo "== installing chromium (Debian package) for the browser tests"
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
  else
    echo "chromium is missing and apt-get is not available: install Chromium or set CHROMIUM_BIN" >&2
    exit 1
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test
echo "== cargo build --release"
cargo build --release
echo "== compat tests (npm ci, node --test)"
(
  cd compat-tests
  npm ci --no-audit --no-fund --loglevel=error
  FERRY_BIN="$PWD/../target/release/ferry" npm test
)
echo "== browser tests (headless Chromium, Redux example over ws and long-poll)"
(
  cd examples/redux-chat
  npm ci --no-audit --no-fund --loglevel=error
  npm run --silent build
)
(
  cd browser-tests
  PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error
  FERRY_BIN="$PWD/../target/release/ferry" timeout 600 npm test
)
echo "== fuzz smoke run (cargo-fuzz, ${FUZZ_SECONDS:-20} s per target)"
FUZZ_SANITIZER=${FUZZ_SANITIZER:-none} bash scripts/fuzz-smoke.sh
echo "== all tests passed"

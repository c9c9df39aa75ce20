#!/usr/bin/env bash
# Runs every check and test of the project: formatting, lints, the Rust tests, and the
# JavaScript compatibility tests with unchanged Logux clients against the release binary,
# and the Redux example in headless Chromium (Debian's chromium, installed when missing).
# Needs only the Rust toolchain and Node.js/npm; npm packages come from the lockfile.
set -euo pipefail
cd "$(dirname "$0")/.."

# Installs Debian package $1 (for what $2 says) with apt-get, or explains what is missing.
apt_install() {
  echo "== installing $1 (Debian package) for $2"
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "$1 is missing and apt-get is not available: install it for $2" >&2
    exit 1
  fi
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$1" >/dev/null
}

command -v promtool >/dev/null 2>&1 || apt_install prometheus "promtool, the metrics format test"
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || apt_install nats-server "the cluster tests (real NATS JetStream)"
if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM_BIN:-}" ]; then
  apt_install chromium "the browser tests (or set CHROMIUM_BIN)"
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

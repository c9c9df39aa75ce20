#!/usr/bin/env bash
# Fuzz smoke run: every cargo-fuzz target of fuzz/ for FUZZ_SECONDS seconds (default 20) from
# the seed corpus (fuzz/corpus/<target>, generated from the golden transcripts by
# fuzz/seeds.sh). Fails on any crash, panic, failed invariant, timeout or out-of-memory;
# the input is left in fuzz/artifacts/<target>/ (reproduce with
# `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>`).
#
# Only a stable toolchain is needed: RUSTC_BOOTSTRAP=1 lets it accept the sanitizer flags
# cargo-fuzz passes. Environment:
#   FUZZ_SECONDS    seconds per target (default 20)
#   FUZZ_TARGETS    space-separated targets (default: all of them)
#   FUZZ_SANITIZER  address (default) or none (faster builds and runs)
# New inputs libFuzzer finds go to a temporary directory, so the committed corpus stays as is.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds=${FUZZ_SECONDS:-20}
targets=${FUZZ_TARGETS:-"message_parse session"}
sanitizer=${FUZZ_SANITIZER:-address}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failed=""
for target in $targets; do
  mkdir -p "$work/$target"
  echo "== fuzz $target for ${seconds}s (sanitizer: $sanitizer)"
  # --debug-assertions: integer overflow and debug_assert! count as crashes too.
  if ! cargo fuzz run --fuzz-dir "$root/fuzz" --release --debug-assertions \
    --sanitizer "$sanitizer" "$target" "$work/$target" "$root/fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -dict="$root/fuzz/dict/protocol.dict" -print_final_stats=1 2>&1 |
    tee "$work/$target.log" | grep -E '^(INFO: seed corpus|Done |stat::number_of_executed_units|stat::peak_rss_mb|==[0-9]+==|thread .* panicked|SUMMARY)' ; then
    :
  fi
  if grep -qE 'panicked|ERROR: libFuzzer|SUMMARY: |Test unit written to' "$work/$target.log" ||
    ! grep -q '^Done ' "$work/$target.log"; then
    echo "!! $target failed; the end of its log:"
    tail -n 60 "$work/$target.log"
    failed="$failed $target"
  fi
done

if [ -n "$failed" ]; then
  echo "== fuzz smoke FAILED:$failed"
  exit 1
fi
echo "== fuzz smoke passed: $targets"

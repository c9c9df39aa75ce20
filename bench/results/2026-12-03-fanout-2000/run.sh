#!/usr/bin/env bash
# usage: run.sh BINARY LABEL
set -u
REPO=${REPO:-$(cd "$(dirname "$0")/../../.." && pwd)}
BIN=$1; LABEL=$2; OUT=${OUT:-.}
D=$(mktemp -d)
$BIN serve --config $REPO/bench/ferry-bench.toml --data-dir "$D" --listen 127.0.0.1:31340 >$OUT/$LABEL.server.log 2>&1 &
PID=$!
for i in $(seq 50); do curl -s 127.0.0.1:31340/health >/dev/null && break; sleep 0.2; done
$REPO/target/release/ferry-bench fanout --url ws://127.0.0.1:31340/ --server-pid $PID --clients 2000 --actions 1 --timeout-s 120 > $OUT/$LABEL.json 2>$OUT/$LABEL.err
echo "exit $?"
kill $PID; wait $PID 2>/dev/null
rm -rf "$D"

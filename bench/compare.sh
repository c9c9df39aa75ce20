#!/usr/bin/env bash
# Measures Ferry and @logux/server 0.14 side by side on this machine: storm at 1,000 / 5,000 /
# 15,000 clients (20 actions each), fanout at 50 clients, idle connections, acks (100 clients
# without fan-out) and backlog (one 200,000-action sync with 20 pingers). Every cell
# runs on a freshly started server (and an empty data directory for Ferry). Results go to
# bench/results/<date>/*.json; a summary table is printed at the end.
#
#   bash bench/compare.sh                 # everything
#   STORM_SIZES="1000" bash bench/compare.sh
#
# Loopback only; every server this script starts is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

STORM_SIZES=${STORM_SIZES:-"1000 5000 15000"}
STORM_ACTIONS=${STORM_ACTIONS:-20}
FANOUT_CLIENTS=${FANOUT_CLIENTS:-50}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
ACKS_CLIENTS=${ACKS_CLIENTS:-100}
BACKLOG_ACTIONS=${BACKLOG_ACTIONS:-200000}
FERRY_PORT=31340
REF_PORT=31338
OUT=${OUT:-"bench/results/$(date +%Y-%m-%d)"}
mkdir -p "$OUT"

cargo build --release --bin ferry --bin ferry-bench
(cd bench/reference && npm ci --no-audit --no-fund --loglevel=error)
BENCH=target/release/ferry-bench

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server on port $1 did not start" >&2
  return 1
}

start_ferry() {
  rm -rf /tmp/ferry-compare-data
  target/release/ferry serve --config bench/ferry-bench.toml --listen 127.0.0.1:$FERRY_PORT \
    --data-dir /tmp/ferry-compare-data > "$OUT/ferry-server.log" 2>&1 &
  SERVER_PID=$!
  wait_port $FERRY_PORT
}

start_reference() {
  (cd bench/reference && PORT=$REF_PORT exec node server.mjs) > "$OUT/reference-server.log" 2>&1 &
  SERVER_PID=$!
  wait_port $REF_PORT
  sleep 0.5
}

run_cell() { # name server scenario args...
  local name=$1 server=$2 scenario=$3
  shift 3
  local port=$FERRY_PORT
  if [ "$server" = reference ]; then start_reference; port=$REF_PORT; else start_ferry; fi
  echo "== $name" >&2
  $BENCH "$scenario" --url "ws://127.0.0.1:$port/" --server-pid "$SERVER_PID" "$@" \
    > "$OUT/$name.json" 2> "$OUT/$name.err" || echo "   (exit $?; see $OUT/$name.err)" >&2
  stop_server
}

for n in $STORM_SIZES; do
  for server in ferry reference; do
    run_cell "storm-$n-$server" $server storm --clients "$n" --actions "$STORM_ACTIONS" --timeout-s 180
  done
done
for server in ferry reference; do
  run_cell "fanout-$FANOUT_CLIENTS-$server" $server fanout --clients "$FANOUT_CLIENTS" --actions 200 --timeout-s 120
  run_cell "idle-$IDLE_CLIENTS-$server" $server idle --clients "$IDLE_CLIENTS" --hold-s 5 --timeout-s 120
  run_cell "acks-$ACKS_CLIENTS-$server" $server acks --clients "$ACKS_CLIENTS" --actions 1000 --timeout-s 120
  run_cell "backlog-$BACKLOG_ACTIONS-$server" $server backlog --actions "$BACKLOG_ACTIONS" --timeout-s 180
done

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            return json.load(f)
    except Exception:
        return None
print("| scenario | server | result |")
print("|---|---|---|")
for name in sorted(os.listdir(out)):
    if not name.endswith(".json"):
        continue
    d = load(name[:-5])
    if d is None:
        continue
    if d.get("scenario") == "storm":
        r = d["rounds"][0]
        ping = d["pinger_rtt_ms"]
        text = (f"all synchronized {d['total_ms']/1000:.2f} s, client p50/p99 "
                f"{d['client_ms']['p50']/1000:.2f}/{d['client_ms']['p99']/1000:.2f} s, lost {d['lost']}, "
                f"duplicated {d['duplicated']['total']}, reconnects {d['reconnects']}, errors {d['errors']}, "
                f"ping p99 storm/disconnect {ping['storm']['p99']}/{ping['disconnect']['p99']} ms, "
                f"server peak RSS {d['server']['peak_rss_bytes']/1e6:.0f} MB, server CPU {d['server']['cpu_s']} s "
                f"(storm: {r['server_cpu_s']['storm']} s, "
                f"{r['server_cpu_s']['storm_per']['1000_clients']} s per 1,000 clients, "
                f"{r['server_cpu_s']['storm_per']['10000_actions']} s per 10,000 actions), "
                f"generator CPU {d['generator']['cpu_user_s'] + d['generator']['cpu_sys_s']:.1f} s "
                f"({d['generator']['cpu_pct_of_wall']:.0f}% of wall)")
    elif d.get("scenario") == "fanout":
        l = d["latency_ms"]
        text = (f"{d['deliveries_per_s']:.0f} deliveries/s, {d['actions_per_s']:.0f} actions/s, latency p50/p99/p999 "
                f"{l['p50']}/{l['p99']}/{l['p999']} ms, missing {d['missing_deliveries']}, "
                f"generator CPU {d['generator']['cpu_pct_of_wall']:.0f}%")
    elif d.get("scenario") == "acks":
        l = d["synced_latency_ms"]
        text = (f"{d['synced_per_s'] or 0:.0f} acknowledged actions/s, send-to-synced p50/p99 "
                f"{l['p50']}/{l['p99']} ms, not synced {d['not_synced']}, duplicated {d['duplicated']['total']}, "
                f"server CPU {(d['server'] or {}).get('cpu_s_sending')} s, "
                f"generator CPU {d['generator']['phase_cpu_pct_of_wall']:.0f}%")
    elif d.get("scenario") == "backlog":
        p = d["pinger_rtt_ms"]["backlog"]
        text = (f"{d['processed_actions_per_s'] or 0:.0f} processed actions/s, synced after {d['synced_ms']} ms, "
                f"last processed after {d['processed_ms']} ms, bystander ping p50/p99/max "
                f"{p['p50']}/{p['p99']}/{p['max']} ms, server CPU {(d['server'] or {}).get('cpu_s_backlog')} s")
    elif d.get("scenario") == "idle":
        s = d["server"]
        text = f"{d['connected']} connected, {s['bytes_per_connection']:.0f} bytes per connection"
    else:
        text = "?"
    print(f"| {name[:-5]} | {'ferry' if 'ferry' in name else 'reference'} | {text} |")
PY

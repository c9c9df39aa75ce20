#!/usr/bin/env bash
# Cluster-mode figures with ferry-bench: a 3-node nats-server JetStream cluster and Ferry
# release nodes on loopback, against one embedded (no [cluster]) node. See bench/README.md,
# "Cluster mode".
#
#   cargo build --release --bin ferry --bin ferry-bench
#   OUT=bench/results/2026-12-03-cluster REPS=3 bash bench/cluster.sh [CASE...]
#
# CASE is any of: embedded cluster1 cluster2 rate-embedded rate acks-embedded acks-cluster
# acks-cluster2 failover idle (default: all, in that order). Each case runs REPS times (default 3) on fresh Ferry data
# directories, and a cluster case on a fresh stream; every JSON summary goes to
# $OUT/<case>-<rep>.json. Every process this script starts is stopped by pid on exit.
#
# Environment: OUT, REPS, NATS_SERVER_BIN (default /usr/sbin/nats-server), FERRY, BENCH
# (the binaries, default target/release/...), PORT_BASE (default 29100; ports
# PORT_BASE..PORT_BASE+19 must be free, below the ephemeral range), RATE (case `rate`,
# default 10 actions/s per client), KILL_AFTER_S (case `failover`, default 4).
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/2026-12-03-cluster}
REPS=${REPS:-3}
NATS=${NATS_SERVER_BIN:-/usr/sbin/nats-server}
FERRY=${FERRY:-target/release/ferry}
BENCH=${BENCH:-target/release/ferry-bench}
PORT_BASE=${PORT_BASE:-29100}
RATE=${RATE:-10}
KILL_AFTER_S=${KILL_AFTER_S:-4}
CASES=("$@")
if [ ${#CASES[@]} -eq 0 ]; then
  CASES=(embedded cluster1 cluster2 rate-embedded rate acks-embedded acks-cluster acks-cluster2
    failover idle)
fi

mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/ferry-cluster-bench.XXXXXX)
NATS_PIDS=()
FERRY_PIDS=()

stop_pids() {
  local pid
  for pid in "$@"; do
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  for pid in "$@"; do
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
}

cleanup() {
  stop_pids "${FERRY_PIDS[@]}" "${NATS_PIDS[@]}"
  # Keep the server logs (Ferry's are appended to over every start of a node).
  mkdir -p "$OUT/logs"
  cp "$WORK"/ferry-*.log "$WORK"/nats/n*.log "$OUT/logs/" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for p in $(seq "$PORT_BASE" $((PORT_BASE + 19))); do
  if ss -ltnH "sport = :$p" | grep -q .; then
    echo "port $p is taken; set PORT_BASE" >&2
    exit 2
  fi
done

# Ports: NATS client i = BASE+i, monitor BASE+3+i, route BASE+6+i; Ferry node j = BASE+10+j.
nats_client_port() { echo $((PORT_BASE + $1)); }
nats_monitor_port() { echo $((PORT_BASE + 3 + $1)); }
nats_route_port() { echo $((PORT_BASE + 6 + $1)); }
ferry_port() { echo $((PORT_BASE + 10 + $1)); }

wait_http() { # port path what
  for _ in $(seq 300); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$1$2")" = 200 ]; then
      return 0
    fi
    sleep 0.1
  done
  echo "$3 did not answer $2 with 200 in 30 s" >&2
  return 1
}

start_nats() {
  local i j routes
  for i in 0 1 2; do
    routes=""
    for j in 0 1 2; do
      [ "$j" = "$i" ] && continue
      routes="$routes${routes:+, }nats-route://127.0.0.1:$(nats_route_port $j)"
    done
    mkdir -p "$WORK/nats/n$i"
    cat >"$WORK/nats/n$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:$(nats_client_port $i)
http: 127.0.0.1:$(nats_monitor_port $i)
jetstream { store_dir: "$WORK/nats/n$i" }
cluster {
  name: ferry-bench
  listen: 127.0.0.1:$(nats_route_port $i)
  routes: [$routes]
}
EOF
    "$NATS" -c "$WORK/nats/n$i.conf" -l "$WORK/nats/n$i.log" >>"$WORK/nats/n$i.log" 2>&1 &
    NATS_PIDS+=($!)
  done
  for i in 0 1 2; do
    wait_http "$(nats_monitor_port $i)" /healthz "nats-server n$i"
  done
  echo "nats: pids ${NATS_PIDS[*]}" >&2
}

NATS_URLS="\"nats://127.0.0.1:$(nats_client_port 0)\", \"nats://127.0.0.1:$(nats_client_port 1)\", \"nats://127.0.0.1:$(nats_client_port 2)\""

# start_ferry NODE CONFIG: starts Ferry node NODE on a fresh data directory; its pid is
# appended to FERRY_PIDS.
start_ferry() {
  local node=$1 config=$2 port
  port=$(ferry_port "$node")
  rm -rf "$WORK/ferry-data-$node"
  "$FERRY" serve --config "$config" --listen "127.0.0.1:$port" \
    --data-dir "$WORK/ferry-data-$node" >>"$WORK/ferry-$node.log" 2>&1 &
  FERRY_PIDS+=($!)
}

# ferry_nodes COUNT CLUSTER(0|1): stops running Ferry nodes, starts COUNT fresh ones (on a new
# stream if CLUSTER=1) and waits until each answers /ready.
STREAM_N=0
ferry_nodes() {
  local count=$1 cluster=$2 config=$WORK/ferry.toml j
  stop_pids "${FERRY_PIDS[@]}"
  FERRY_PIDS=()
  cp bench/ferry-bench.toml "$config"
  if [ "$cluster" = 1 ]; then
    STREAM_N=$((STREAM_N + 1))
    cat >>"$config" <<EOF

[cluster]
nats_urls = [$NATS_URLS]
stream = "bench$STREAM_N"
replicas = 3
EOF
  fi
  for j in $(seq 0 $((count - 1))); do
    start_ferry "$j" "$config"
    # The first node creates the stream; let it before the next one starts.
    wait_http "$(ferry_port "$j")" /ready "ferry node $j"
  done
  echo "ferry: $count node(s), cluster=$cluster, pids ${FERRY_PIDS[*]}" >&2
}

urls() { # COUNT
  local j out=()
  for j in $(seq 0 $(($1 - 1))); do out+=("--url" "ws://127.0.0.1:$(ferry_port "$j")/"); done
  echo "${out[@]}"
}
join() { local IFS=,; echo "$*"; }
# thread_ticks PID...: "pid/tid comm ticks" per thread of the given processes.
thread_ticks() { local p t; for p in "$@"; do for t in /proc/"$p"/task/*; do
      awk -v id="$p/${t##*/}" '{c=$0; sub(/^[^(]*\(/, "", c); sub(/\).*/, "", c); gsub(/ /, "_", c);
        s=$0; sub(/.*\) /, "", s); split(s, f, " "); print id, c, f[12] + f[13]}' "$t/stat" 2>/dev/null || true
    done; done; }
# threads_json BEFORE AFTER: the threads that used CPU between two thread_ticks, busiest first.
threads_json() {
  awk 'NR==FNR {b[$1]=$3; next} {d=$3-b[$1]; if (d > 0) print d/100, $1, $2}' "$1" "$2" \
    | sort -rn | head -12 | jq -R -s -c 'split("\n") | map(select(length > 0) | split(" ") | {cpu_s: (.[0] | tonumber), id: .[1], comm: .[2]})'
}
# user+nice+system+irq+softirq+steal ticks of all CPUs (/proc/stat, USER_HZ = 100).
machine_busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9; exit}' /proc/stat; }

# bench NAME REP ARGS...: one ferry-bench run, summary in $OUT/NAME-REP.json; the exit code
# is kept in the summary file's neighbour NAME-REP.rc.
bench() {
  local name=$1 rep=$2 rc=0
  shift 2
  local pid_args=(--server-pid "$(join "${FERRY_PIDS[@]}")")
  if [ -n "${WITH_NATS:-}" ]; then
    pid_args+=(--nats-pid "$(join "${NATS_PIDS[@]}")")
  fi
  echo "== $name #$rep: ferry-bench $* ${pid_args[*]}" >&2
  local load busy0 busy1 t0 t1
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  busy0=$(machine_busy_ticks)
  thread_ticks "${FERRY_PIDS[@]}" "${NATS_PIDS[@]}" >"$WORK/threads0"
  t0=$(date +%s%3N)
  "$BENCH" "$@" "${pid_args[@]}" --progress-ms 0 >"$OUT/$name-$rep.json" 2>"$WORK/$name-$rep.err" || rc=$?
  t1=$(date +%s%3N)
  busy1=$(machine_busy_ticks)
  thread_ticks "${FERRY_PIDS[@]}" "${NATS_PIDS[@]}" >"$WORK/threads1"
  # Per-thread CPU over the whole run (subscribe phase included): is one thread at 100 %?
  threads_json "$WORK/threads0" "$WORK/threads1" >"$OUT/$name-$rep.threads.json" || true
  echo "$rc" >"$OUT/$name-$rep.rc"
  # Everything the machine's CPUs did during the run (all processes, other helpers' builds
  # included), to see how much of the 2 cores the measured processes had.
  printf '{"exit_code": %s, "loadavg_before": "%s", "wall_s": %s, "machine_busy_cpu_s": %s}\n' \
    "$rc" "$load" "$(awk "BEGIN{print ($t1-$t0)/1000}")" \
    "$(awk "BEGIN{print ($busy1-$busy0)/100}")" >"$OUT/$name-$rep.machine.json"
  if [ "$rc" != 0 ]; then
    echo "   exit $rc; stderr:" >&2
    tail -5 "$WORK/$name-$rep.err" >&2
  fi
  jq -c '{ok, send_ms, actions_per_s, deliveries_per_s, missing_deliveries, dup: .duplicated.total,
          lat: [.latency_ms.p50, .latency_ms.p99], same: [.latency_same_node_ms.p50, .latency_same_node_ms.p99],
          cross: [.latency_cross_node_ms.p50, .latency_cross_node_ms.p99],
          ferry_cpu: .server.cpu_s_sending, nats_cpu: .nats.cpu_s_sending,
          gen_cpu: (.generator.cpu_user_s + .generator.cpu_sys_s), errors}' "$OUT/$name-$rep.json" >&2 || true
}

# idle_cpu REP SECONDS: CPU of the Ferry and nats-server processes over SECONDS, no clients.
proc_ticks() { local t=0 p; for p in "$@"; do
    t=$((t + $(awk '{s=$0; sub(/.*\) /, "", s); split(s, f, " "); print f[12] + f[13]}' "/proc/$p/stat")))
  done; echo "$t"; }
idle_cpu() {
  local f0 n0 f1 n1
  f0=$(proc_ticks "${FERRY_PIDS[@]}"); n0=$(proc_ticks "${NATS_PIDS[@]}")
  sleep "$2"
  f1=$(proc_ticks "${FERRY_PIDS[@]}"); n1=$(proc_ticks "${NATS_PIDS[@]}")
  printf '{"seconds": %s, "ferry_nodes": %s, "ferry_cpu_s": %s, "nats_cpu_s": %s, "streams_created_so_far": %s}\n' \
    "$2" "${#FERRY_PIDS[@]}" "$(awk "BEGIN{print ($f1-$f0)/100}")" "$(awk "BEGIN{print ($n1-$n0)/100}")" \
    "$STREAM_N" | tee "$OUT/idle-$1.json" >&2
}

FANOUT=(fanout --clients 50 --actions 200 --timeout-s 120)
ACKS=(fanout --clients 50 --rooms 50 --actions 400 --timeout-s 120)

need_nats() {
  if [ ${#NATS_PIDS[@]} -eq 0 ]; then start_nats; fi
}

for case in "${CASES[@]}"; do
  for rep in $(seq "$REPS"); do
    case $case in
      embedded)
        ferry_nodes 1 0
        WITH_NATS="" bench embedded "$rep" "${FANOUT[@]}" $(urls 1)
        ;;
      cluster1)
        need_nats
        ferry_nodes 1 1
        WITH_NATS=1 bench cluster1 "$rep" "${FANOUT[@]}" $(urls 1)
        ;;
      cluster2)
        need_nats
        ferry_nodes 2 1
        WITH_NATS=1 bench cluster2 "$rep" "${FANOUT[@]}" $(urls 2)
        ;;
      rate)
        need_nats
        ferry_nodes 2 1
        WITH_NATS=1 bench rate "$rep" fanout --clients 50 --actions 400 --rate "$RATE" \
          --timeout-s 120 $(urls 2)
        ;;
      rate-embedded)
        ferry_nodes 1 0
        WITH_NATS="" bench rate-embedded "$rep" fanout --clients 50 --actions 400 --rate "$RATE" \
          --timeout-s 120 $(urls 1)
        ;;
      acks-cluster2)
        need_nats
        ferry_nodes 2 1
        WITH_NATS=1 bench acks-cluster2 "$rep" "${ACKS[@]}" $(urls 2)
        ;;
      idle)
        # What two cluster nodes and the NATS cluster cost with no client at all.
        need_nats
        ferry_nodes 2 1
        idle_cpu "$rep" 10
        ;;
      acks-embedded)
        ferry_nodes 1 0
        WITH_NATS="" bench acks-embedded "$rep" "${ACKS[@]}" $(urls 1)
        ;;
      acks-cluster)
        need_nats
        ferry_nodes 1 1
        WITH_NATS=1 bench acks-cluster "$rep" "${ACKS[@]}" $(urls 1)
        ;;
      failover)
        need_nats
        ferry_nodes 2 1
        victim=${FERRY_PIDS[0]}
        (
          # The sending phase starts after the subscribes (well under a second here).
          sleep "$KILL_AFTER_S"
          date +%s%3N >"$OUT/failover-$rep.kill_wall_ms"
          kill -KILL "$victim"
          echo "   SIGKILL ferry node 0 (pid $victim)" >&2
        ) &
        killer=$!
        WITH_NATS=1 bench failover "$rep" fanout --clients 50 --actions 100 --rate "$RATE" \
          --failover --timeout-s 120 $(urls 2)
        wait "$killer" || true
        wait "$victim" 2>/dev/null || true
        kill_ms=$(cat "$OUT/failover-$rep.kill_wall_ms")
        jq -c --argjson kill "$kill_ms" '{kill_to_first_close_ms: (.reconnected.first_close_wall_ms - $kill),
          kill_to_all_resynchronized_ms: (.reconnected.last_resynchronized_wall_ms - $kill),
          moved: .reconnected.clients, not_resynchronized: .reconnected.not_resynchronized,
          close_to_resync: .reconnected.close_to_resynchronized_ms,
          close_to_connected: .reconnected.close_to_connected_ms,
          connected_to_resync: .reconnected.connected_to_resynchronized_ms}' "$OUT/failover-$rep.json" \
          | tee "$OUT/failover-$rep.times.json" >&2
        ;;
      *)
        echo "unknown case $case" >&2
        exit 2
        ;;
    esac
  done
done
for f in "$WORK"/ferry-*.log "$WORK"/nats/n*.log; do
  [ -f "$f" ] || continue
  if grep -qiE 'error|panic|warn' "$f"; then
    echo "--- $(basename "$f"): error/warn lines (last 10)" >&2
    grep -iE 'error|panic|warn' "$f" | tail -10 >&2
  fi
done

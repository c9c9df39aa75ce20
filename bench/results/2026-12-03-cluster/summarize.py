#!/usr/bin/env python3
"""Prints one line per run and per case (min-max) from the JSON summaries in this directory.

    python3 bench/results/2026-12-03-cluster/summarize.py
"""
import glob
import json
import os
import re

DIR = os.path.dirname(os.path.abspath(__file__))
CASES = ["embedded", "cluster1", "cluster2", "rate-embedded", "rate", "acks-embedded",
         "acks-cluster", "acks-cluster2", "failover"]


def load(path):
    with open(path) as f:
        return json.load(f)


def g(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float) and v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


for case in CASES:
    runs = sorted(glob.glob(os.path.join(DIR, f"{case}-[0-9].json")))
    rows = []
    for path in runs:
        rep = re.search(r"-(\d)\.json$", path).group(1)
        j = load(path)
        m = load(path.replace(".json", ".machine.json"))
        gen = j["generator"]["cpu_user_s"] + j["generator"]["cpu_sys_s"]
        ferry = g(j, "server", "cpu_s_sending")
        nats = g(j, "nats", "cpu_s_sending")
        acts = j["actions_processed"]
        row = {
            "rep": rep, "ok": j["ok"], "send_s": j["send_ms"] / 1000,
            "acks_s": j["actions_per_s"], "deliv_s": j["deliveries_per_s"],
            "missing": j["missing_deliveries"], "dup": j["duplicated"]["total"],
            "unexpected": j["unexpected_deliveries"],
            "lat": (g(j, "latency_ms", "p50"), g(j, "latency_ms", "p99")),
            "same": (g(j, "latency_same_node_ms", "p50"), g(j, "latency_same_node_ms", "p99")),
            "cross": (g(j, "latency_cross_node_ms", "p50"), g(j, "latency_cross_node_ms", "p99")),
            "ack": (g(j, "processed_latency_ms", "p50"), g(j, "processed_latency_ms", "p99")),
            "ferry": ferry, "ferry_by": g(j, "server", "cpu_s_sending_by_pid"), "nats": nats,
            "gen": round(gen, 2), "gen_pct": j["generator"]["cpu_pct_of_wall"],
            "machine": m["machine_busy_cpu_s"], "wall": m["wall_s"],
            "ferry_10k": ferry / acts * 10000 if ferry is not None and acts else None,
            "nats_10k": nats / acts * 10000 if nats is not None and acts else None,
            "errors": j["errors"],
        }
        rows.append(row)
        print(case, json.dumps(row))
        if case == "failover":
            t = os.path.join(DIR, f"failover-{rep}.times.json")
            if os.path.exists(t):
                print("   ", open(t).read().strip())
    print()
for path in sorted(glob.glob(os.path.join(DIR, "idle-*.json"))):
    print(os.path.basename(path), open(path).read().strip())

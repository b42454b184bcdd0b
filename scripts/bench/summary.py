#!/usr/bin/env python3
"""Summarises the JSON reports of scripts/bench/run.sh as the Markdown tables of
BENCHMARKS.md: python3 scripts/bench/summary.py OUT_DIR"""
import glob
import json
import os
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None


def lat(s):
    return f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f} / {s['max_ms']:.2f}"


print("| run | agents connected | connects/s | connect p50/p99/max ms | heartbeat-ack p50/p99/max ms | commands ok/sent | command p50/p99/max ms | gateway CPU s (connect, steady) | RSS idle → steady MiB | KiB per agent | peak RSS MiB | failures |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in ["storm-5000", "steady-10000", "max-19800", "commands-1000"]:
    r = load(name + ".json")
    if r is None:
        continue
    g = r.get("gateway") or {}
    fails = sum(r["failures"].values())
    cmd = r["commands"]
    cmds = f"{cmd['ok']}/{cmd['sent']}" if cmd["sent"] else "–"
    cmdl = lat(cmd["latency"]) if cmd["sent"] else "–"
    rss = (f"{g['idle']['rss_kib']/1024:.0f} → {g['steady_end']['rss_kib']/1024:.0f}"
           if g else "–")
    print(f"| {name} | {r['connected_at_end']}/{r['conditions']['agents']} "
          f"| {r['connect']['rate']['per_sec']:.0f} | {lat(r['connect']['latency'])} "
          f"| {lat(r['heartbeats']['latency'])} | {cmds} | {cmdl} "
          f"| {g.get('cpu_secs_connect', 0):.1f}, {g.get('cpu_secs_steady', 0):.1f} | {rss} "
          f"| {g.get('rss_per_agent_kib', 0):.1f} | {g.get('peak_rss_kib', 0)/1024:.0f} | {fails} |")

hs = sorted(glob.glob(os.path.join(out, "handshakes-*.json")))
if hs:
    print()
    print("| handshakes | per second | handshake p50/p99 ms | server CPU ms per handshake | failures |")
    print("|---|---|---|---|---|")
    totals = {}
    for path in hs:
        r = json.load(open(path))
        s = r.get("server") or {}
        label = r["label"]
        t = totals.setdefault(label, [0, 0.0, 0.0])
        t[0] += r["rate"]["count"]
        t[1] += r["rate"]["secs"]
        t[2] += s.get("cpu_secs", 0.0)
        print(f"| {os.path.basename(path)[11:-5]} | {r['rate']['per_sec']:.0f} "
              f"| {r['handshake_latency']['p50_ms']:.2f} / {r['handshake_latency']['p99_ms']:.2f} "
              f"| {s.get('cpu_ms_per_handshake', 0):.3f} | {sum(r['failures'].values())} |")
    if "agentgate" in totals and "nginx" in totals:
        a, n = totals["agentgate"], totals["nginx"]
        rate = (a[0] / a[1]) / (n[0] / n[1])
        cpu = (n[2] / n[0]) / (a[2] / a[0]) if a[2] and n[0] else 0.0
        print()
        print(f"agentgate / nginx: throughput ratio {rate:.2f}, "
              f"CPU-per-handshake ratio (nginx ms / agentgate ms) {cpu:.2f}")

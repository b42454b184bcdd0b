#!/usr/bin/env bash
# The connect storm spread over two nodes (BENCHMARKS.md, "Several nodes: the connect
# storm"): AGENTS agents connecting as fast as they can to one node without [cluster], then
# the same number split over the two nodes of a cluster (two simulators at once, half
# each), against a release build, on loopback, with a local redis-server.
#
#   scripts/bench/cluster-storm.sh [OUT_DIR]   # default: target/bench-results/storm-<UTC time>
#   AGENTS=2000 scripts/bench/cluster-storm.sh
#
# Both nodes run on this one machine, so the cluster run does not get more CPU than the
# single node: what it shows is the cost of clustering on the connect path (the Redis
# adapter, the room join, the fleet publication), not a scale-out gain.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:-target/bench-results/storm-$(date -u +%Y%m%dT%H%M%SZ)}
agents=${AGENTS:-2000}
half=$((agents / 2))
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/agentgate-storm-bench.XXXXXX)
key=bench-key-$RANDOM$RANDOM
redis_port=${REDIS_PORT:-18380}
port_a=${PORT_A:-18447}
port_b=${PORT_B:-18448}
pids=()

cargo build --release --locked --quiet -p agentgate -p agentgate-bench
bin=$PWD/target/release/agentgate
sim=$PWD/target/release/agentgate-bench

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

. scripts/bench/cluster-common.sh

# storm TARGET PID COUNT PREFIX JSON: COUNT agents connect at once, then 2 s of heartbeats.
storm() {
    "$sim" fleet --api-key "$key" --target "$1" --gateway-pid "$2" --agents "$3" \
        --id-prefix "$4" --heartbeat-secs 1 --steady-secs 2 --json "$5" >/dev/null
}

echo "connect storm: $agents agents; results in $out" >&2
config single "$port_a"
pid=$(start single "$port_a")
pids+=("$pid")
storm "127.0.0.1:$port_a" "$pid" "$agents" single- "$out/single.json"
kill "$pid"; wait "$pid" 2>/dev/null || true

config a "$port_a" cluster
config b "$port_b" cluster
pid_a=$(start a "$port_a"); pids+=("$pid_a")
pid_b=$(start b "$port_b"); pids+=("$pid_b")
storm "127.0.0.1:$port_a" "$pid_a" "$half" a- "$out/cluster-a.json" &
sa=$!
storm "127.0.0.1:$port_b" "$pid_b" "$half" b- "$out/cluster-b.json" &
sb=$!
wait "$sa" "$sb"

python3 - "$out" "$agents" <<'PY' | tee "$out/summary.md"
import json, sys
out, agents = sys.argv[1], int(sys.argv[2])
single = json.load(open(f"{out}/single.json"))
a = json.load(open(f"{out}/cluster-a.json"))
b = json.load(open(f"{out}/cluster-b.json"))
def row(label, runs):
    connected = sum(r["connect"]["connected"] for r in runs)
    secs = max(r["connect"]["rate"]["secs"] for r in runs)
    p50 = max(r["connect"]["latency"]["p50_ms"] for r in runs)
    p99 = max(r["connect"]["latency"]["p99_ms"] for r in runs)
    cpu = sum(r["gateway"]["connected"]["cpu_secs"] - r["gateway"]["idle"]["cpu_secs"] for r in runs)
    rate = connected / secs if secs else float("nan")
    print(f"| {label} | {connected}/{agents} | {secs:.2f} s | {rate:.0f}/s | {p50:.1f} ms | {p99:.1f} ms | {cpu:.2f} s |")
    return rate
print("| run | connected | storm took | connects/s | connect p50 | connect p99 | gateway CPU for the storm |")
print("| --- | --- | --- | --- | --- | --- | --- |")
r1 = row("one node, no [cluster]", [single])
r2 = row("two nodes of a cluster, half each", [a, b])
print()
print(f"connects/s, two clustered nodes / one node: {r2 / r1:.2f}x")
PY

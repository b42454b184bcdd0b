#!/usr/bin/env bash
# Several nodes (BENCHMARKS.md, "Several nodes"): same-node vs cross-node command latency,
# and gateway CPU per heartbeat on one node without [cluster] vs a node of a two-node
# cluster, against a release build, on loopback, with a local redis-server.
#
#   scripts/bench/cluster.sh [OUT_DIR]      # default: target/bench-results/cluster-<UTC time>
#   AGENTS=1000 STEADY=30 RATE=50 scripts/bench/cluster.sh
#
# Three runs of `agentgate-bench fleet`, each on fresh gateways: (1) one node without
# [cluster]; (2) node B of a cluster, commands through B (same node); (3) the same with
# the commands sent through node A (`--command-target`), so each crosses Redis to B.
# The agents always connect to the measured node, whose CPU time is read from /proc.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:-target/bench-results/cluster-$(date -u +%Y%m%dT%H%M%SZ)}
agents=${AGENTS:-1000}
steady=${STEADY:-30}
rate=${RATE:-50}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/agentgate-cluster-bench.XXXXXX)
key=bench-key-$RANDOM$RANDOM
redis_port=${REDIS_PORT:-18379}
port_a=${PORT_A:-18445}
port_b=${PORT_B:-18446}
pids=()

cargo build --release --locked --quiet -p agentgate -p agentgate-bench
bin=$PWD/target/release/agentgate
sim=$PWD/target/release/agentgate-bench

cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

. scripts/bench/cluster-common.sh

fleet() {
    local target=$1 pid=$2 json=$3
    shift 3
    "$sim" fleet --api-key "$key" --target "$target" --agents "$agents" \
        --heartbeat-secs 1 --steady-secs "$steady" --command-rate "$rate" \
        --command-connections 8 --gateway-pid "$pid" --json "$json" "$@" >/dev/null
}

stop_all_gateways() {
    for p in "${pids[@]:1}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=("${pids[0]}")
}

echo "cluster bench: $agents agents, ${steady}s steady, $rate commands/s; results in $out" >&2

# 1. One node, no [cluster].
config single "$port_b"
pid=$(start single "$port_b")
pids+=("$pid")
fleet "127.0.0.1:$port_b" "$pid" "$out/standalone.json" --id-prefix single-
stop_all_gateways

# 2. and 3. Two nodes; agents on B.
for run in same cross; do
    redis-cli -p "$redis_port" flushall >/dev/null
    config "a-$run" "$port_a" cluster
    config "b-$run" "$port_b" cluster
    pids+=("$(start "a-$run" "$port_a")")
    pid_b=$(start "b-$run" "$port_b")
    pids+=("$pid_b")
    extra=()
    [ "$run" = cross ] && extra=(--command-target "127.0.0.1:$port_a")
    fleet "127.0.0.1:$port_b" "$pid_b" "$out/cluster-$run.json" --id-prefix "$run-" "${extra[@]}"
    stop_all_gateways
done

python3 - "$out" <<'PY' | tee "$out/summary.md"
import json, sys
out = sys.argv[1]
runs = [("one node, no [cluster]", "standalone"), ("cluster, command via the agent's node", "cluster-same"),
        ("cluster, command via the other node", "cluster-cross")]
print("| run | heartbeats acked | gateway CPU, steady | CPU per heartbeat | command p50 | command p99 | commands ok |")
print("| --- | --- | --- | --- | --- | --- | --- |")
per_hb = {}
for label, name in runs:
    r = json.load(open(f"{out}/{name}.json"))
    hb = r["heartbeats"]["acked"]
    cpu = r["gateway"]["cpu_secs_steady"]
    per_hb[name] = cpu / hb if hb else float("nan")
    c = r["commands"]
    print(f"| {label} | {hb} | {cpu:.2f} s | {per_hb[name] * 1e6:.1f} µs | {c['latency']['p50_ms']:.2f} ms "
          f"| {c['latency']['p99_ms']:.2f} ms | {c['ok']}/{c['sent']} |")
print()
print(f"CPU per heartbeat, clustered / standalone: {per_hb['cluster-same'] / per_hb['standalone']:.2f}x")
PY

#!/usr/bin/env bash
# Runs every measurement that BENCHMARKS.md reports, against a release build, on
# loopback, each bounded in time (the whole suite takes about 15 minutes).
#
#   scripts/bench/run.sh [OUT_DIR]          # default: target/bench-results/<UTC time>
#   ONLY="storm steady10k" scripts/bench/run.sh   # a subset: storm steady10k max commands handshakes
#   NICE=-10 scripts/bench/run.sh     # gateway and simulator ahead of other work on the machine
#
# For each fleet measurement the gateway is started afresh (its idle RSS is then
# comparable) with its own config in a temp dir; JSON reports land in OUT_DIR together
# with summary.md, the table BENCHMARKS.md quotes.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:-target/bench-results/$(date -u +%Y%m%dT%H%M%SZ)}
only=${ONLY:-storm steady10k max commands handshakes}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/agentgate-bench.XXXXXX)
port=${PORT:-18443}
nginx_port=${NGINX_PORT:-18444}
key=bench-key-$RANDOM$RANDOM
gw_pid=
# On a machine shared with other work (compile jobs), a negative niceness (root only)
# lets the gateway and the simulator run first, closer to a dedicated node.
run_nice=(nice -n "${NICE:-0}")

# The gateway and the simulator are two packages of the workspace (README, "Benchmarks").
cargo build --release --locked --quiet -p agentgate -p agentgate-bench
bin=$PWD/target/release/agentgate
sim=$PWD/target/release/agentgate-bench

cleanup() {
    [ -n "$gw_pid" ] && kill "$gw_pid" 2>/dev/null || true
    scripts/bench/nginx.sh stop "$work/nginx" || true
}
trap cleanup EXIT

cat > "$work/agentgate.toml" <<CONF
listen = "127.0.0.1:$port"
data_dir = "$work/data"
api_keys = ["$key"]
log_format = "text"
# The load generator opens thousands of connections from a few loopback addresses.
[limits]
handshakes_per_source = 1000000
handshake_failures = 1000000
[store]
dir = "$work/certs"
[tls]
mode = "self-signed"
CONF

start_gateway() {
    stop_gateway
    RUST_LOG=warn "${run_nice[@]}" "$bin" serve --config "$work/agentgate.toml" 2>>"$work/gateway.log" &
    gw_pid=$!
    for _ in $(seq 100); do
        curl -skf "https://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "gateway did not start; see $work/gateway.log" >&2
    exit 1
}

stop_gateway() {
    if [ -n "$gw_pid" ]; then
        kill "$gw_pid" 2>/dev/null || true
        timeout 30 tail --pid="$gw_pid" -f /dev/null || true
        gw_pid=
    fi
}

# SYNs dropped because a listen queue was full, machine-wide (/proc/net/netstat).
listen_drops() {
    awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) n[i] = $i; h = 1 }
                      else { for (i = 1; i <= NF; i++) if (n[i] == "ListenDrops") print $i } }' /proc/net/netstat
}

fleet() { # name, then agentgate-bench fleet arguments
    local name=$1; shift
    start_gateway
    echo "== $name: agentgate-bench fleet $*" | tee -a "$out/log.txt"
    local drops=$(listen_drops)
    "${run_nice[@]}" "$sim" fleet --target "127.0.0.1:$port" --api-key "$key" --gateway-pid "$gw_pid" \
        --json "$out/$name.json" "$@" 2>&1 | tee -a "$out/log.txt"
    echo "listen queue drops (SYNs) during $name: $(( $(listen_drops) - drops ))" | tee -a "$out/log.txt"
}

echo "# $(date -u +%FT%TZ) $(nproc) CPUs, $(uname -r), fd limit $(ulimit -Sn)/$(ulimit -Hn), git $(git rev-parse --short HEAD), nice ${NICE:-0}" | tee "$out/log.txt"
uptime | tee -a "$out/log.txt"

for m in $only; do
    case $m in
    storm)
        # A connect storm: 5,000 agents connecting at once (every connect in flight).
        fleet storm-5000 --agents 5000 --connect-concurrency 5000 --upload-concurrency 64 \
            --steady-secs 10 --max-secs 300 ;;
    steady10k)
        fleet steady-10000 --agents 10000 --upload-concurrency 64 --connect-rate 2000 --heartbeat-secs 1 --steady-secs 60 --max-secs 400 ;;
    max)
        # As many as the gateway's 20,000 descriptors allow (listener, epoll, store and
        # API connections need a few dozen); two simulator processes.
        fleet max-19800 --agents 19800 --shards 2 --upload-concurrency 64 --connect-rate 2000 --heartbeat-secs 1 --steady-secs 60 --max-secs 600 ;;
    commands)
        fleet commands-1000 --agents 1000 --connect-rate 1000 --heartbeat-secs 1 --steady-secs 30 \
            --command-rate 1000 --command-connections 64 --max-secs 300 ;;
    handshakes)
        start_gateway
        read -r -a nginx_pids < <(scripts/bench/nginx.sh start "$work/nginx" "$nginx_port" \
            "$work/data/self-signed/cert.pem" "$work/data/self-signed/key.pem")
        nginx_args=()
        for p in "${nginx_pids[@]}"; do nginx_args+=(--server-pid "$p"); done
        # Alternate the two targets so that background load hits both alike.
        for round in 1 2; do
            echo "== handshakes round $round: agentgate, then nginx" | tee -a "$out/log.txt"
            "$sim" handshakes --target "127.0.0.1:$port" --label agentgate --api-key "$key" \
                --server-pid "$gw_pid" --concurrency 32 --secs 15 \
                --json "$out/handshakes-agentgate-$round.json" 2>&1 | tee -a "$out/log.txt"
            "$sim" handshakes --target "127.0.0.1:$nginx_port" --label nginx \
                "${nginx_args[@]}" --concurrency 32 --secs 15 \
                --json "$out/handshakes-nginx-$round.json" 2>&1 | tee -a "$out/log.txt"
        done
        scripts/bench/nginx.sh stop "$work/nginx" ;;
    *) echo "unknown measurement $m" >&2; exit 2 ;;
    esac
done
stop_gateway
python3 scripts/bench/summary.py "$out" | tee "$out/summary.md"
echo "results in $out"

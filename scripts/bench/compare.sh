#!/usr/bin/env bash
# Before/after on the same machine in the same minutes: runs one fleet measurement against
# two gateway binaries in turn, ROUNDS times, so that background load hits both alike.
#
#   scripts/bench/compare.sh BEFORE_BIN AFTER_BIN OUT_DIR -- <agentgate-bench fleet arguments>
#
# The simulator is SIM (default target/release/agentgate-bench, from
# `cargo build --release -p agentgate-bench`), the same for both sides. Each run gets a
# fresh gateway (own temp dir).
set -euo pipefail
before=${1:?BEFORE_BIN}; after=${2:?AFTER_BIN}; out=${3:?OUT_DIR}; shift 3
[ "${1:-}" = "--" ] && shift
rounds=${ROUNDS:-2}
sim=${SIM:-$PWD/target/release/agentgate-bench}
[ -x "$sim" ] || { echo "no simulator at $sim: cargo build --release -p agentgate-bench" >&2; exit 2; }
port=${PORT:-18453}
mkdir -p "$out"
gw_pid=
# SYNs dropped because a listen queue was full, machine-wide (/proc/net/netstat).
listen_drops() {
    awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) n[i] = $i; h = 1 }
                      else { for (i = 1; i <= NF; i++) if (n[i] == "ListenDrops") print $i } }' /proc/net/netstat
}
trap '[ -n "$gw_pid" ] && kill $gw_pid 2>/dev/null || true' EXIT
for round in $(seq "$rounds"); do
    for side in before after; do
        bin=$before; [ $side = after ] && bin=$after
        work=$(mktemp -d /tmp/agentgate-compare.XXXXXX)
        printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s/data"\napi_keys = ["compare-key"]\n[limits]\nhandshakes_per_source = 1000000\nhandshake_failures = 1000000\n[store]\ndir = "%s/certs"\n' \
            "$port" "$work" "$work" > "$work/gw.toml"
        RUST_LOG=warn "$bin" serve --config "$work/gw.toml" 2>"$work/gw.log" &
        gw_pid=$!
        for _ in $(seq 100); do curl -skf "https://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
        echo "== round $round $side ($bin)"
        drops=$(listen_drops)
        "$sim" fleet --target "127.0.0.1:$port" --api-key compare-key --gateway-pid "$gw_pid" \
            --json "$out/$side-$round.json" "$@" 2>&1 | grep -E "connected |connect latency|heartbeat-ack|CPU|gateway|failure"
        echo "listen queue drops (SYNs): $(( $(listen_drops) - drops ))"
        kill "$gw_pid"; timeout 30 tail --pid="$gw_pid" -f /dev/null || true; gw_pid=
        rm -rf "$work"
    done
done

#!/usr/bin/env bash
# Profiles the gateway under valgrind with a small fleet (perf's hardware counters are
# not available on this VM: `perf stat -e instructions true` says "not supported").
#
#   scripts/bench/profile.sh callgrind OUT_DIR [AGENTS]   # one profile per phase:
#       OUT_DIR/callgrind.out.*.1 = uploads, .2 = connect path, .3 = heartbeat path
#   scripts/bench/profile.sh massif OUT_DIR [AGENTS]      # heap with AGENTS connected
#   STEADY=40 ...                                         # steady phase length (default 20 s)
#
# Then: callgrind_annotate --inclusive=yes OUT_DIR/callgrind.out.<pid>.2 | head -60
#       ms_print OUT_DIR/massif.out.<pid> | less
set -euo pipefail
cd "$(dirname "$0")/../.."
tool=${1:?callgrind|massif}; out=${2:?OUT_DIR}; agents=${3:-300}
port=${PORT:-18463}
mkdir -p "$out"; out=$(cd "$out" && pwd)
bin=${GATEWAY_BIN:-$PWD/target/release/agentgate}
sim=${SIM:-$PWD/target/release/agentgate-bench}   # cargo build --release -p agentgate-bench
work=$(mktemp -d /tmp/agentgate-profile.XXXXXX)
printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s/data"\napi_keys = ["profile-key"]\n[store]\ndir = "%s/certs"\n' \
    "$port" "$work" "$work" > "$work/gw.toml"
case $tool in
callgrind) vg=(valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out.%p") ;;
massif) vg=(valgrind --tool=massif --massif-out-file="$out/massif.out.%p" --time-unit=B --detailed-freq=1 --max-snapshots=200 --threshold=0.5) ;;
*) echo "callgrind or massif" >&2; exit 2 ;;
esac
RUST_LOG=warn "${vg[@]}" "$bin" serve --config "$work/gw.toml" 2>"$work/gw.log" &
vg_pid=$!
trap 'kill $vg_pid 2>/dev/null || true' EXIT
for _ in $(seq 600); do curl -skf "https://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.2; done
"$sim" fleet --target "127.0.0.1:$port" --api-key profile-key --agents "$agents" \
    --connect-concurrency 16 --connect-timeout-secs 300 --upload-concurrency 8 \
    --heartbeat-secs 1 --steady-secs "${STEADY:-20}" --gateway-pid "$vg_pid" --max-secs 900 \
    --json "$out/fleet.json" 2>"$work/sim.err" &
sim_pid=$!
if [ "$tool" = callgrind ]; then
    # Dump (and zero) the counters at each phase boundary the simulator announces.
    for phase in "connect phase" "steady phase" "stopping"; do
        until grep -q "$phase" "$work/sim.err"; do sleep 0.2; done
        callgrind_control -d "$vg_pid" >/dev/null
    done
else
    until grep -q "stopping" "$work/sim.err"; do sleep 0.5; done
fi
wait "$sim_pid" || true
kill -INT "$vg_pid"; wait "$vg_pid" || true
cat "$work/sim.err" >&2
ls -la "$out"

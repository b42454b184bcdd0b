#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60): ./scripts/fuzz.sh 600
# With target names after SECONDS, only those: ./scripts/fuzz.sh 600 jwt
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Each target
# starts from its seeds in fuzz/seeds/<target> and grows its corpus in fuzz/corpus/<target>
# (not committed). A crash or hang stops with its input in fuzz/artifacts/<target>/: copy it
# to fixtures/fuzz/<target>/, fix the bug, and the regression test (tests/fuzz_regressions.rs)
# replays it in the normal test run. Prints one line per target: runs, coverage, findings.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
secs="${1:-60}"
targets=(upload config verifier socketio jwt)
if [ "$#" -gt 1 ]; then
    targets=("${@:2}")
fi
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="$(mktemp)"
    if cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
        outcome="no finding"
    else
        outcome="FINDING (see fuzz/artifacts/$t/)"
        status=1
    fi
    # libFuzzer's last status line: "#<runs> DONE cov: N ft: N corp: N/..."
    summary="$(grep -E '^#[0-9]+' "$log" | tail -1 || true)"
    runs="$(grep -oE 'stat::number_of_executed_units: [0-9]+' "$log" | grep -oE '[0-9]+$' || true)"
    printf '%-9s %ss runs=%s %s | %s\n' "$t" "$secs" "${runs:-?}" "$outcome" "$summary"
    [ "$outcome" = "no finding" ] || tail -40 "$log" >&2
    rm -f "$log"
done
exit "$status"

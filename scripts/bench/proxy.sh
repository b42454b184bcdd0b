#!/usr/bin/env bash
# The proxy benchmark (BENCHMARKS.md, "Proxy"; issue 10): agentgate's `[[routes]]` against
# calling the upstream directly and against nginx `proxy_pass`, all on loopback, in one
# run, against a release build.
#
#   scripts/bench/proxy.sh [OUT_DIR]        # default: target/bench-results/proxy-<UTC time>
#   RATES=500,2000,5000 SECS=5 ROUNDS=2 WRK_SECS=5 WRK_ROUNDS=3 scripts/bench/proxy.sh
#   NICE=-10 scripts/bench/proxy.sh   # every process of the benchmark ahead of other work (root)
#   PARTS=throughput WRK_ROUNDS=5 scripts/bench/proxy.sh   # one part only (latency, throughput)
#   PARTS=instructions scripts/bench/proxy.sh   # instructions per request under callgrind
#   CARGO_TARGET_DIR=target/nolto CARGO_PROFILE_RELEASE_LTO=false \
#     CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 PARTS=instructions scripts/bench/proxy.sh
#       # the same without LTO: callgrind then sees functions that fat LTO inlines away
#
# One upstream (`agentgate-bench upstream`: 200 with a 64-byte body, plain HTTP for the
# proxies, TLS for the direct TLS baseline) behind two proxies with the same certificate
# (ECDSA P-256, made by openssl here), the same TLS versions, keep-alive to the upstream:
#   agentgate: routes /open (auth = "none") and /jwt (auth = "jwt", HS256, two claims),
#              strip_prefix; one process, tokio's runtime with one worker thread per core;
#   nginx:     /open/ -> proxy_pass http://upstream/ with `upstream { keepalive 64; }`,
#              proxy_http_version 1.1, the same X-Forwarded-*/X-Request-Id headers;
#              worker_processes = number of cores. (nginx has no HS256 check: the jwt
#              route is compared with agentgate's own open route.)
#   haproxy:   the same /open/ with TLS termination, `http-reuse always` to the upstream,
#              X-Forwarded-For (`option forwardfor`) and the other headers, a request id;
#              nbthread = number of cores. A third proxy, for what a proxy hop costs on
#              the machine at all (when haproxy is installed; HAPROXY=0 leaves it out).
#   tcp-relay: the same haproxy relaying TCP (`mode tcp`) to the upstream's TLS port: the
#              client's TLS session ends at the upstream as in direct-tls, so its overhead
#              is what one hop through a process costs here (two more wake-ups, two more
#              loopback sends) with no TLS, HTTP or header work: the floor under any
#              TLS-terminating proxy's overhead on the machine. Latency part only.
# All log every request (agentgate's access line, nginx's access_log, haproxy's httplog) to a file in the
# first throughput pass and nothing in the second (LOGS="on off").
#
# 1. Latency (`agentgate-bench proxy`, open loop): p50/p99 at each rate in RATES for the
#    upstream over plain HTTP and over TLS, agentgate /open and /jwt, nginx /open;
#    overhead = proxy - direct over TLS (the client's TLS work is the same on both).
# 2. Throughput (wrk, closed loop, WRK_CONNS connections, 2 threads): requests/s of
#    agentgate /open, /jwt, nginx /open and the upstream over TLS, interleaved WRK_ROUNDS
#    times; ratio agentgate/nginx per round; server CPU per request from /proc.
# 3. Instructions (PARTS=instructions, not in the default run; valgrind): user-space
#    instructions per proxied request of agentgate /open, /jwt and nginx /open, each
#    under callgrind with its access log on: counters zeroed, SHORT then LONG requests at
#    100/s over 4 fresh connections, the difference of the two totals divided by the
#    difference of the counts (so connection set-up and TLS handshakes cancel out).
#    Noise-free on a shared machine; writes OUT_DIR/instructions.csv.
# Prints the tables and writes OUT_DIR/proxy.json, OUT_DIR/latency.json, summary.md.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:-target/bench-results/proxy-$(date -u +%Y%m%dT%H%M%SZ)}
rates=${RATES:-500,2000,5000}
secs=${SECS:-5}
rounds=${ROUNDS:-2}
wrk_secs=${WRK_SECS:-5}
wrk_rounds=${WRK_ROUNDS:-3}
wrk_conns=${WRK_CONNS:-64}
logs=${LOGS:-on off}
parts=${PARTS:-latency throughput}
port=${PORT:-18470}
nginx_port=$((port + 1))
up_port=$((port + 2))
up_tls_port=$((port + 3))
haproxy_port=$((port + 4))
relay_port=$((port + 5))
with_haproxy=${HAPROXY:-1}
command -v haproxy >/dev/null || with_haproxy=0
cores=$(nproc)
for tool in nginx wrk openssl python3 curl; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed (apt-get install nginx wrk openssl python3 curl)" >&2; exit 1; }
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d /tmp/agentgate-proxybench.XXXXXX)
gw_pid=
up_pid=
hp_pid=
# On a machine shared with other work (compile jobs), a negative niceness (root only) for
# every process of the benchmark alike: proxies, upstream, load generators.
run_nice=(nice -n "${NICE:-0}")

cargo build --release --locked --quiet -p agentgate -p agentgate-bench
target_dir=$(cd "${CARGO_TARGET_DIR:-target}" && pwd)
bin=$target_dir/release/agentgate
sim=$target_dir/release/agentgate-bench

cleanup() {
    [ -n "$gw_pid" ] && kill "$gw_pid" 2>/dev/null || true
    [ -n "$up_pid" ] && kill "$up_pid" 2>/dev/null || true
    [ -s "$work/nginx/nginx.pid" ] && kill "$(cat "$work/nginx/nginx.pid")" 2>/dev/null || true
    [ -n "$hp_pid" ] && kill "$hp_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

# An HS256 token as the replaced gateway's token function mints them.
secret=bench-jwt-secret-$RANDOM$RANDOM$RANDOM
token=$(python3 - "$secret" <<'PY'
import base64, hashlib, hmac, json, sys, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
now = int(time.time())
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"jti": "bench-0001", "project": "bench", "service": "api",
                       "iat": now, "exp": now + 3600}).encode())
sig = b64(hmac.new(sys.argv[1].encode(), head + b"." + body, hashlib.sha256).digest())
print((head + b"." + body + b"." + sig).decode())
PY
)

"${run_nice[@]}" "$sim" upstream --listen "127.0.0.1:$up_port" --tls-listen "127.0.0.1:$up_tls_port" \
    --cert "$work/cert.pem" --key "$work/key.pem" >"$work/upstream.out" 2>&1 &
up_pid=$!

cat > "$work/agentgate.toml" <<CONF
listen = "127.0.0.1:$port"
data_dir = "$work/data"
api_keys = ["bench-key-$RANDOM$RANDOM"]
log_format = "text"
# wrk opens all its connections at once from one address.
[limits]
handshakes_per_source = 1000000
handshake_failures = 1000000
[store]
dir = "$work/certs"
[tls]
mode = "files"
cert_file = "$work/cert.pem"
key_file = "$work/key.pem"
[[routes]]
name = "open"
prefix = "/open"
upstreams = ["http://127.0.0.1:$up_port"]
strip_prefix = true
auth = "none"
[[routes]]
name = "jwt"
prefix = "/jwt"
upstreams = ["http://127.0.0.1:$up_port"]
strip_prefix = true
auth = "jwt"
claims = { project = ["bench"], service = ["api"] }
CONF

wait_for() { # URL, the log to show if it never answers 2xx
    for _ in $(seq 100); do
        curl -skf "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "no answer from $1:" >&2; cat "$2" >&2; exit 1
}

start_gateway() { # on|off: the access log
    stop_gateway
    local level=info
    [ "$1" = off ] && level=warn
    GATEWAY_JWT_SECRET=$secret RUST_LOG=$level "${run_nice[@]}" "$bin" serve --config "$work/agentgate.toml" \
        2>"$work/gateway-$1.log" &
    gw_pid=$!
    wait_for "https://127.0.0.1:$port/health" "$work/gateway-$1.log"
}

stop_pid() { # PID (may be empty): ends it and waits for it to be gone
    if [ -n "$1" ]; then
        kill "$1" 2>/dev/null || true
        timeout 30 tail --pid="$1" -f /dev/null || true
    fi
}

stop_gateway() {
    stop_pid "$gw_pid"
    gw_pid=
}

start_nginx() { # on|off: the access log
    stop_nginx
    write_nginx_conf "$1"
    "${run_nice[@]}" nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -g 'daemon on;'
    wait_for "https://127.0.0.1:$nginx_port/open/x" "$work/nginx/error.log"
}

write_nginx_conf() { # on|off: the access log
    local dir=$work/nginx access=off
    [ "$1" = on ] && access="$dir/access.log"
    mkdir -p "$dir"
    cat > "$dir/nginx.conf" <<CONF
worker_processes $cores;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log $access;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    upstream bench_upstream {
        server 127.0.0.1:$up_port;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$nginx_port ssl;
        ssl_certificate $work/cert.pem;
        ssl_certificate_key $work/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location /open/ {
            proxy_pass http://bench_upstream/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For \$remote_addr;
            proxy_set_header X-Forwarded-Proto https;
            proxy_set_header X-Forwarded-Host \$host;
            proxy_set_header X-Request-Id \$request_id;
            add_header X-Request-Id \$request_id;
        }
    }
}
CONF
}

stop_nginx() {
    local pidfile=$work/nginx/nginx.pid
    if [ -s "$pidfile" ]; then
        stop_pid "$(cat "$pidfile")"
        rm -f "$pidfile"
    fi
}

start_haproxy() { # on|off: the access log
    stop_haproxy
    [ "$with_haproxy" = 1 ] || return 0
    local logging="" httplog=""
    if [ "$1" = on ]; then logging="log stdout format raw local0"; httplog="option httplog"; fi
    cat "$work/cert.pem" "$work/key.pem" > "$work/haproxy.pem"
    cat > "$work/haproxy.cfg" <<CONF
global
    nbthread $cores
    $logging
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:$haproxy_port ssl crt $work/haproxy.pem alpn http/1.1
    $httplog
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
    http-after-response set-header X-Request-Id %[unique-id]
    use_backend be if { path_beg /open/ }
backend be
    http-request replace-path /open(/.*) \1
    server up 127.0.0.1:$up_port
frontend relay
    mode tcp
    bind 127.0.0.1:$relay_port
    default_backend relay_up
backend relay_up
    mode tcp
    server up_tls 127.0.0.1:$up_tls_port
CONF
    "${run_nice[@]}" haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy-$1.log" 2>&1 &
    hp_pid=$!
    wait_for "https://127.0.0.1:$haproxy_port/open/x" "$work/haproxy-$1.log"
}

stop_haproxy() {
    stop_pid "$hp_pid"
    hp_pid=
}

nginx_pids() {
    local master
    master=$(cat "$work/nginx/nginx.pid")
    echo "$master $(pgrep -P "$master" | tr '\n' ' ')"
}

# CPU ticks (user + system) of the given pids, from /proc/<pid>/stat.
ticks() {
    local sum=0 pid
    for pid in "$@"; do
        sum=$((sum + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$sum"
}

auth="Authorization: Bearer $token"
started=$(date -u +%FT%TZ)
echo "# $started $cores CPUs, $(uname -r), git $(git rev-parse --short HEAD), nice ${NICE:-0}, $(nginx -v 2>&1), $( [ "$with_haproxy" = 1 ] && haproxy -v | head -1 | cut -d' ' -f1-3), $(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)" | tee "$out/log.txt"
uptime | tee -a "$out/log.txt"

# 1. Latency at fixed rates, with both access logs on (the production setting).
if [[ " $parts " == *" latency "* ]]; then
start_gateway on
start_nginx on
start_haproxy on
haproxy_target=()
[ "$with_haproxy" = 1 ] && haproxy_target=(--target "haproxy=https://127.0.0.1:$haproxy_port/open/x"
    --target "tcp-relay=https://127.0.0.1:$relay_port/x")
echo "== latency: agentgate-bench proxy --rates $rates --secs $secs --rounds $rounds" | tee -a "$out/log.txt"
"${run_nice[@]}" "$sim" proxy --rates "$rates" --secs "$secs" --rounds "$rounds" --connections 32 \
    --baseline direct-tls --header "$auth" \
    --target "direct=http://127.0.0.1:$up_port/x" \
    --target "direct-tls=https://127.0.0.1:$up_tls_port/x" \
    --target "agentgate=https://127.0.0.1:$port/open/x" \
    --target "agentgate-jwt=https://127.0.0.1:$port/jwt/x" \
    --target "nginx=https://127.0.0.1:$nginx_port/open/x" \
    "${haproxy_target[@]}" \
    --json "$out/latency.json" 2>&1 | tee -a "$out/log.txt"
fi

# 2. Throughput with wrk, the sides interleaved in each round.
echo "side,logs,round,requests_per_sec,server_cpu_ticks,requests" > "$out/wrk.csv"
[[ " $parts " == *" throughput "* ]] || logs=
for log in $logs; do
    start_gateway "$log"
    start_nginx "$log"
    start_haproxy "$log"
    sides="agentgate agentgate-jwt nginx direct-tls"
    [ "$with_haproxy" = 1 ] && sides="agentgate agentgate-jwt nginx haproxy direct-tls"
    for round in $(seq "$wrk_rounds"); do
        for side in $sides; do
            header=()
            case $side in
            agentgate) url=https://127.0.0.1:$port/open/x; pids=$gw_pid ;;
            agentgate-jwt) url=https://127.0.0.1:$port/jwt/x; pids=$gw_pid; header=(-H "$auth") ;;
            nginx) url=https://127.0.0.1:$nginx_port/open/x; pids=$(nginx_pids) ;;
            haproxy) url=https://127.0.0.1:$haproxy_port/open/x; pids=$hp_pid ;;
            direct-tls) url=https://127.0.0.1:$up_tls_port/x; pids=$up_pid ;;
            esac
            # shellcheck disable=SC2086 # pids is a list
            before=$(ticks $pids)
            result=$("${run_nice[@]}" wrk -t2 -c"$wrk_conns" -d"${wrk_secs}s" "${header[@]}" "$url")
            # shellcheck disable=SC2086
            after=$(ticks $pids)
            rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$result")
            total=$(awk '/requests in/ { print $1 }' <<<"$result")
            non2xx=$(awk '/Non-2xx or 3xx responses:/ { print $5 }' <<<"$result")
            if [ -n "$non2xx" ] || grep -q "Socket errors" <<<"$result"; then
                echo "$side: failed requests:" >&2; echo "$result" >&2; exit 1
            fi
            echo "$side,$log,$round,$rps,$((after - before)),$total" >> "$out/wrk.csv"
            echo "logs $log round $round $side: $rps requests/s" | tee -a "$out/log.txt"
        done
    done
done
stop_gateway
stop_nginx
stop_haproxy

# 3. Instructions per request under callgrind (see the head of this file).
if [[ " $parts " == *" instructions "* ]]; then
    command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
    short=${SHORT:-200}
    long=${LONG:-1200}
    echo "target,requests_short,instructions_short,requests_long,instructions_long,instructions_per_request" > "$out/instructions.csv"
    # Zeroes the counters of PID, sends N requests to URL, dumps; prints the total.
    counted() { # PID N URL
        callgrind_control -z "$1" >/dev/null
        "$sim" proxy --rates 100 --secs "$(( $2 / 100 ))" --warmup-secs 0 --connections 4 \
            --header "$auth" --target "t=$3" >/dev/null
        callgrind_control -d "$1" >/dev/null
        sleep 1
        # The newest dump of PID: its `totals:` line (`summary:` in older valgrinds).
        local dump
        dump=$(ls -t "$work"/callgrind.out."$1".* | head -1)
        awk '/^(totals|summary):/ { print $2; exit }' "$dump"
    }
    measure() { # NAME PID URL
        "$sim" proxy --rates 100 --secs 2 --warmup-secs 0 --connections 4 --header "$auth" \
            --target "warm=$3" >/dev/null
        local a b
        a=$(counted "$2" "$short" "$3")
        b=$(counted "$2" "$long" "$3")
        echo "$1,$short,$a,$long,$b,$(( (b - a) / (long - short) ))" | tee -a "$out/instructions.csv"
    }
    GATEWAY_JWT_SECRET=$secret RUST_LOG=info valgrind --tool=callgrind \
        --callgrind-out-file="$work/callgrind.out.%p" "$bin" serve --config "$work/agentgate.toml" \
        2>"$work/gateway-callgrind.log" &
    gw_pid=$!
    for _ in $(seq 600); do curl -skf "https://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.2; done
    measure agentgate "$gw_pid" "https://127.0.0.1:$port/open/x"
    measure agentgate-jwt "$gw_pid" "https://127.0.0.1:$port/jwt/x"
    stop_gateway
    write_nginx_conf on
    valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out.%p" \
        nginx -c "$work/nginx/nginx.conf" -p "$work/nginx" -g 'daemon off; master_process off;' \
        2>"$work/nginx-callgrind.log" &
    ng_pid=$!
    for _ in $(seq 600); do curl -skf "https://127.0.0.1:$nginx_port/open/x" >/dev/null 2>&1 && break; sleep 0.2; done
    measure nginx "$ng_pid" "https://127.0.0.1:$nginx_port/open/x"
    kill "$ng_pid"; wait "$ng_pid" 2>/dev/null || true
    cp "$work"/callgrind.out.* "$out/" 2>/dev/null || true
    [[ " $parts " == *" throughput "* || " $parts " == *" latency "* ]] || { echo "results in $out"; exit 0; }
fi

python3 - "$out" "$started" "$wrk_conns" "$wrk_secs" "$cores" "$(getconf CLK_TCK)" <<'PY' | tee "$out/summary.md"
import csv, json, os, statistics, sys
out, started, conns, wrk_secs, cores, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
lat_file = os.path.join(out, "latency.json")
lat = json.load(open(lat_file)) if os.path.exists(lat_file) else None
rows = list(csv.DictReader(open(os.path.join(out, "wrk.csv"))))
if lat:
    print(f"Latency, open loop, {lat['connections']} connections, {lat['secs']} s per rate, "
          f"median of {lat['rounds']} rounds; overhead against {lat['baseline']}:\n")
    print("| rate/s | target | p50 µs | p99 µs | p50 overhead µs | p99 overhead µs | failures |")
    print("|---|---|---|---|---|---|---|")
    for c in lat["compared"]:
        print(f"| {c['rate']} | {c['target']} | {c['p50_us']} | {c['p99_us']} "
              f"| {c['p50_overhead_us']:+d} | {c['p99_overhead_us']:+d} | {c['failures']} |")
throughput = {}
print(f"\nThroughput, wrk -t2 -c{conns} -d{wrk_secs}s, requests/s per round "
      f"(server CPU µs per request):\n")
print("| logs | side | rounds | median requests/s | CPU µs/request | median ratio to nginx |")
print("|---|---|---|---|---|---|")
for log in sorted({r["logs"] for r in rows}, reverse=True):
    by_side = {}
    for r in rows:
        if r["logs"] == log:
            by_side.setdefault(r["side"], []).append(r)
    nginx = {r["round"]: float(r["requests_per_sec"]) for r in by_side.get("nginx", [])}
    throughput[log] = {}
    for side, rs in by_side.items():
        rps = [float(r["requests_per_sec"]) for r in rs]
        cpu = [int(r["server_cpu_ticks"]) * 1e6 / hz / int(r["requests"]) for r in rs]
        ratios = [float(r["requests_per_sec"]) / nginx[r["round"]] for r in rs if r["round"] in nginx]
        throughput[log][side] = {"requests_per_sec": rps, "cpu_us_per_request": cpu,
                                 "ratio_to_nginx": ratios}
        print(f"| {log} | {side} | {', '.join(f'{x:.0f}' for x in rps)} | {statistics.median(rps):.0f} "
              f"| {statistics.median(cpu):.1f} | {statistics.median(ratios):.2f} |")
json.dump({"started": started, "cpus": cores, "wrk": {"connections": conns, "threads": 2,
           "secs": wrk_secs}, "latency": lat, "throughput": throughput},
          open(os.path.join(out, "proxy.json"), "w"), indent=2)
PY
echo "results in $out"

#!/usr/bin/env bash
# nginx as the TLS reference for `agentgate-bench handshakes` (BENCHMARKS.md).
#
#   scripts/bench/nginx.sh start DIR PORT CERT KEY   # prints the pids of master and workers
#   scripts/bench/nginx.sh stop DIR
#
# It terminates TLS the way the system agentgate replaces did (ssl_verify_client
# optional_no_ca), on 127.0.0.1 only, with the same certificate and key as the gateway
# (ECDSA P-256), worker_processes 2 to match the 2 worker threads of tokio's runtime on
# this 2-core machine, no session cache or tickets (every handshake is a full one), no
# access log. The config and pid file live in DIR. nginx is only needed by the benchmark:
# `apt-get install nginx`.
set -euo pipefail

cmd=${1:?usage: nginx.sh start DIR PORT CERT KEY | stop DIR}
dir=${2:?DIR}
case "$cmd" in
start)
    port=${3:?PORT}; cert=${4:?CERT}; key=${5:?KEY}
    command -v nginx >/dev/null || { echo "nginx is not installed (apt-get install nginx)" >&2; exit 1; }
    mkdir -p "$dir"
    cat > "$dir/nginx.conf" <<CONF
worker_processes 2;
worker_rlimit_nofile 20000;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    ssl_session_cache off;
    ssl_session_tickets off;
    server {
        listen 127.0.0.1:$port ssl backlog=4096;
        ssl_certificate $cert;
        ssl_certificate_key $key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_verify_client optional_no_ca;
        location = /health {
            default_type application/json;
            return 200 '{"status":"ok"}';
        }
    }
}
CONF
    nginx -c "$dir/nginx.conf" -p "$dir" -g 'daemon on;'
    for _ in $(seq 50); do [ -s "$dir/nginx.pid" ] && break; sleep 0.1; done
    master=$(cat "$dir/nginx.pid")
    sleep 0.3
    echo "$master $(pgrep -P "$master" | tr '\n' ' ')"
    ;;
stop)
    [ -s "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null || true
    ;;
*)
    echo "usage: nginx.sh start DIR PORT CERT KEY | stop DIR" >&2; exit 2 ;;
esac

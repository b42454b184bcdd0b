# Shared by cluster.sh and cluster-storm.sh (sourced, not run): a local redis-server,
# gateway configs with or without [cluster], and starting a gateway. The caller sets
# $work, $key, $redis_port, $bin and the array $pids (killed on exit).

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --maxmemory-policy noeviction --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

# config NAME PORT [cluster]: a gateway config in $work/NAME with its own store.
config() {
    local name=$1 port=$2 clustered=${3:-}
    mkdir -p "$work/$name"
    cat > "$work/$name/agentgate.toml" <<CONF
listen = "127.0.0.1:$port"
data_dir = "$work/$name/data"
api_keys = ["$key"]
log_format = "text"
# The load generator opens thousands of connections from a few loopback addresses.
[limits]
handshakes_per_source = 1000000
handshake_failures = 1000000
[store]
dir = "$work/$name/certs"
[tls]
mode = "self-signed"
CONF
    if [ -n "$clustered" ]; then
        cat >> "$work/$name/agentgate.toml" <<CONF
[cluster]
redis_url = "redis://127.0.0.1:$redis_port"
node_id = "$name"
CONF
    fi
}

# start NAME PORT: starts the gateway of $work/NAME; prints its pid (the caller adds it
# to $pids: this runs in a command substitution).
start() {
    local name=$1 port=$2
    RUST_LOG=warn "$bin" serve --config "$work/$name/agentgate.toml" >/dev/null 2>>"$work/$name.log" &
    local pid=$!
    for _ in $(seq 100); do
        curl -skf "https://127.0.0.1:$port/health" >/dev/null 2>&1 && { echo "$pid"; return 0; }
        sleep 0.1
    done
    echo "gateway $name did not start; see $work/$name.log" >&2
    exit 1
}

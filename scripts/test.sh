#!/usr/bin/env bash
# The project's test command (CI runs it through .ci/run): ./scripts/test.sh
#
# 1. installs what the tests need and is missing (Debian packages, a Python venv with
#    the test agent's pinned dependencies in ./.venv, the Node test agent's npm packages
#    from its package-lock.json in tests/agents/node/node_modules);
# 2. cargo fmt --check, cargo clippy -D warnings, cargo test, over the whole workspace with
#    every feature (`fuzzing` adds the fuzz entry points that tests/fuzz_regressions.rs replays)
#    (the gateway, crates/agentgate-bench, crates/testkit).
#
# Idempotent: a second run installs nothing and skips pip and npm. Quiet: prints only failures
# and the test summary. Meant for Debian 12 as root (CI); works as a normal user when
# nothing has to be installed with apt.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

die() {
    echo "test.sh: FAILED: $*" >&2
    exit 1
}

# Run a command with its output hidden; on failure show the output and stop.
quiet() {
    local what="$1"
    shift
    local out
    out="$(mktemp)"
    if ! "$@" >"$out" 2>&1; then
        cat "$out" >&2
        rm -f "$out"
        die "$what"
    fi
    rm -f "$out"
}

# ---------------------------------------------------------------- system packages

APT_UPDATED=0

# apt_install PKG...: install Debian packages; `apt-get update` runs once, and only when
# something has to be installed.
apt_install() {
    command -v apt-get >/dev/null 2>&1 || die "need Debian packages ($*) but apt-get is missing"
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || die "need root to install Debian packages: $*"
        sudo=(sudo)
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        quiet "apt-get update" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq update
        APT_UPDATED=1
    fi
    quiet "apt-get install $*" "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get -qq install -y --no-install-recommends "$@"
}

# need_cmd COMMAND [PACKAGE]: install PACKAGE (default: COMMAND) when COMMAND is missing.
need_cmd() {
    command -v "$1" >/dev/null 2>&1 || apt_install "${2:-$1}"
}

install_base_tools() {
    need_cmd openssl             # openssl s_client as a TLS peer in the tests
    need_cmd curl                # curl as a TLS/HTTP peer in the tests
    need_cmd python3             # the Python test agent
    need_cmd node nodejs         # the Node test agent (tests/agents/node, Node >= 20)
    need_cmd npm                 # installs its socket.io-client from package-lock.json
    # Debian's python3 ships venv without ensurepip; python3-venv brings it back.
    # (A pyenv or other non-Debian python3 already has both.)
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        apt_install python3-venv
    fi
}

# Services that later tests need. Add them here, one need_cmd each, e.g.:
#   need_cmd pebble                    # ACME test server (Debian package `pebble`)
#   need_cmd redis-server              # scale-out tests (Debian package `redis-server`)
# Tests start their own instances on 127.0.0.1 and find them on PATH.
install_services() {
    need_cmd pebble                    # ACME test server for tests/acme.rs (Debian package `pebble`)
    need_cmd redis-server              # scale-out tests, tests/cluster*.rs, tests/acme_cluster.rs (Debian package `redis-server`)
    need_cmd redis-cli redis-tools     # redis-cli --cluster create for the Redis Cluster test
    need_cmd haproxy                   # L4 load balancer in front of several nodes (deploy/haproxy.cfg)
    need_cmd chromium                  # headless browser of the console tests (tests/console.rs)
    need_cmd chromedriver chromium-driver  # selenium's driver for it
}

# ---------------------------------------------------------------- Python test agent

VENV="$repo/.venv"
REQUIREMENTS="$repo/tests/agents/requirements.txt"

setup_venv() {
    local stamp="$VENV/.agentgate-requirements.sha256"
    local want
    want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"

    # Up to date: the venv's python runs, imports the agent's modules, and was filled
    # from this very requirements file.
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
        "$VENV/bin/python" -c 'import socketio, aiohttp, selenium' >/dev/null 2>&1; then
        return 0
    fi

    # A venv whose interpreter is gone (its base python moved) is rebuilt from scratch.
    if [ -e "$VENV" ] && ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "$VENV"
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        quiet "python3 -m venv $VENV" python3 -m venv "$VENV"
    fi
    quiet "pip install -r $REQUIREMENTS" "$VENV/bin/python" -m pip install \
        --quiet --disable-pip-version-check --no-input -r "$REQUIREMENTS"
    "$VENV/bin/python" -c 'import socketio, aiohttp, selenium' >/dev/null 2>&1 ||
        die "the venv at $VENV cannot import socketio, aiohttp and selenium after pip install"
    echo "$want" >"$stamp"
}

# ---------------------------------------------------------------- Node test agent

NODE_AGENT="$repo/tests/agents/node"

setup_node_agent() {
    local major
    major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null)" ||
        die "node is on PATH but does not run"
    [ "$major" -ge 20 ] || die "the Node test agent needs Node >= 20, found $(node --version)"

    local stamp="$NODE_AGENT/node_modules/.agentgate-package-lock.sha256"
    local want
    want="$(sha256sum "$NODE_AGENT/package-lock.json" | cut -d' ' -f1)"
    # Up to date: filled by npm ci from this very package-lock.json.
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
        [ -f "$NODE_AGENT/node_modules/socket.io-client/package.json" ]; then
        return 0
    fi
    # npm ci removes node_modules first and installs exactly the lock file's versions.
    (cd "$NODE_AGENT" && quiet "npm ci in $NODE_AGENT" npm ci --silent --no-audit --no-fund)
    [ -f "$NODE_AGENT/node_modules/socket.io-client/package.json" ] ||
        die "npm ci in $NODE_AGENT did not install socket.io-client"
    echo "$want" >"$stamp"
}

# ---------------------------------------------------------------- main

install_base_tools
install_services
setup_venv
setup_node_agent
export AGENTGATE_TEST_PYTHON="$VENV/bin/python"

command -v cargo >/dev/null 2>&1 || die "cargo is not on PATH (the Rust toolchain is needed)"

cargo fmt --all -- --check ||
    die "cargo fmt: code is not formatted (run: cargo fmt --all)"
cargo clippy --workspace --all-targets --all-features --locked --quiet -- -D warnings ||
    die "cargo clippy: warnings or errors (see above)"
cargo test --workspace --all-targets --all-features --locked --quiet ||
    die "cargo test: tests failed (see above)"

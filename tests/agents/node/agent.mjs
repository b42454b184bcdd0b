#!/usr/bin/env node
// A test agent in Node: the npm `socket.io-client` 4 connecting to agentgate with a
// client certificate (its `ca`, `cert` and `key` options), the Node counterpart of
// tests/agents/agent.py. It connects to https://<host>:<port> (path /socket.io/,
// Engine.IO v4) over the transports given, emits `heartbeat`
// {cpu_usage, memory_usage, disk_usage, timestamp} and waits for `heartbeat_ack`, and
// reports what happened as JSON lines on stdout for tests/node_agent.rs.
//
// Usage:
//   node agent.mjs --url https://localhost:8443 --ca ca.pem [--cert agent.crt --key agent.key]
//                  [--transports websocket|polling|polling,websocket] [--wait-upgrade]
//                  [--heartbeats N] [--timeout SECONDS]
//
// Output (one JSON object per line; stdout carries nothing else):
//   {"event": "connected", "transport": "polling"|"websocket", "opened_with": ..., "sid": ...}
//   {"event": "upgraded", "transport": "websocket"}     the engine moved to WebSocket
//   {"event": "upgrade_error", "message": ...}          the WebSocket probe failed
//   {"event": "heartbeat_ack", "data": {...}, "transport": ...}   one per heartbeat, or
//   {"event": "error", "data": ...}                     when the server answers with "error"
//   {"event": "disconnected", "reason": ...}
//   {"event": "connect_error", "message": ..., "data": ..., "description": ...}
//   {"event": "timeout"}
//
// Exit codes (as agent.py, plus 6):
//   0 success, 2 bad command line, 3 connect error (TLS handshake refused, namespace
//   connect refused, ...), 4 timeout (--timeout for the whole run), 5 the server closed
//   the session, 6 --wait-upgrade and the upgrade to WebSocket failed.
//
// Differences from a production agent, on purpose: reconnection is off (a test wants the
// first outcome, not a retry loop), and the connect timeout is --timeout.

import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { io } from "socket.io-client";

const EXIT_OK = 0;
const EXIT_USAGE = 2;
const EXIT_CONNECT_ERROR = 3;
const EXIT_TIMEOUT = 4;
const EXIT_UNEXPECTED_DISCONNECT = 5;
const EXIT_UPGRADE_FAILED = 6;

function emitLine(obj) {
    // stdout to a pipe is synchronous on Linux (Node's process I/O rules): a line is out
    // before process.exit.
    process.stdout.write(JSON.stringify(obj) + "\n");
}

function usage(message) {
    process.stderr.write(`agent.mjs: ${message}\n`);
    process.exit(EXIT_USAGE);
}

function parseCommandLine() {
    let values;
    try {
        ({ values } = parseArgs({
            options: {
                url: { type: "string" },
                ca: { type: "string" },
                cert: { type: "string" },
                key: { type: "string" },
                transports: { type: "string", default: "polling,websocket" },
                "wait-upgrade": { type: "boolean", default: false },
                heartbeats: { type: "string", default: "1" },
                timeout: { type: "string", default: "15" },
            },
            strict: true,
        }));
    } catch (err) {
        usage(err.message);
    }
    if (!values.url || !values.ca) usage("--url and --ca are required");
    if ((values.cert === undefined) !== (values.key === undefined)) {
        usage("--cert and --key go together");
    }
    const transports = values.transports.split(",").map((t) => t.trim()).filter(Boolean);
    for (const t of transports) {
        if (t !== "polling" && t !== "websocket") usage(`unknown transport '${t}'`);
    }
    if (values["wait-upgrade"] && !(transports[0] === "polling" && transports.includes("websocket"))) {
        usage("--wait-upgrade needs --transports polling,websocket (an upgrade from polling)");
    }
    const heartbeats = Number(values.heartbeats);
    if (!Number.isInteger(heartbeats) || heartbeats < 0) usage("--heartbeats must be an integer >= 0");
    const timeout = Number(values.timeout);
    if (!(timeout > 0)) usage("--timeout must be a positive number of seconds");
    return {
        url: values.url,
        ca: readFileSync(values.ca),
        cert: values.cert === undefined ? undefined : readFileSync(values.cert),
        key: values.key === undefined ? undefined : readFileSync(values.key),
        transports,
        waitUpgrade: values["wait-upgrade"],
        heartbeats,
        timeoutMs: timeout * 1000,
    };
}

function heartbeatPayload() {
    return {
        cpu_usage: 0.5,
        memory_usage: 256,
        disk_usage: 1024,
        timestamp: new Date().toISOString(),
    };
}

// engine.io-client hands over what went wrong below it as `description`: an Error (the
// TLS alert, from xmlhttprequest-ssl), a ws ErrorEvent, or an HTTP status.
function describe(d) {
    if (d === undefined || d === null) return null;
    if (typeof d === "object") {
        if (d.message) return String(d.message);
        if (d.error && d.error.message) return String(d.error.message);
    }
    return String(d);
}

// Socket and engine events, in the order they happened; the run awaits the ones it needs.
class Events {
    constructor() {
        this.items = [];
        this.waiters = [];
    }

    put(type, data) {
        const waiter = this.waiters.shift();
        if (waiter) waiter({ type, data });
        else this.items.push({ type, data });
    }

    // The next event whose type is in `types`; the others were already reported.
    async next(types) {
        for (;;) {
            const e = this.items.length
                ? this.items.shift()
                : await new Promise((resolve) => this.waiters.push(resolve));
            if (types.includes(e.type)) return e;
        }
    }
}

function connect(args, events, state) {
    const socket = io(args.url, {
        transports: args.transports,
        reconnection: false,
        forceNew: true,
        timeout: args.timeoutMs,
        // Passed by engine.io-client to Node's TLS for both transports (xmlhttprequest-ssl
        // for polling, ws for WebSocket). `ca` replaces Node's root store, so the gateway's
        // test CA is the only one trusted.
        ca: args.ca,
        cert: args.cert,
        key: args.key,
        rejectUnauthorized: true,
    });
    const manager = socket.io;

    manager.on("open", () => {
        const engine = manager.engine;
        state.openedWith = engine.transport.name;
        engine.on("upgrade", (transport) => {
            state.upgraded = true;
            emitLine({ event: "upgraded", transport: transport.name });
            events.put("upgrade", transport.name);
        });
        engine.on("upgradeError", (err) => {
            emitLine({ event: "upgrade_error", message: err.message, description: describe(err.description) });
            events.put("upgrade_error", err.message);
        });
    });

    socket.on("connect", () => {
        emitLine({
            event: "connected",
            transport: manager.engine.transport.name,
            opened_with: state.openedWith ?? manager.engine.transport.name,
            sid: socket.id,
        });
        events.put("connect");
    });
    socket.on("connect_error", (err) => {
        emitLine({
            event: "connect_error",
            message: err.message,
            data: err.data ?? null,
            description: describe(err.description),
        });
        events.put("connect_error", err.message);
    });
    socket.on("heartbeat_ack", (data) => {
        emitLine({ event: "heartbeat_ack", data, transport: manager.engine.transport.name });
        events.put("heartbeat_ack", data);
    });
    socket.on("error", (data) => {
        emitLine({ event: "error", data: data ?? null });
        events.put("error", data);
    });
    socket.on("disconnect", (reason) => {
        if (state.closing) return; // our own disconnect at the end
        emitLine({ event: "disconnected", reason });
        events.put("disconnect", reason);
    });
    return socket;
}

// Everything that --timeout covers. Returns the exit code.
async function run(args, socket, events, state) {
    const first = await events.next(["connect", "connect_error"]);
    if (first.type === "connect_error") return EXIT_CONNECT_ERROR;

    if (args.waitUpgrade && !state.upgraded && socket.io.engine.transport.name !== "websocket") {
        const e = await events.next(["upgrade", "upgrade_error", "disconnect"]);
        if (e.type === "upgrade_error") return EXIT_UPGRADE_FAILED;
        if (e.type === "disconnect") return EXIT_UNEXPECTED_DISCONNECT;
    }

    for (let i = 0; i < args.heartbeats; i++) {
        socket.emit("heartbeat", heartbeatPayload());
        const e = await events.next(["heartbeat_ack", "error", "disconnect"]);
        if (e.type === "disconnect") return EXIT_UNEXPECTED_DISCONNECT;
    }
    return EXIT_OK;
}

async function main() {
    const args = parseCommandLine();
    const events = new Events();
    const state = { openedWith: null, upgraded: false, closing: false };
    const socket = connect(args, events, state);

    let timer;
    const timedOut = new Promise((resolve) => {
        timer = setTimeout(() => {
            emitLine({ event: "timeout" });
            resolve(EXIT_TIMEOUT);
        }, args.timeoutMs);
    });
    const code = await Promise.race([run(args, socket, events, state), timedOut]);
    clearTimeout(timer);

    // Close the session the way an agent that stops does (a Socket.IO disconnect packet,
    // then the transport); Node then exits by itself once nothing is left open. The
    // fallback exit only fires if something stays open: after a disconnect over polling,
    // xmlhttprequest-ssl sometimes keeps the socket of the last long-poll GET although
    // the gateway has answered it (a noop, as Engine.IO v4 asks).
    state.closing = true;
    socket.disconnect();
    process.exitCode = code;
    setTimeout(() => process.exit(code), 1000).unref();
}

main().catch((err) => {
    process.stderr.write(`agent.mjs: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
});

#!/usr/bin/env python3
"""A test agent that connects to agentgate exactly like the existing orchestrator agents.

Existing agents use python-socketio's ``socketio.AsyncClient`` with an aiohttp session
whose SSL context holds the agent certificate and key, connect to ``https://<host>``
(Engine.IO v4, HTTP long-polling first, then the upgrade to WebSocket), emit
``heartbeat`` and listen for ``heartbeat_ack``. This script does the same, driven from
the command line, and reports what happened as JSON lines on stdout so that the Rust
integration tests can assert on it.

Output (one JSON object per line, flushed):
    {"event": "connected", "transport": "websocket"|"polling"[, "sid": ..., "eio_sid": ...]}
    {"event": "heartbeat_ack", "data": {...}}        one per heartbeat, or
    {"event": "error", "data": ...}                  when the server answers with "error"
    {"event": "disconnected"}                        the server closed the session
    {"event": "connect_error", "message": "...", "data": ...}
    {"event": "timeout"}

Exit codes:
    0  success (with --wait-disconnect: the server closed the session)
    2  bad command line (argparse)
    3  connect error (TLS handshake refused, namespace connect refused, ...)
    4  timeout (--timeout seconds for the whole run)
    5  the server closed the session while it was not expected (no --wait-disconnect)

Differences from a production agent, on purpose: reconnection is off unless --reconnect (a test wants to
see the first outcome, not a retry loop), and the namespace-connect wait is --timeout
rather than python-socketio's 1 s default (a debug server on a busy 2-core machine can be
slower than that). Diagnostics go to stderr; stdout carries only the JSON lines.
"""

import argparse
import asyncio
import json
import ssl
import sys

import aiohttp
import socketio

DEFAULT_PAYLOAD = {"cpu_usage": 0.5, "memory_usage": 256, "disk_usage": 1024}

EXIT_OK = 0
EXIT_CONNECT_ERROR = 3
EXIT_TIMEOUT = 4
EXIT_UNEXPECTED_DISCONNECT = 5


def emit_line(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def log(msg):
    sys.stderr.write(f"agent.py: {msg}\n")
    sys.stderr.flush()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="e.g. https://localhost:8443")
    p.add_argument("--ca", required=True, help="PEM file of the CA (or self-signed cert) to trust")
    p.add_argument("--cert", help="agent certificate (PEM)")
    p.add_argument("--key", help="agent private key (PEM)")
    p.add_argument(
        "--transports",
        help="comma-separated Engine.IO transports, e.g. 'polling,websocket' or 'websocket' "
        "(default: python-socketio's default, polling then upgrade to websocket)",
    )
    p.add_argument("--heartbeats", type=int, default=1, help="heartbeats to send (default 1)")
    p.add_argument(
        "--burst",
        type=int,
        default=0,
        help="instead of --heartbeats: emit this many heartbeats back to back without waiting, "
        'then count the heartbeat_acks; reports {"event": "burst", "acks": n} and exits 0 '
        "once all came, 5 if the session ended first",
    )
    p.add_argument(
        "--payload",
        default=json.dumps(DEFAULT_PAYLOAD),
        help="JSON payload of each heartbeat (default %(default)s)",
    )
    p.add_argument("--timeout", type=float, default=15.0, help="seconds for the whole run (default 15)")
    p.add_argument(
        "--wait-disconnect",
        action="store_true",
        help="after the heartbeats, wait until the server closes the session",
    )
    p.add_argument(
        "--reconnect",
        action="store_true",
        help="with --wait-disconnect: let python-socketio reconnect after the disconnect "
        "(production agents run with reconnection=True), then send one heartbeat",
    )
    p.add_argument(
        "--commands",
        action="store_true",
        help="answer every other event (a command from the API) with the ack "
        '{"ok": true, "event": <name>, "data": <data>} and report it as a "command" line',
    )
    p.add_argument(
        "--commands-after-reconnect",
        type=int,
        default=0,
        help="with --reconnect and --commands: after the heartbeat that follows the "
        "reconnection, stay until this many commands were answered",
    )
    p.add_argument("--ack-delay", type=float, default=0.0, help="seconds to wait before acking a command")
    p.add_argument(
        "--print-sid",
        action="store_true",
        help="add the Socket.IO sid and the Engine.IO sid to the connected line",
    )
    args = p.parse_args(argv)
    if (args.cert is None) != (args.key is None):
        p.error("--cert and --key go together")
    if args.heartbeats < 0:
        p.error("--heartbeats must be >= 0")
    if args.burst < 0:
        p.error("--burst must be >= 0")
    try:
        args.payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        p.error(f"--payload is not JSON: {exc}")
    if args.transports is not None:
        args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
        for t in args.transports:
            if t not in ("polling", "websocket"):
                p.error(f"unknown transport {t!r}")
    return args


def make_ssl_context(args):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=args.ca)
    if args.cert:
        ctx.load_cert_chain(certfile=args.cert, keyfile=args.key)
    return ctx


async def run(args, sio, events, state):
    """Everything that the --timeout covers. Returns the exit code."""
    try:
        await sio.connect(
            args.url,
            transports=args.transports,
            wait_timeout=args.timeout,
        )
    except socketio.exceptions.ConnectionError as exc:
        emit_line({"event": "connect_error", "message": str(exc), "data": state.get("connect_error")})
        return EXIT_CONNECT_ERROR

    line = {"event": "connected", "transport": sio.transport()}
    if args.print_sid:
        line["sid"] = sio.get_sid()
        line["eio_sid"] = sio.eio.sid
    emit_line(line)

    if args.burst:
        return await burst(args, sio, events)

    for _ in range(args.heartbeats):
        await sio.emit("heartbeat", args.payload)
        event, data = await events.get()
        if event == "disconnected":
            emit_line({"event": "disconnected", "reason": data})
            return EXIT_OK if args.wait_disconnect else EXIT_UNEXPECTED_DISCONNECT
        emit_line({"event": event, "data": data})

    if args.wait_disconnect:
        while True:
            event, data = await events.get()
            if event == "disconnected":
                emit_line({"event": "disconnected", "reason": data})
                if args.reconnect:
                    return await after_reconnect(args, sio, events)
                return EXIT_OK
            # a late ack or error: report it, keep waiting
            emit_line({"event": event, "data": data})

    await sio.disconnect()
    return EXIT_OK


async def burst(args, sio, events):
    """--burst: every heartbeat emitted at once (python-socketio queues them and its write
    loop sends them back to back), then every heartbeat_ack counted."""
    for _ in range(args.burst):
        await sio.emit("heartbeat", args.payload)
    acks = 0
    while acks < args.burst:
        event, data = await events.get()
        if event == "heartbeat_ack":
            acks += 1
        elif event == "disconnected":
            emit_line({"event": "burst", "acks": acks, "disconnected": data})
            return EXIT_UNEXPECTED_DISCONNECT
    emit_line({"event": "burst", "acks": acks})
    await sio.disconnect()
    return EXIT_OK


async def after_reconnect(args, sio, events):
    """--reconnect: python-socketio reconnects by itself (as production agents are
    configured); wait for that, send one heartbeat, report its ack."""
    while True:
        event, data = await events.get()
        if event == "reconnected":
            emit_line({"event": "reconnected", "transport": sio.transport()})
            break
    await sio.emit("heartbeat", args.payload)
    answered = 0
    while True:
        event, data = await events.get()
        if event == "command":
            # A command may overtake the heartbeat's ack.
            emit_line({"event": event, "data": data})
            answered += 1
        elif event in ("heartbeat_ack", "error"):
            emit_line({"event": event, "data": data})
            break
    while answered < args.commands_after_reconnect:
        event, data = await events.get()
        emit_line({"event": event, "data": data})
        if event == "command":
            answered += 1
    if args.commands_after_reconnect:
        # The last acknowledgement is queued behind the handler's return; one more
        # heartbeat round trip on the same ordered transport makes sure it went out
        # before the disconnect.
        await sio.emit("heartbeat", args.payload)
        while (await events.get())[0] != "heartbeat_ack":
            pass
    await sio.disconnect()
    return EXIT_OK


async def amain(args):
    ctx = make_ssl_context(args)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx))
    sio = socketio.AsyncClient(
        reconnection=args.reconnect,
        reconnection_delay=0.2,
        reconnection_delay_max=1,
        http_session=session,
    )
    events = asyncio.Queue()
    state = {}

    @sio.on("heartbeat_ack")
    async def on_heartbeat_ack(data=None):
        await events.put(("heartbeat_ack", data))

    @sio.on("error")
    async def on_error(data=None):
        await events.put(("error", data))

    connects = {"n": 0}

    @sio.on("connect")
    async def on_connect():
        connects["n"] += 1
        if connects["n"] > 1:
            await events.put(("reconnected", None))

    @sio.on("server_shutdown")
    async def on_server_shutdown(data=None):
        await events.put(("server_shutdown", data))

    if args.commands:
        # python-socketio's catch-all handler: what it returns is the acknowledgement,
        # the way an orchestrator agent answers a command.
        @sio.on("*")
        async def on_command(event, data=None):
            await events.put(("command", {"name": event, "data": data}))
            if args.ack_delay:
                await asyncio.sleep(args.ack_delay)
            return {"ok": True, "event": event, "data": data}

    @sio.on("connect_error")
    async def on_connect_error(data=None):
        state["connect_error"] = data

    @sio.on("disconnect")
    async def on_disconnect(*reason):
        if reason:
            log(f"disconnected: {reason[0]}")
        await events.put(("disconnected", reason[0] if reason else None))

    try:
        try:
            return await asyncio.wait_for(run(args, sio, events, state), timeout=args.timeout)
        except asyncio.TimeoutError:
            emit_line({"event": "timeout"})
            return EXIT_TIMEOUT
    finally:
        if sio.connected:
            try:
                await asyncio.wait_for(sio.disconnect(), timeout=2)
            except Exception as exc:  # best effort on the way out
                log(f"disconnect on exit failed: {exc!r}")
        await wait_engineio_tasks(sio, timeout=2)
        await session.close()
        # If a background task still sent a request after the session was closed,
        # python-engineio made a session of its own: close that one too.
        if sio.eio.http is not None and sio.eio.http is not session and not sio.eio.http.closed:
            await sio.eio.http.close()


async def wait_engineio_tasks(sio, timeout):
    """Let python-engineio's read/write loops finish before the aiohttp session is closed.

    After a server-side disconnect on the polling transport, the write loop may still
    POST the close packet; if the session is already closed at that moment, engineio
    silently creates a default aiohttp.ClientSession and leaks it ("Unclosed client
    session"). Bounded: a pending long-poll GET must not hold the agent up.
    """
    tasks = [
        t
        for t in (getattr(sio.eio, "read_loop_task", None), getattr(sio.eio, "write_loop_task", None))
        if isinstance(t, asyncio.Future) and not t.done()
    ]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


def main(argv=None):
    args = parse_args(argv)
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())

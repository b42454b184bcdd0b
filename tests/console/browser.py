#!/usr/bin/env python3
"""Drives the fleet console at /ui/ in headless Chromium (selenium) for tests/console.rs.

The Rust test starts the gateway, uploads the agents' certificates and runs this script
with one scenario; the script reports what it saw as JSON lines on stdout
({"step": ..., ...}) and exits non-zero (with the reason on stderr) as soon as something
is not as it must be. The Rust side asserts on the lines as well.

Scenarios:
  flow  sign-in with a wrong key (error shown) and the right key; an agent (tests/agents/
        agent.py, python-socketio) appears in the table and turns disconnected when it
        leaves; a command from the agent page shows the agent's ack; revoke cuts the
        agent; a state-changing request without the CSRF token is refused; certificate
        upload and enrollment forms; sign-out (prints the old cookie for the Rust side to
        replay); the screenshot.
  bulk  with thousands of agents: the table holds only a bounded number of rows in the
        DOM, at the top and after scrolling to the end; search finds one agent.

Deadlines ("within 2 s") are failure bounds of the waits, not measurements.
"""

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

LIVE_DEADLINE = 2.0


def emit(step, **fields):
    sys.stdout.write(json.dumps({"step": step, **fields}) + "\n")
    sys.stdout.flush()


def fail(message):
    sys.stderr.write(f"browser.py: FAILED: {message}\n")
    sys.stderr.flush()
    sys.exit(1)


def wait_for(what, predicate, timeout):
    """Polls `predicate` every 50 ms until it returns something truthy; fails after
    `timeout` seconds naming `what`."""
    end = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception:  # an element replaced while read (a re-render): look again
            value = None
        if value:
            return value
        if time.monotonic() > end:
            fail(f"{what} (not within {timeout} s)")
        time.sleep(0.05)


def browser(args):
    options = webdriver.ChromeOptions()
    options.binary_location = args.chromium
    profile = tempfile.mkdtemp(prefix="agentgate-chromium-")
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        # The test gateway's certificate comes from a CA made at test time.
        "--ignore-certificate-errors",
        "--window-size=1440,900",
    ]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=args.chromedriver))
    driver.implicitly_wait(0)
    return driver, profile


def css(driver, selector):
    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver, selector):
    found = css(driver, selector)
    return found[0].text if found else None


def csp_violations(driver):
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"] or "Refused to" in entry["message"]
    ]


def sign_in(driver, url, key, expect_error=None):
    field = wait_for("the sign-in form", lambda: css(driver, 'form#signin-form input[name="api_key"]'), 15)[0]
    field.clear()
    field.send_keys(key)
    css(driver, "#signin-submit")[0].click()
    if expect_error is not None:
        return wait_for("the sign-in error", lambda: text_of(driver, "#signin-error"), 10)
    wait_for("the fleet table after sign-in", lambda: css(driver, "table#fleet"), 10)
    return None


class Agent:
    """tests/agents/agent.py in the background, its JSON lines read by a thread."""

    def __init__(self, args, cert, key, extra):
        self.lines = queue.Queue()
        self.proc = subprocess.Popen(
            [sys.executable, args.agent_script, "--url", args.url, "--ca", args.ca,
             "--cert", cert, "--key", key, "--timeout", "120", *extra],
            stdout=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.lines.put(json.loads(line))
            except json.JSONDecodeError:
                pass

    def wait_event(self, event, timeout):
        """The agent's next line reporting `event`; the lines skipped on the way are kept
        for the failure message."""
        end = time.monotonic() + timeout
        skipped = []
        while time.monotonic() < end:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if line.get("event") == event:
                return line
            if line.get("event") == "connect_error":
                fail(f"agent could not connect: {line}")
            skipped.append(line)
        fail(f"agent did not report {event!r} within {timeout} s; it reported {skipped} (exit code {self.proc.poll()})")


def row_status(driver, agent_id):
    rows = css(driver, f'tr.agent[data-agent-id="{agent_id}"]')
    return rows[0].get_attribute("data-status") if rows else None


def flow(args, driver):
    url = args.url.rstrip("/") + "/ui/"
    driver.get(url)

    error = sign_in(driver, url, args.wrong_key, expect_error=True)
    if "Invalid API key" not in error:
        fail(f"wrong key: the page shows {error!r}")
    emit("wrong_key", error=error)

    sign_in(driver, url, args.api_key)
    emit("signed_in", who=text_of(driver, "#who"))

    # An agent that connects appears, and turns disconnected when it leaves.
    leaver_id, leaver_cert, leaver_key = args.leaver.split(",")
    leaver = Agent(args, leaver_cert, leaver_key, ["--heartbeats", "1", "--wait-disconnect"])
    leaver.wait_event("connected", 60)
    started = time.monotonic()
    wait_for(f"{leaver_id} connected in the table", lambda: row_status(driver, leaver_id) == "connected", LIVE_DEADLINE)
    emit("agent_appeared", agent_id=leaver_id, within_s=round(time.monotonic() - started, 3))
    leaver.wait_event("heartbeat_ack", 30)
    leaver.proc.kill()
    leaver.proc.wait()
    started = time.monotonic()
    wait_for(f"{leaver_id} disconnected in the table", lambda: row_status(driver, leaver_id) == "disconnected", LIVE_DEADLINE)
    emit("agent_left", agent_id=leaver_id, within_s=round(time.monotonic() - started, 3))

    # The agent that takes commands and is revoked.
    agent_id, cert, key = args.agent.split(",")
    agent = Agent(args, cert, key, ["--heartbeats", "2", "--wait-disconnect", "--commands"])
    agent.wait_event("connected", 60)
    wait_for(f"{agent_id} connected in the table", lambda: row_status(driver, agent_id) == "connected", LIVE_DEADLINE)
    agent.wait_event("heartbeat_ack", 30)
    agent.wait_event("heartbeat_ack", 30)

    # The counters and the filter.
    connected = wait_for("the connected counter", lambda: text_of(driver, "#counter-connected .n") == "1" and "1", 5)
    select = Select(css(driver, "#status-filter")[0])
    select.select_by_value("connected")
    wait_for("the status filter", lambda: [r.get_attribute("data-agent-id") for r in css(driver, "tr.agent")] == [agent_id], 5)
    emit("filtered", connected=connected, shown=text_of(driver, "#shown-count"))
    select.select_by_value("all")
    wait_for("all rows back", lambda: len(css(driver, "tr.agent")) >= 2, 5)
    if args.screenshot:
        # The fleet as a user first sees it (README).
        driver.save_screenshot(args.screenshot)
        emit("screenshot", path=args.screenshot)

    # The agent page: details and a command with its ack.
    css(driver, f'tr.agent[data-agent-id="{agent_id}"] a')[0].click()
    fingerprint = wait_for("the certificate details", lambda: text_of(driver, "#certificate"), 10)
    payload = wait_for("the last heartbeat payload", lambda: text_of(driver, "#heartbeat-payload"), 10)
    wait_for("the heartbeat timeline", lambda: len(css(driver, "#timeline circle")) >= 1, 10)
    emit("agent_page", certificate=fingerprint, payload=json.loads(payload),
         sessions=len(css(driver, "#sessions tbody tr")), timeline=len(css(driver, "#timeline circle")))
    css(driver, "#command-event")[0].send_keys("restart")
    css(driver, "#command-data")[0].send_keys('{"reason": "console test"}')
    css(driver, "#command-submit")[0].click()
    reply = wait_for("the command's ack", lambda: text_of(driver, "#command-result") or text_of(driver, "#command-error"), 15)
    if not css(driver, "#command-result"):
        fail(f"the command failed: {reply}")
    emit("command", reply=json.loads(reply), agent_saw=agent.wait_event("command", 10))

    # A state-changing request without the CSRF token, from the page itself (so with
    # the session cookie): refused.
    refused = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/ui/api/agent/certificate/' + arguments[0], {method: 'DELETE', credentials: 'same-origin'})"
        ".then(async r => done({status: r.status, body: await r.json()}));",
        agent_id,
    )
    emit("csrf_refused", status=refused["status"], detail=refused["body"].get("detail"))

    # Revoke, with the confirmation: the agent is cut.
    css(driver, "#revoke")[0].click()
    wait_for("the revoke confirmation", lambda: css(driver, "#revoke-confirm"), 5)[0].click()
    result = wait_for("the revoke result", lambda: text_of(driver, "#revoke-result") or text_of(driver, "#revoke-error"), 10)
    if not css(driver, "#revoke-result"):
        fail(f"revoke failed: {result}")
    cut = agent.wait_event("disconnected", 10)
    agent.proc.wait(timeout=30)
    emit("revoked", result=result, agent_saw=cut, agent_exit=agent.proc.returncode)

    # Certificate upload: the API's rules and texts, then a good one.
    driver.get(url + "#/add")
    new_id, new_cert = args.upload.split(",")
    with open(new_cert) as f:
        pem = f.read()
    css(driver, "#upload-agent-id")[0].send_keys("someone-else")
    css(driver, "#upload-certificate")[0].send_keys(pem)
    css(driver, "#upload-submit")[0].click()
    refused_upload = wait_for("the upload error", lambda: text_of(driver, "#upload-error"), 10)
    css(driver, "#upload-agent-id")[0].clear()
    css(driver, "#upload-agent-id")[0].send_keys(new_id)
    css(driver, "#upload-submit")[0].click()
    uploaded = wait_for("the upload result", lambda: text_of(driver, "#upload-result"), 10)
    emit("upload", refused=refused_upload, uploaded=uploaded)

    # Enrollment: a token, shown once.
    css(driver, "#enroll-agent-id")[0].send_keys("enrolled-1")
    css(driver, "#enroll-submit")[0].click()
    token = wait_for("the install token", lambda: text_of(driver, "#install-token"), 10)
    emit("install_token", token=token)

    violations = csp_violations(driver)
    emit("csp", violations=violations)

    # Sign-out: the server forgets the session; the Rust side replays the old cookie.
    cookie = driver.get_cookie("agentgate_console")
    if not cookie:
        fail("no agentgate_console cookie while signed in")
    css(driver, "#sign-out")[0].click()
    wait_for("the sign-in form after sign-out", lambda: css(driver, "form#signin-form"), 10)
    emit("signed_out", cookie=cookie["value"], http_only=cookie.get("httpOnly"),
         secure=cookie.get("secure"), same_site=cookie.get("sameSite"), path=cookie.get("path"))


def bulk(args, driver):
    url = args.url.rstrip("/") + "/ui/"
    driver.get(url)
    sign_in(driver, url, args.api_key)
    wait_for(f"{args.expect_total} agents in the counters", lambda: text_of(driver, "#counter-total .n") == str(args.expect_total), 60)
    rows_top = len(css(driver, "tr.agent"))
    first = css(driver, "tr.agent")[0].get_attribute("data-agent-id")
    driver.execute_script("const s = document.getElementById('fleet-scroll'); s.scrollTop = s.scrollHeight;")
    wait_for(f"the last agent {args.last_id} after scrolling", lambda: css(driver, f'tr.agent[data-agent-id="{args.last_id}"]'), 10)
    rows_end = len(css(driver, "tr.agent"))
    css(driver, "#search")[0].send_keys(args.last_id)
    wait_for("the search result", lambda: [r.get_attribute("data-agent-id") for r in css(driver, "tr.agent")] == [args.last_id], 10)
    emit("bulk", total=int(text_of(driver, "#counter-total .n")), rows_top=rows_top, first=first,
         rows_end=rows_end, searched=text_of(driver, "#shown-count"), violations=csp_violations(driver))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=["flow", "bulk"])
    p.add_argument("--url", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--wrong-key", default="not-the-key")
    p.add_argument("--agent-script", required=True, help="tests/agents/agent.py")
    p.add_argument("--leaver", help="id,cert,key of the agent that connects and leaves")
    p.add_argument("--agent", help="id,cert,key of the agent that is commanded and revoked")
    p.add_argument("--upload", help="id,cert of a certificate to upload")
    p.add_argument("--screenshot", help="where to save the screenshot of the fleet")
    p.add_argument("--expect-total", type=int, default=0)
    p.add_argument("--last-id")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    args = p.parse_args()
    driver, profile = browser(args)
    try:
        {"flow": flow, "bulk": bulk}[args.scenario](args, driver)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()

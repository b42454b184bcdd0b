// The fleet console: sign-in, the live fleet table, an agent's page, certificate upload
// and enrollment. Every request goes to /ui/api/..., which runs the API's own handlers
// with the session's key; state-changing requests carry the session's CSRF token.
import { h, render } from './vendor/preact/preact.module.js';
import { useCallback, useEffect, useMemo, useRef, useState } from './vendor/preact/hooks.module.js';
import htm from './vendor/htm/htm.module.js';
import { FleetTable, ago, time } from './fleet.js';

const html = htm.bind(h);

let csrfToken = null;
let onUnauthorized = () => {};

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function call(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (method !== 'GET' && csrfToken) headers['X-CSRF-Token'] = csrfToken;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: 'same-origin',
  });
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const detail = (data && data.detail) || `${response.status} ${response.statusText}`;
    if (response.status === 401 && path !== '/ui/api/session') onUnauthorized();
    throw new ApiError(response.status, detail);
  }
  return data;
}

const can = (session, scope) => session.scopes == null || session.scopes.includes(scope);

// ------------------------------------------------------------------ sign-in

function SignIn({ onSignedIn }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    const apiKey = new FormData(e.currentTarget).get('api_key');
    setBusy(true);
    setError(null);
    try {
      onSignedIn(await call('POST', '/ui/api/sign-in', { api_key: apiKey }));
    } catch (err) {
      setError(err.message);
      setBusy(false);
    }
  };
  return html`
    <main class="signin">
      <h1>agentgate</h1>
      <p>Fleet console</p>
      <form id="signin-form" onSubmit=${submit}>
        <label for="api_key">API key</label>
        <input id="api_key" name="api_key" type="password" autocomplete="current-password" required autofocus />
        <button type="submit" id="signin-submit" disabled=${busy}>Sign in</button>
        ${error && html`<p class="error" id="signin-error" role="alert">${error}</p>`}
      </form>
    </main>`;
}

// ------------------------------------------------------------------ the live feed

// The fleet as the server pushes it: a snapshot, then deltas (coalesced server-side).
function useFleet(onSignedOut) {
  const rows = useRef(new Map());
  const [version, setVersion] = useState(0);
  const [counters, setCounters] = useState(null);
  const [node, setNode] = useState(null);
  const [live, setLive] = useState(false);
  useEffect(() => {
    const source = new EventSource('/ui/api/events');
    let seq = 0;
    source.addEventListener('snapshot', (ev) => {
      const m = JSON.parse(ev.data);
      rows.current = new Map(m.rows.map((r) => [r.id, r]));
      seq = m.seq;
      setCounters(m.counters);
      setNode(m.node);
      setLive(true);
      setVersion((v) => v + 1);
    });
    source.addEventListener('delta', (ev) => {
      const m = JSON.parse(ev.data);
      if (m.seq <= seq) return;
      seq = m.seq;
      for (const r of m.upsert) rows.current.set(r.id, r);
      for (const id of m.remove) rows.current.delete(id);
      setCounters(m.counters);
      setVersion((v) => v + 1);
    });
    source.addEventListener('signed_out', () => {
      source.close();
      onSignedOut();
    });
    source.onopen = () => setLive(true);
    source.onerror = () => {
      setLive(false);
      // The browser reconnects by itself (after its retry delay of a few seconds) unless
      // the server refused the stream: then find out whether the session is gone.
      if (source.readyState === EventSource.CLOSED) {
        call('GET', '/ui/api/session').catch((e) => e.status === 401 && onSignedOut());
      }
    };
    return () => source.close();
  }, []);
  return { rows, version, counters, node, live };
}

// ------------------------------------------------------------------ fleet page

function Counters({ counters }) {
  if (!counters) return null;
  const failures = Object.entries(counters.handshake_failures);
  const failed = failures.reduce((n, [, c]) => n + c, 0);
  const card = (cls, n, what, extra) => html`
    <div class=${`counter ${cls}`} id=${`counter-${cls}`}><div class="n">${n}</div><div class="what">${what}</div>${extra}</div>`;
  return html`
    <section class="counters">
      ${card('total', counters.total, 'agents')}
      ${card('connected', counters.connected, 'connected')}
      ${card('stale', counters.stale, 'stale (connected, silent)')}
      ${card('disconnected', counters.disconnected, 'disconnected')}
      ${card('failures', failed, 'handshake failures, last 5 min',
        failures.length > 0 && html`<ul>${failures.map(([reason, n]) => html`<li>${reason}: ${n}</li>`)}</ul>`)}
      ${card('expiring', counters.expiring_certificates, 'certificates expiring within 30 days')}
    </section>`;
}

function FleetPage({ fleet, now }) {
  const [status, setStatus] = useState('all');
  const [search, setSearch] = useState('');
  const all = useMemo(
    () => [...fleet.rows.current.values()].sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0)),
    [fleet.version],
  );
  const shown = useMemo(() => {
    const needle = search.trim().toLowerCase();
    return all.filter((r) => (status === 'all' || r.status === status) && (!needle || r.id.toLowerCase().includes(needle)));
  }, [all, status, search]);
  const open = useCallback((id) => {
    location.hash = `#/agent/${encodeURIComponent(id)}`;
  }, []);
  return html`
    <${Counters} counters=${fleet.counters} />
    <div class="toolbar">
      <select id="status-filter" value=${status} onChange=${(e) => setStatus(e.currentTarget.value)}>
        <option value="all">All statuses</option>
        <option value="connected">Connected</option>
        <option value="stale">Stale</option>
        <option value="disconnected">Disconnected</option>
      </select>
      <input id="search" type="search" placeholder="Search agent id" value=${search} onInput=${(e) => setSearch(e.currentTarget.value)} />
      <span class="count" id="shown-count">${shown.length} of ${all.length} agents</span>
    </div>
    <${FleetTable} rows=${shown} clustered=${fleet.node != null} now=${now} onOpen=${open} />`;
}

// ------------------------------------------------------------------ agent page

function Timeline({ times, now }) {
  const width = 600;
  const height = 56;
  if (times.length === 0) return html`<p class="muted">No heartbeat seen since this node started.</p>`;
  const ms = times.map((t) => Date.parse(t));
  const start = Math.min(ms[0], now - 60000);
  const span = Math.max(1, now - start);
  const x = (t) => 10 + ((t - start) / span) * (width - 20);
  return html`
    <svg class="timeline" id="timeline" viewBox=${`0 0 ${width} ${height}`} preserveAspectRatio="none" role="img"
         aria-label=${`${times.length} heartbeats`}>
      <line x1="10" y1="24" x2=${width - 10} y2="24" />
      ${ms.map((t) => html`<circle cx=${x(t)} cy="24" r="4"><title>${time(t)}</title></circle>`)}
      <text x="10" y="50">${time(start)}</text>
      <text x=${width - 10} y="50" text-anchor="end">now</text>
    </svg>
    <p class="muted">${times.length} heartbeats, the last ${ago(ms[ms.length - 1], now)}.</p>`;
}

// A form's request: its result or error, and whether it is under way.
function useAction() {
  const [state, setState] = useState({ result: null, error: null, busy: false });
  const run = async (request) => {
    setState({ result: null, error: null, busy: true });
    try {
      const result = await request();
      setState({ result, error: null, busy: false });
      return result;
    } catch (err) {
      setState({ result: null, error: err.message, busy: false });
      return null;
    }
  };
  const fail = (error) => setState({ result: null, error, busy: false });
  return { ...state, run, fail };
}

function CommandForm({ id }) {
  const action = useAction();
  const submit = (e) => {
    e.preventDefault();
    const form = new FormData(e.currentTarget);
    let data = null;
    const text = String(form.get('data') || '').trim();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch (err) {
        action.fail(`data is not JSON: ${err.message}`);
        return;
      }
    }
    const body = { event: form.get('event'), data };
    const timeout = String(form.get('timeout_ms') || '').trim();
    if (timeout) body.timeout_ms = Number(timeout);
    action.run(() => call('POST', `/ui/api/agents/${encodeURIComponent(id)}/commands`, body));
  };
  return html`
    <form id="command-form" onSubmit=${submit}>
      <div class="form-row">
        <div><label for="command-event">Event</label><input id="command-event" name="event" required placeholder="restart" /></div>
        <div><label for="command-timeout">Timeout (ms)</label><input id="command-timeout" name="timeout_ms" type="number" min="1" placeholder="10000" /></div>
      </div>
      <label for="command-data">Data (JSON, optional)</label>
      <textarea id="command-data" name="data" placeholder='{"reason": "maintenance"}'></textarea>
      <p><button type="submit" id="command-submit" disabled=${action.busy}>${action.busy ? 'Waiting for the ack…' : 'Send command'}</button></p>
      ${action.result && html`<div class="ok">Acknowledged by the agent:</div><pre id="command-result">${JSON.stringify(action.result.reply, null, 2)}</pre>`}
      ${action.error && html`<p class="error" id="command-error">${action.error}</p>`}
    </form>`;
}

function Revoke({ id, onRevoked }) {
  const [asking, setAsking] = useState(false);
  const action = useAction();
  const revoke = async () => {
    const done = await action.run(() => call('DELETE', `/ui/api/agent/certificate/${encodeURIComponent(id)}`));
    if (done) {
      setAsking(false);
      onRevoked(done);
    }
  };
  return html`
    <div>
      <button class="danger" id="revoke" onClick=${() => setAsking(true)} disabled=${asking}>Revoke…</button>
      ${asking && html`
        <div class="confirm" id="revoke-dialog">
          <p>Delete the certificate of <b>${id}</b>? Its sessions are closed now and its next TLS handshake fails.</p>
          <button class="danger" id="revoke-confirm" onClick=${revoke} disabled=${action.busy}>Revoke ${id}</button>
          ${' '}<button class="secondary" id="revoke-cancel" onClick=${() => setAsking(false)}>Cancel</button>
        </div>`}
      ${action.error && html`<p class="error" id="revoke-error">${action.error}</p>`}
    </div>`;
}

function EnrollForm({ agentId }) {
  const action = useAction();
  const submit = (e) => {
    e.preventDefault();
    const form = new FormData(e.currentTarget);
    const body = { agent_id: agentId || form.get('agent_id') };
    const ttl = String(form.get('ttl_s') || '').trim();
    if (ttl) body.ttl_s = Number(ttl);
    action.run(() => call('POST', '/ui/api/install-tokens', body));
  };
  const token = action.result;
  return html`
    <form id="enroll-form" onSubmit=${submit}>
      <div class="form-row">
        ${!agentId && html`<div><label for="enroll-agent-id">Agent id</label><input id="enroll-agent-id" name="agent_id" required /></div>`}
        <div><label for="enroll-ttl">Valid for (seconds)</label><input id="enroll-ttl" name="ttl_s" type="number" min="1" placeholder="3600" /></div>
        <button type="submit" id="enroll-submit" disabled=${action.busy}>Issue install token</button>
      </div>
      ${token && html`
        <div class="ok">Install token for <b>${token.agent_id}</b>, valid until ${token.expires_at}. It is shown only now: copy it.</div>
        <pre class="token" id="install-token">${token.install_token}</pre>`}
      ${action.error && html`<p class="error" id="enroll-error">${action.error}</p>`}
    </form>`;
}

function AgentPage({ id, row, session, now }) {
  const [agent, setAgent] = useState(null);
  const [times, setTimes] = useState([]);
  const [error, setError] = useState(null);
  const [revoked, setRevoked] = useState(null);
  const last = useRef(0);
  const load = useCallback(async () => {
    last.current = Date.now();
    try {
      const [a, t] = await Promise.all([
        call('GET', `/ui/api/agents/${encodeURIComponent(id)}`),
        call('GET', `/ui/api/agents/${encodeURIComponent(id)}/heartbeats`),
      ]);
      setAgent(a);
      setTimes(t.heartbeats);
      setError(null);
    } catch (err) {
      setError(err.message);
    }
  }, [id]);
  // Loaded when opened, and again when the live feed changes the agent's row (at most
  // once a second).
  useEffect(() => {
    const wait = Math.max(0, 1000 - (Date.now() - last.current));
    const timer = setTimeout(load, wait);
    return () => clearTimeout(timer);
  }, [load, row]);
  const status = row ? row.status : agent ? agent.status : '';
  return html`
    <p><a href="#/">← Fleet</a></p>
    <div class="card" id="agent-header">
      <h1><span class="mono" id="agent-id">${id}</span> ${status && html`<span class=${`badge ${status}`} id="agent-status">${status}</span>`}</h1>
      ${row && row.node && html`<p class="muted">on node ${row.node}</p>`}
    </div>
    ${error && html`<p class="error" id="agent-error">${error}</p>`}
    ${revoked && html`<p class="ok" id="revoke-result">Revoked: certificate ${revoked.fingerprint} deleted, ${revoked.closed_sessions} session(s) closed.</p>`}
    ${agent && html`
      <div class="cards">
        <section class="card"><h2>Sessions</h2>
          ${agent.sessions.length === 0 ? html`<p class="muted">No live session.${agent.disconnected_at ? ` Disconnected at ${agent.disconnected_at}.` : ''}</p>` : html`
          <table class="small" id="sessions"><thead><tr><th>Session</th><th>Transport</th>${agent.node !== undefined && html`<th>Node</th>`}<th>Remote address</th><th>Connected since</th></tr></thead>
            <tbody>${agent.sessions.map((s) => html`<tr><td class="mono">${s.sid}</td><td>${s.transport || ''}</td>${agent.node !== undefined && html`<td>${s.node}</td>`}<td class="mono">${s.remote_addr}</td><td>${s.connected_since}</td></tr>`)}</tbody></table>`}
        </section>
        <section class="card"><h2>Heartbeats</h2>
          <${Timeline} times=${times} now=${now} />
          ${agent.last_heartbeat ? html`<label>Last payload, received ${agent.last_heartbeat.received_at}</label><pre id="heartbeat-payload">${JSON.stringify(agent.last_heartbeat.payload, null, 2)}</pre>` : html`<p class="muted">No heartbeat yet.</p>`}
        </section>
        <section class="card"><h2>Certificate</h2>
          ${agent.certificate ? html`
            <dl class="facts" id="certificate">
              <dt>Fingerprint (SHA-256)</dt><dd class="mono">${agent.certificate.fingerprint}</dd>
              <dt>Subject</dt><dd>${agent.certificate.subject}</dd>
              <dt>Not before</dt><dd>${agent.certificate.not_before}</dd>
              <dt>Not after</dt><dd>${agent.certificate.not_after}</dd>
              <dt>Key</dt><dd>${agent.certificate.key_type}</dd>
            </dl>
            ${can(session, 'certificates:write') && html`<p></p><${Revoke} id=${id} onRevoked=${(r) => { setRevoked(r); load(); }} />`}` : html`<p class="muted">No certificate stored.</p>`}
        </section>
        ${agent.metadata && Object.keys(agent.metadata).length > 0 && html`
          <section class="card"><h2>Registered metadata</h2><pre>${JSON.stringify(agent.metadata, null, 2)}</pre></section>`}
        ${can(session, 'agents:command') && html`<section class="card"><h2>Send a command</h2><${CommandForm} id=${id} /></section>`}
        ${can(session, 'certificates:write') && html`<section class="card"><h2>Enrollment</h2>
          <p class="muted">A one-time token with which the agent registers its own certificate (POST /agent/register).</p>
          <${EnrollForm} agentId=${id} /></section>`}
      </div>`}`;
}

// ------------------------------------------------------------------ add an agent

function UploadForm() {
  const action = useAction();
  const pemRef = useRef(null);
  const pick = (e) => {
    const file = e.currentTarget.files[0];
    if (file) file.text().then((text) => { pemRef.current.value = text; });
  };
  const submit = (e) => {
    e.preventDefault();
    const form = new FormData(e.currentTarget);
    const body = { agent_id: form.get('agent_id'), certificate: form.get('certificate') };
    action.run(() => call('POST', '/ui/api/agent/certificate', body));
  };
  const result = action.result;
  return html`
    <form id="upload-form" onSubmit=${submit}>
      <div class="form-row">
        <div><label for="upload-agent-id">Agent id (the certificate's CN)</label><input id="upload-agent-id" name="agent_id" required /></div>
        <div><label for="upload-file">or read a PEM file</label><input id="upload-file" type="file" accept=".pem,.crt,.cer" onChange=${pick} /></div>
      </div>
      <label for="upload-certificate">Certificate (PEM)</label>
      <textarea id="upload-certificate" name="certificate" ref=${pemRef} required placeholder="-----BEGIN CERTIFICATE-----"></textarea>
      <p><button type="submit" id="upload-submit" disabled=${action.busy}>Upload certificate</button></p>
      ${result && html`<p class="ok" id="upload-result">${result.message}: <a href=${`#/agent/${encodeURIComponent(result.agent_id)}`}>${result.agent_id}</a></p>`}
      ${action.error && html`<p class="error" id="upload-error">${action.error}</p>`}
    </form>`;
}

function AddPage({ session }) {
  if (!can(session, 'certificates:write')) {
    return html`<p class="muted">The key ${session.key_name} lacks the scope certificates:write.</p>`;
  }
  return html`
    <div class="cards">
      <section class="card"><h2>Upload a certificate</h2>
        <p class="muted">Under the rules of POST /agent/certificate: one self-signed PEM certificate, CN = agent id, currently valid, no private key.</p>
        <${UploadForm} /></section>
      <section class="card"><h2>Enroll with an install token</h2><${EnrollForm} /></section>
    </div>`;
}

// ------------------------------------------------------------------ frame

function useHash() {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const changed = () => setHash(location.hash);
    addEventListener('hashchange', changed);
    return () => removeEventListener('hashchange', changed);
  }, []);
  return hash;
}

function useNow() {
  // Redraws relative times ("12 s ago") once a second; no request is made.
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const timer = setInterval(() => setNow(Date.now()), 1000);
    return () => clearInterval(timer);
  }, []);
  return now;
}

function Console({ session, onSignedOut }) {
  const fleet = useFleet(onSignedOut);
  const hash = useHash();
  const now = useNow();
  const signOut = async () => {
    try {
      await call('POST', '/ui/api/sign-out');
    } finally {
      onSignedOut();
    }
  };
  const agentMatch = hash.match(/^#\/agent\/(.+)$/);
  let page;
  if (agentMatch) {
    const id = decodeURIComponent(agentMatch[1]);
    page = html`<${AgentPage} key=${id} id=${id} row=${fleet.rows.current.get(id)} session=${session} now=${now} />`;
  } else if (hash === '#/add') {
    page = html`<${AddPage} session=${session} />`;
  } else {
    page = html`<${FleetPage} fleet=${fleet} now=${now} />`;
  }
  return html`
    <header class="top">
      <div class="brand">agentgate <span>fleet console</span></div>
      <nav><a href="#/">Fleet</a><a href="#/add">Add an agent</a><a href="/docs" target="_blank" rel="noopener">API docs</a></nav>
      <div class="who" id="who">
        <span class=${fleet.live ? 'live on' : 'live'} id="live" title=${fleet.live ? 'live' : 'reconnecting'}></span>
        ${fleet.node ? `node ${fleet.node} · ` : ''}signed in as <b>${session.key_name}</b>
      </div>
      <button id="sign-out" onClick=${signOut}>Sign out</button>
    </header>
    <main class="page">${page}</main>`;
}

function App() {
  // undefined: not known yet; null: signed out.
  const [session, setSession] = useState(undefined);
  const signedIn = (s) => {
    csrfToken = s.csrf_token;
    setSession(s);
  };
  const signedOut = () => {
    csrfToken = null;
    setSession(null);
  };
  onUnauthorized = signedOut;
  useEffect(() => {
    call('GET', '/ui/api/session').then(signedIn, signedOut);
  }, []);
  if (session === undefined) return html`<p class="muted">Loading…</p>`;
  if (session === null) return html`<${SignIn} onSignedIn=${signedIn} />`;
  return html`<${Console} session=${session} onSignedOut=${signedOut} />`;
}

render(html`<${App} />`, document.getElementById('app'));

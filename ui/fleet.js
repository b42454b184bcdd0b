// The fleet table: a fixed row height and only the rows in view (plus a margin) in the
// DOM; two spacer rows stand for the others, so 10,000 agents cost a few dozen <tr>.
import { h } from './vendor/preact/preact.module.js';
import { useEffect, useRef, useState } from './vendor/preact/hooks.module.js';
import htm from './vendor/htm/htm.module.js';

const html = htm.bind(h);

// Must match --row in style.css.
export const ROW_HEIGHT = 32;
// Rows rendered above and below the visible ones, so a fast scroll shows no gap.
const OVERSCAN = 10;

export function time(ms) {
  if (ms == null) return '';
  const d = new Date(ms);
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function ago(ms, now) {
  if (ms == null) return '';
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function expiry(ms, now) {
  if (ms == null) return html`<span class="muted">no certificate</span>`;
  const days = Math.floor((ms - now) / 86400000);
  const text = days < 0 ? 'expired' : `in ${days} d`;
  return html`<span class=${days < 30 ? 'soon' : ''} title=${time(ms)}>${time(ms).slice(0, 10)} (${text})</span>`;
}

export function FleetTable({ rows, clustered, now, onOpen }) {
  const scroller = useRef(null);
  const [scrollTop, setScrollTop] = useState(0);
  const [height, setHeight] = useState(600);
  useEffect(() => {
    const el = scroller.current;
    const measure = () => setHeight(el.clientHeight);
    measure();
    const observer = new ResizeObserver(measure);
    observer.observe(el);
    return () => observer.disconnect();
  }, []);
  const first = Math.max(0, Math.floor(scrollTop / ROW_HEIGHT) - OVERSCAN);
  const last = Math.min(rows.length, first + Math.ceil(height / ROW_HEIGHT) + 2 * OVERSCAN);
  const columns = clustered ? 7 : 6;
  const spacer = (px) => html`<tr class="spacer" aria-hidden="true"><td colspan=${columns} style=${{ height: `${px}px` }}></td></tr>`;
  return html`
    <div class="table-scroll" id="fleet-scroll" ref=${scroller} onScroll=${(e) => setScrollTop(e.currentTarget.scrollTop)}>
      <table class="fleet" id="fleet">
        <thead><tr>
          <th>Agent</th><th>Status</th>${clustered && html`<th>Node</th>`}<th>Remote address</th>
          <th>Connected since</th><th>Last heartbeat</th><th>Certificate expires</th>
        </tr></thead>
        <tbody>
          ${spacer(first * ROW_HEIGHT)}
          ${rows.slice(first, last).map((r) => html`
            <tr key=${r.id} class="agent" data-agent-id=${r.id} data-status=${r.status} onClick=${() => onOpen(r.id)}>
              <td class="mono"><a href=${`#/agent/${encodeURIComponent(r.id)}`}>${r.id}</a></td>
              <td><span class=${`badge ${r.status}`}>${r.status}</span></td>
              ${clustered && html`<td>${r.node || ''}</td>`}
              <td class="mono">${r.remote_addr || ''}</td>
              <td>${time(r.connected_since)}</td>
              <td title=${time(r.last_heartbeat)}>${ago(r.last_heartbeat, now)}</td>
              <td>${expiry(r.cert_not_after, now)}</td>
            </tr>`)}
          ${spacer((rows.length - last) * ROW_HEIGHT)}
        </tbody>
      </table>
    </div>`;
}

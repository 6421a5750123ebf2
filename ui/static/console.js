// The discoverd web console. It reads the agent's own HTTP API and never
// writes: GET /services (polled: a browser holds at most six connections
// to one host, too few for a stream per service), GET /agent (polled), and
// on a service's page the SSE streams of /services/{name} and
// /services/{name}/leader, and GET /checks?service={name} (the agent's
// health checks of that service: on open, on each change, and polled). Times and ages are as this page saw them: the
// agent does not record wall-clock times, so a value that was already
// there when the page (or its stream) opened is marked "≥".

const $ = (id) => document.getElementById(id);
const COOKIE = 'discoverd_token';
const SERVICES_EVERY = 1000; // ms between two GET /services
const AGENT_EVERY = 2000; // ms between two GET /agent
const CHECKS_EVERY = 2000; // ms between two GET /checks on a service's page
const RETRY_MAX = 15000; // ms, the longest wait before reopening a stream
const LOG_MAX = 50; // entries kept in a service's change log

// ---- small helpers ----

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else e.setAttribute(k, v);
  }
  for (const k of kids) if (k != null) e.append(k);
  return e;
}

function clock(t) {
  return new Date(t).toLocaleTimeString([], { hour12: false });
}

function duration(ms) {
  let s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s`;
  let m = Math.floor(s / 60);
  s %= 60;
  if (m < 60) return `${m} min ${s} s`;
  let h = Math.floor(m / 60);
  m %= 60;
  if (h < 48) return `${h} h ${m} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

// A "since" is {t: epoch ms, atLeast: bool}: atLeast when the value was
// already there when this page first saw it.
function since(t, atLeast) {
  return { t, atLeast };
}

// setSince makes node show the age of s, kept current by tick().
function setSince(node, s, suffix) {
  if (!s) {
    node.textContent = '—';
    delete node.dataset.since;
    node.removeAttribute('title');
    return;
  }
  node.dataset.since = String(s.t);
  node.dataset.atLeast = s.atLeast ? '1' : '';
  node.dataset.suffix = suffix || '';
  node.title = (s.atLeast ? 'before ' : 'at ') + new Date(s.t).toLocaleString();
  renderAge(node);
}

function renderAge(node) {
  const t = Number(node.dataset.since);
  node.textContent = (node.dataset.atLeast ? '≥ ' : '') + duration(Date.now() - t) + node.dataset.suffix;
}

function tick() {
  for (const n of document.querySelectorAll('[data-since]')) renderAge(n);
}

// ---- the token (ACLs) ----

function getToken() {
  for (const part of document.cookie.split(';')) {
    const [k, ...v] = part.trim().split('=');
    if (k === COOKIE) return decodeURIComponent(v.join('='));
  }
  return '';
}

function setToken(v) {
  const secure = location.protocol === 'https:' ? '; Secure' : '';
  if (v) document.cookie = `${COOKIE}=${encodeURIComponent(v)}; Path=/; SameSite=Strict${secure}`;
  else document.cookie = `${COOKIE}=; Path=/; SameSite=Strict; Max-Age=0${secure}`;
  showTokenState();
}

function showTokenState() {
  $('token-state').textContent = getToken() ? 'A token is set.' : 'No token.';
}

// The banner lists what the agent refused to show, by resource.
const refusals = new Map();

function refused(what, status, body) {
  const why = body && body.error ? ` (${body.error})` : '';
  refusals.set(what, status === 401
    ? `The agent asks for an access token to show ${what}: enter one above.${why}`
    : `Your token may not read ${what}: the agent answered 403 Forbidden.${why}`);
  showRefusals();
}

function allowed(what) {
  if (refusals.delete(what)) showRefusals();
}

function showRefusals() {
  const b = $('auth');
  b.replaceChildren(...[...refusals.values()].map((m) => el('p', {}, m)));
  b.hidden = refusals.size === 0;
}

class HTTPError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// getJSON fetches url; a 401 or 403 goes to the banner under what.
async function getJSON(url, what) {
  const headers = { Accept: 'application/json' };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const r = await fetch(url, { headers, cache: 'no-store', credentials: 'same-origin' });
  let body = null;
  try {
    body = await r.json();
  } catch {
    // not JSON: keep the status
  }
  if (r.status === 401 || r.status === 403) {
    refused(what, r.status, body);
    throw new HTTPError(r.status, r.status === 401 ? 'a token is required' : 'forbidden');
  }
  allowed(what);
  if (!r.ok) throw new HTTPError(r.status, (body && body.error) || `HTTP ${r.status}`);
  return body;
}

// ---- a poll that runs while the page is visible ----

class Poller {
  constructor(every, fn) {
    this.every = every;
    this.fn = fn;
    this.timer = 0;
    this.running = false;
    this.busy = false;
    this.again = false; // now() was called while busy
  }

  start() {
    this.running = true;
    this.now();
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
  }

  async now() {
    clearTimeout(this.timer);
    if (!this.running) return;
    if (this.busy) {
      this.again = true;
      return;
    }
    this.busy = true;
    try {
      await this.fn();
    } finally {
      this.busy = false;
      if (this.again) {
        this.again = false;
        this.now();
      } else if (this.running && !document.hidden) {
        this.timer = setTimeout(() => this.now(), this.every);
      }
    }
  }
}

// ---- an SSE stream that reopens itself ----

// Stream keeps one EventSource open on url. When it breaks it is closed
// and opened again after a growing delay, and state() says so; each
// (re)opening starts over with the agent's full snapshot. what names the
// resource for the token banner.
class Stream {
  constructor(url, what, events, handlers) {
    this.url = url;
    this.what = what;
    this.events = events;
    this.h = handlers; // onOpen(), onEvent(type, data), onState(kind, text)
    this.es = null;
    this.timer = 0;
    this.failures = 0;
    this.opened = 0; // times the stream was open
    this.closed = false;
  }

  open() {
    if (this.closed) return;
    clearTimeout(this.timer);
    if (this.es) this.es.close();
    const es = new EventSource(this.url, { withCredentials: true });
    this.es = es;
    let fresh = true;
    const first = () => {
      if (!fresh) return;
      fresh = false;
      this.failures = 0;
      this.opened++;
      allowed(this.what);
      this.h.onOpen();
    };
    es.onopen = first;
    for (const type of this.events) {
      es.addEventListener(type, (e) => {
        first();
        this.h.onEvent(type, JSON.parse(e.data));
      });
    }
    es.onerror = (e) => {
      if (typeof e.data === 'string') { // the agent's "error" event: the stream ends
        let msg = 'the agent ended the stream';
        try {
          msg = JSON.parse(e.data).error || msg;
        } catch {
          // keep the default
        }
        this.h.onState('lost', `Stream ended by the agent: ${msg}.`);
        return;
      }
      if (this.es !== es) return;
      es.close();
      this.es = null;
      this.retry();
    };
  }

  async retry() {
    this.failures++;
    const wait = Math.min(RETRY_MAX, 500 * 2 ** Math.min(this.failures, 6));
    this.h.onState('lost', `Stream lost; reconnecting in ${Math.round(wait / 1000)} s (attempt ${this.failures})…`);
    // EventSource does not say why it failed: ask the same URL once
    // without the stream, so that a 401 or 403 can be shown.
    try {
      await getJSON(this.url, this.what);
    } catch (err) {
      if (err.status === 401 || err.status === 403) {
        this.h.onState('denied', `Not allowed (${err.status}); retrying in ${Math.round(wait / 1000)} s.`);
      }
    }
    if (this.closed || this.es) return; // closed, or reopened meanwhile
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), wait);
  }

  // reopen starts over now (after a token change).
  reopen() {
    this.failures = 0;
    this.open();
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    if (this.es) this.es.close();
    this.es = null;
  }
}

// ---- the agent panel ----

// setText changes a node only when its text or class differ, so that a
// live region (role=status) announces changes, not every poll.
function setText(id, text, cls) {
  const n = $(id);
  if (n.textContent !== text) n.textContent = text;
  if (n.className !== (cls || '')) n.className = cls || '';
}

async function pollAgent() {
  try {
    const a = await getJSON('/agent', 'the agent panel');
    const rev = a.revision && a.revision !== 'unknown' ? ` (${a.revision})` : '';
    setText('a-version', `${a.version}${rev}, ${a.go_version}`);
    setText('a-store', a.store || '—');
    if (a.store_health === 'ok') setText('a-health', 'ok', 'good');
    else setText('a-health', `unavailable: ${a.store_error || 'no answer'}`, 'bad');
    if (!a.session) setText('a-session', 'not reported by this store');
    else if (a.session.live) setText('a-session', `live (established ${a.session.established}×)`, 'good');
    else setText('a-session', `lost (established ${a.session.established}×)`, 'bad');
    setText('a-ttl', `${a.ttl_seconds} s`);
    setText('a-regs', String(a.registrations));
    setText('a-sessions', String(a.sessions));
    setText('a-subs', String(a.subscribers));
    setText('a-sse', String(a.sse_streams));
    setText('a-conns', a.connections_limit ? `${a.connections} of ${a.connections_limit}` : String(a.connections));
    if (a.store_health === 'ok') setText('agent-status', 'Store reachable.', 'good');
    else setText('agent-status', 'Store outage: the agent cannot reach its store.', 'banner bad');
    setText('agent-updated', `Updated ${clock(Date.now())}.`, 'muted');
  } catch (err) {
    setText('agent-status', err.status ? `Cannot read the agent: ${err.message}.` : 'The agent does not answer.', 'banner bad');
  }
}

// ---- the services page ----

const services = new Map(); // name -> {row, cells, key, leaderKey, changed, leaderSince}
let servicesSeen = false; // a first listing arrived

async function pollServices() {
  let list;
  try {
    list = await getJSON('/services', 'the list of services');
  } catch (err) {
    setText('services-status', `Cannot list the services: ${err.message} (retrying).`, 'banner bad');
    return;
  }
  const now = Date.now();
  const first = !servicesSeen;
  servicesSeen = true;
  const tbody = $('services-table').tBodies[0];
  const names = new Set();
  list.services.forEach((s, i) => {
    names.add(s.name);
    // instances are in the store (online); offline counts this agent's
    // checked registrations that are not (failing, flapping).
    const online = s.instances;
    const total = s.instances + (s.offline || 0);
    const key = `${online}/${total} ${s.leader} ${s.leader_created}`;
    const leaderKey = `${s.leader} ${s.leader_created}`;
    let e = services.get(s.name);
    if (!e) {
      const link = el('a', { href: `#/services/${encodeURIComponent(s.name)}` }, s.name);
      const cells = {
        count: el('td', { class: 'num' }), leader: el('td', { class: 'mono' }),
        age: el('td'), token: el('td', { class: 'num mono' }), changed: el('td'),
      };
      const row = el('tr', { 'data-service': s.name }, el('th', { scope: 'row' }, link),
        cells.count, cells.leader, cells.age, cells.token, cells.changed);
      e = { row, cells, key: '', leaderKey: '' };
      e.changed = first ? since(now, true) : since(now, false);
      e.leaderSince = e.changed;
      services.set(s.name, e);
    } else if (e.key !== key) {
      e.changed = since(now, false);
      if (e.leaderKey !== leaderKey) e.leaderSince = since(now, false);
    }
    if (e.key !== key) {
      e.key = key;
      e.leaderKey = leaderKey;
      e.cells.count.textContent = `${online} / ${total}`;
      e.cells.leader.textContent = s.leader || '—';
      e.cells.token.textContent = s.leader ? String(s.leader_created) : '—';
      setSince(e.cells.age, s.leader ? e.leaderSince : null);
      setSince(e.cells.changed, e.changed, ' ago');
    }
    // Move a row only when it is out of place, so keyboard focus stays.
    if (tbody.rows[i] !== e.row) tbody.insertBefore(e.row, tbody.rows[i] || null);
  });
  for (const [name, e] of services) {
    if (!names.has(name)) {
      e.row.remove();
      services.delete(name);
    }
  }
  const n = list.services.length;
  setText('services-status', (n === 0 ? 'No service has an online instance.' : `${n} service${n === 1 ? '' : 's'}`)
    + (list.next ? ' (the first page only).' : '.'));
  setText('services-updated', `Updated ${clock(now)}.`, 'muted');
}

// ---- a service's page ----

class ServicePage {
  constructor(name) {
    this.name = name;
    this.instances = new Map(); // addr -> {inst, since}
    this.pending = null; // the snapshot being received, until "current"
    this.leader = null; // the leader instance, or null
    this.leaderSince = null;
    this.leaderSeen = false;
    this.checks = new Map(); // addr -> api.CheckStatus, from GET /checks
    const base = `/services/${encodeURIComponent(name)}`;
    const what = `service ${name}`;
    $('log').replaceChildren();
    this.render();
    this.streams = { sub: ['lost', 'Connecting…'], lead: ['lost', 'Connecting…'] };
    this.sub = new Stream(base, what, ['online', 'offline', 'current'], {
      onOpen: () => this.subOpen(),
      onEvent: (type, data) => this.subEvent(type, data),
      onState: (kind, text) => this.state('sub', kind, text),
    });
    this.lead = new Stream(`${base}/leader`, `the leader of ${name}`, ['leader'], {
      onOpen: () => this.state('lead', 'live', ''),
      onEvent: (_, data) => this.leaderEvent(data),
      onState: (kind, text) => this.state('lead', kind, text),
    });
    this.showState();
    this.checksURL = `/checks?service=${encodeURIComponent(name)}`;
    this.checksWhat = `the health checks of ${name}`;
    this.checksPoll = new Poller(CHECKS_EVERY, () => this.pollChecks());
    this.sub.open();
    this.lead.open();
    this.checksPoll.start();
  }

  close() {
    this.sub.close();
    this.lead.close();
    this.checksPoll.stop();
  }

  reopen() {
    this.sub.reopen();
    this.lead.reopen();
    this.checksPoll.now();
  }

  // pollChecks reads this agent's checked registrations of the service.
  // An agent without checks answers an empty list; one too old to know
  // GET /checks (404) shows none.
  async pollChecks() {
    let list;
    try {
      list = await getJSON(this.checksURL, this.checksWhat);
    } catch {
      return; // a 401 or 403 is on the banner; otherwise keep what we had
    }
    if (!Array.isArray(list)) return;
    const next = new Map();
    for (const st of list) {
      if (st.name !== this.name) continue;
      next.set(st.addr, st);
      const old = this.checks.get(st.addr);
      if (!old) {
        if (this.checksSeen) this.log(`${st.addr}: checked registration added (${st.state}).`);
      } else if (old.state !== st.state) {
        const t = (st.transitions || []).at(-1);
        this.log(`${st.addr}: check ${old.state} → ${st.state}${t && t.reason ? `: ${t.reason}` : ''}.`);
      }
    }
    if (this.checksSeen) {
      for (const addr of this.checks.keys()) {
        if (!next.has(addr)) this.log(`${addr}: checked registration removed.`);
      }
    }
    this.checksSeen = true;
    this.checks = next;
    this.render();
  }

  // state records the state of one of the two streams; the page shows
  // the worse of them.
  state(which, kind, text) {
    this.streams[which] = [kind, text];
    this.showState();
  }

  showState() {
    const all = [this.streams.sub, this.streams.lead];
    const [kind, text] = all.find(([k]) => k === 'denied') || all.find(([k]) => k === 'lost') || this.streams.sub;
    setText('stream-status', text, `stream ${kind}`);
  }

  log(text) {
    const ol = $('log');
    const now = Date.now();
    ol.prepend(el('li', {}, el('time', { datetime: new Date(now).toISOString() }, clock(now)), text));
    while (ol.children.length > LOG_MAX) ol.lastElementChild.remove();
  }

  subOpen() {
    this.pending = new Map();
  }

  subEvent(type, data) {
    const now = Date.now();
    if (type === 'current') {
      const snap = this.pending || new Map();
      this.pending = null;
      if (!this.synced) {
        this.synced = true;
        for (const [addr, inst] of snap) this.instances.set(addr, { inst, since: since(now, true) });
        this.log(`Watching ${this.name}: ${snap.size} instance${snap.size === 1 ? '' : 's'} online.`);
      } else {
        // Reopened: the new snapshot replaces what we had; say what
        // changed while the stream was down.
        const old = this.instances;
        this.instances = new Map();
        for (const [addr, inst] of snap) {
          const had = old.get(addr);
          this.instances.set(addr, { inst, since: had ? had.since : since(now, true) });
          if (!had) this.log(`${addr} online (while the stream was down), created ${inst.created}.`);
        }
        for (const addr of old.keys()) {
          if (!snap.has(addr)) this.log(`${addr} offline (while the stream was down).`);
        }
        this.log('Stream reconnected; the list is current again.');
      }
      this.state('sub', 'live', this.sub.opened > 1 ? `Live (reconnected at ${clock(now)}).` : 'Live.');
      this.render();
      this.checksPoll.now();
      return;
    }
    if (this.pending) { // part of a snapshot
      if (type === 'online') this.pending.set(data.addr, data);
      return;
    }
    if (type === 'online') {
      const had = this.instances.get(data.addr);
      if (had && had.inst.created === data.created) {
        this.log(`${data.addr} updated: ${attrText(data.attrs) || 'no attributes'}.`);
        this.instances.set(data.addr, { inst: data, since: had.since });
      } else {
        this.log(`${data.addr} online, created ${data.created}.`);
        this.instances.set(data.addr, { inst: data, since: since(now, false) });
      }
    } else if (type === 'offline') {
      this.instances.delete(data.addr);
      this.log(`${data.addr} offline.`);
    }
    this.render();
    this.checksPoll.now();
  }

  leaderEvent(inst) {
    const now = Date.now();
    const prev = this.leader;
    const same = prev && inst && prev.addr === inst.addr && prev.created === inst.created;
    if (!same) {
      this.leaderSince = inst ? since(now, !this.leaderSeen) : null;
      if (this.leaderSeen || inst) {
        this.log(inst ? `Leader: ${inst.addr}, fencing token ${inst.created}.` : 'No leader: no instance is online.');
      }
    }
    this.leaderSeen = true;
    this.leader = inst;
    this.render();
  }

  render() {
    $('service-h').textContent = `Service ${this.name}`;
    const l = this.leader;
    $('leader-addr').textContent = l ? l.addr : 'none';
    $('leader-token').textContent = l ? String(l.created) : '—';
    setSince($('leader-age'), l ? this.leaderSince : null);

    const table = $('instances-table');
    const list = [...this.instances.values()].sort((a, b) => a.inst.created - b.inst.created);
    // Checked registrations that are not online (failing, flapping, not
    // yet passed) are rows too, after the online ones.
    const off = [...this.checks.values()].filter((c) => !this.instances.has(c.addr))
      .sort((a, b) => (a.addr < b.addr ? -1 : a.addr > b.addr ? 1 : 0));
    const hasOwner = list.some((x) => x.inst.owner != null);
    table.classList.toggle('has-owner', hasOwner);
    table.classList.toggle('has-check', this.checks.size > 0);
    const attrCell = (attrs) => {
      const td = el('td');
      for (const [k, v] of Object.entries(attrs || {}).sort()) td.append(el('code', { class: 'attr' }, `${k}=${v}`));
      return td;
    };
    const rows = list.map(({ inst, since: s }) => {
      const lead = l && l.addr === inst.addr && l.created === inst.created;
      const age = el('td');
      setSince(age, s);
      return el('tr', lead ? { class: 'leader', 'data-addr': inst.addr, 'aria-current': 'true' } : { 'data-addr': inst.addr },
        el('th', { scope: 'row', class: 'mono' }, inst.addr),
        el('td', {}, lead ? el('span', { class: 'badge' }, 'leader') : ''),
        el('td', { class: 'num mono' }, String(inst.created)),
        age,
        el('td', { class: 'col-owner' }, inst.owner != null ? String(inst.owner) : ''),
        checkCell(this.checks.get(inst.addr)),
        attrCell(inst.attrs));
    });
    for (const c of off) {
      rows.push(el('tr', { class: 'offline', 'data-addr': c.addr, 'data-offline': '' },
        el('th', { scope: 'row', class: 'mono' }, c.addr),
        el('td', {}, el('span', { class: 'badge bad' }, 'offline')),
        el('td', { class: 'num mono' }, '—'),
        el('td', {}, 'not online'),
        el('td', { class: 'col-owner' }, hasOwner ? 'agent (check)' : ''),
        checkCell(c),
        attrCell(c.attrs)));
    }
    if (rows.length === 0) {
      rows.push(el('tr', {}, el('td', { colspan: '7', class: 'muted' },
        this.synced ? `No instance of ${this.name} is online.` : 'Waiting for the agent…')));
    }
    table.tBodies[0].replaceChildren(...rows);
  }
}

function attrText(attrs) {
  return Object.entries(attrs || {}).sort().map(([k, v]) => `${k}=${v}`).join(' ');
}

// checkCell renders the status of a checked registration (GET /checks,
// api.CheckStatus): its state, its last result with the probes in a row,
// the last error, a flapping hold and a failed store write; the check
// itself in the title. Empty for an instance without a check.
function checkCell(c) {
  const td = el('td', { class: 'col-check' });
  if (!c) return td;
  const chk = c.check || {};
  const kind = chk.http ? 'http' : chk.tcp ? 'tcp' : chk.grpc ? 'grpc' : '';
  td.title = `${kind} ${chk.http || chk.tcp || chk.grpc || ''} every ${chk.interval || '?'}, rise ${chk.rise}, fall ${chk.fall}`;
  const cls = c.state === 'online' ? 'good' : 'badge bad';
  td.append(el('span', { class: `check-state ${cls}` }, c.state || 'unknown'));
  let last = 'not probed yet';
  if (c.last_result === 'pass') last = `passing (${c.passes} in a row)`;
  else if (c.last_result === 'fail') last = `failing (${c.fails} in a row)`;
  td.append(' ', el('span', { class: 'check-result' }, last));
  if (c.last_probe) {
    td.append(' ', el('span', { class: 'muted' }, `at ${clock(c.last_probe)}`));
  }
  if (c.last_error) td.append(el('span', { class: 'check-error' }, c.last_error));
  if (c.state === 'flapping' && c.held_until) {
    td.append(el('span', { class: 'check-error' }, `flapping: held offline until ${clock(c.held_until)}`));
  }
  if (c.store_error) td.append(el('span', { class: 'check-error' }, `store: ${c.store_error}`));
  return td;
}

// ---- routing and start ----

let page = null; // the ServicePage shown, if any
const servicesPoll = new Poller(SERVICES_EVERY, pollServices);
const agentPoll = new Poller(AGENT_EVERY, pollAgent);

function route(focus) {
  const h = location.hash;
  if (h && !h.startsWith('#/')) return; // an in-page anchor (the skip link)
  const m = /^#\/services\/([^/]+)$/.exec(h);
  if (page) {
    page.close();
    page = null;
  }
  const crumbs = [el('li', {}, el('a', { href: '#/' }, 'Services'))];
  if (m) {
    const name = decodeURIComponent(m[1]);
    servicesPoll.stop();
    $('services-view').hidden = true;
    $('service-view').hidden = false;
    crumbs.push(el('li', {}, el('a', { href: h, 'aria-current': 'page' }, name)));
    document.title = `${name} · discoverd console`;
    page = new ServicePage(name);
  } else {
    $('service-view').hidden = true;
    $('services-view').hidden = false;
    crumbs[0].firstChild.setAttribute('aria-current', 'page');
    document.title = 'discoverd console';
    servicesPoll.start();
  }
  $('crumbs').replaceChildren(...crumbs);
  if (focus) (m ? $('service-h') : $('services-h')).focus();
}

function start() {
  showTokenState();
  $('token-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const input = $('token');
    setToken(input.value.trim());
    input.value = '';
    refusals.clear();
    showRefusals();
    agentPoll.now();
    servicesPoll.now();
    if (page) page.reopen();
  });
  $('token-clear').addEventListener('click', () => {
    setToken('');
    agentPoll.now();
    servicesPoll.now();
    if (page) page.reopen();
  });
  window.addEventListener('hashchange', () => route(true));
  document.addEventListener('visibilitychange', () => {
    if (document.hidden) return;
    agentPoll.now();
    if (!page) servicesPoll.now();
    else page.checksPoll.now();
  });
  // Leaving the page closes its streams at once: a page kept in the
  // back-forward cache must not hold the browser's few connections to the
  // agent. Coming back reopens them.
  window.addEventListener('pagehide', () => {
    agentPoll.stop();
    servicesPoll.stop();
    if (page) page.close();
  });
  window.addEventListener('pageshow', (e) => {
    if (!e.persisted) return;
    agentPoll.start();
    route(false);
  });
  setInterval(tick, 1000);
  agentPoll.start();
  route(false);
}

start();

// The sale page. Everything it shows comes from the public HTTP API (src/http/openapi.yaml):
// - the seat map from GET /v1/schedules/{id}/seats/stream (EventSource: a `snapshot`, then one
//   `seat` event per change; the browser resumes with Last-Event-ID by itself), falling back to
//   polling GET /v1/schedules/{id}/seats where no stream is served;
// - the visitor's notifications from GET /v1/users/me/notifications/stream, which needs the
//   Authorization header: EventSource cannot send one, so it is read with fetch() and parsed here.
// The visitor (userId + token) lives in sessionStorage: one visitor per tab.
'use strict';

const $ = (id) => document.getElementById(id);

const state = {
  user: JSON.parse(sessionStorage.getItem('booking.user') || 'null'),
  scheduleId: null,
  seats: new Map(),        // seatId -> {seatId, seatNo, status, price}
  seatSource: null,        // EventSource of the seat map
  seatPoll: null,          // fallback timer when no stream is served
  queue: null,             // {token, status, position, activeUntil, samples: [[t, position]]}
  queueTimer: null,
  reservations: new Map(), // reservationId -> reservation as the API returns it
  notes: new Set(),        // notificationIds shown
  notesAbort: null,
};

// ---------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, { body, headers = {}, auth = true } = {}) {
  const h = { ...headers };
  if (auth && state.user) h.Authorization = `Bearer ${state.user.token}`;
  if (body !== undefined) h['Content-Type'] = 'application/json';
  const res = await fetch(path, { method, headers: h, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const err = (json && json.error) || {};
    throw new ApiError(res.status, err.code || String(res.status), err.message || res.statusText);
  }
  return json;
}

// A fresh Idempotency-Key. crypto.randomUUID exists only in secure contexts (https, localhost).
function newKey() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return `k-${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

function show(text, kind = 'error') {
  const m = $('message');
  m.textContent = text;
  m.className = `message ${kind}`;
  m.hidden = !text;
}

function failed(what) {
  return (e) => show(`${what}: ${e.code ? `${e.code} — ` : ''}${e.message}`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fmtPoints = (n) => Number(n).toLocaleString('en-US');
const fmtTime = (iso) => new Date(iso).toLocaleString('en-GB', { dateStyle: 'medium', timeStyle: 'short' });

// ---------------------------------------------------------------------------------------------
// Concerts and schedules

async function loadConcerts() {
  const list = $('concerts');
  try {
    const { items } = await api('GET', '/v1/concerts', { auth: false });
    list.replaceChildren();
    if (!items.length) list.append(li('No concerts yet.', 'muted'));
    for (const c of items) {
      const item = document.createElement('li');
      const title = document.createElement('h3');
      title.textContent = c.title;
      const schedules = document.createElement('ul');
      schedules.className = 'schedules';
      item.append(title, schedules);
      list.append(item);
      loadSchedules(c, schedules);
    }
  } catch (e) {
    list.replaceChildren(li(`Could not load concerts: ${e.message}`, 'muted'));
  }
}

async function loadSchedules(concert, into) {
  const { items } = await api('GET', `/v1/concerts/${concert.concertId}/schedules`, { auth: false });
  for (const s of items) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'schedule';
    b.dataset.scheduleId = s.scheduleId;
    b.textContent = `${fmtTime(s.startsAt)} · ${s.availableSeats} of ${s.seatCount} seats free`;
    b.setAttribute('aria-label', `${concert.title}, ${fmtTime(s.startsAt)}`);
    b.addEventListener('click', () => selectSchedule(s, concert));
    const item = document.createElement('li');
    item.append(b);
    into.append(item);
    // A link with #schedule=<id> opens that schedule directly.
    if (location.hash === `#schedule=${s.scheduleId}` && !state.scheduleId) selectSchedule(s, concert);
  }
}

function li(text, cls) {
  const e = document.createElement('li');
  e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

async function selectSchedule(s, concert) {
  if (state.scheduleId === s.scheduleId) return;
  state.scheduleId = s.scheduleId;
  history.replaceState(null, '', `#schedule=${s.scheduleId}`);
  document.querySelectorAll('button.schedule').forEach((b) => b.classList.toggle('selected', b.dataset.scheduleId === s.scheduleId));
  $('schedule').hidden = false;
  $('seats-h').textContent = `Seats — ${concert.title}`;
  $('schedule-info').textContent = `Starts ${fmtTime(s.startsAt)} · booking opened ${fmtTime(s.bookingOpensAt)}`;
  stopQueue();
  state.queue = null;
  renderQueue();
  state.seats.clear();
  // Prices come with the plain list; the stream carries statuses only.
  try {
    const { items } = await api('GET', `/v1/schedules/${s.scheduleId}/seats`, { auth: false });
    for (const seat of items) state.seats.set(seat.seatId, { ...seat });
  } catch (e) {
    failed('Seats')(e);
  }
  renderSeats();
  watchSeats(s.scheduleId);
}

// ---------------------------------------------------------------------------------------------
// The live seat map

function watchSeats(scheduleId) {
  if (state.seatSource) state.seatSource.close();
  clearInterval(state.seatPoll);
  const es = new EventSource(`/v1/schedules/${scheduleId}/seats/stream`);
  state.seatSource = es;
  let opened = false;
  es.onopen = () => { opened = true; streamState('live', 'live'); };
  es.addEventListener('snapshot', (e) => {
    const d = JSON.parse(e.data);
    const items = Array.isArray(d) ? d : (d.items || d.seats || []);
    const seen = new Set();
    for (const s of items) {
      seen.add(s.seatId);
      const old = state.seats.get(s.seatId) || {};
      state.seats.set(s.seatId, { ...old, ...s });
    }
    for (const id of [...state.seats.keys()]) if (!seen.has(id)) state.seats.delete(id);
    renderSeats();
  });
  es.addEventListener('seat', (e) => {
    const s = JSON.parse(e.data);
    const old = state.seats.get(s.seatId) || {};
    state.seats.set(s.seatId, { ...old, ...s });
    renderSeats();
    seatChanged(s);
  });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED) {
      // Refused outright (no stream on this api): poll the plain list instead.
      if (!opened) {
        streamState('polling', 'warn');
        state.seatPoll = setInterval(() => pollSeats(scheduleId), 2000);
      } else {
        streamState('disconnected', 'warn');
        setTimeout(() => state.scheduleId === scheduleId && watchSeats(scheduleId), 2000);
      }
    } else {
      streamState('reconnecting…', 'warn'); // the browser retries with Last-Event-ID
    }
  };
}

async function pollSeats(scheduleId) {
  if (state.scheduleId !== scheduleId) return;
  try {
    const { items } = await api('GET', `/v1/schedules/${scheduleId}/seats`, { auth: false });
    for (const s of items) {
      const old = state.seats.get(s.seatId);
      state.seats.set(s.seatId, { ...s });
      if (old && old.status !== s.status) seatChanged(s);
    }
    renderSeats();
  } catch (_) { /* next tick */ }
}

function streamState(text, cls) {
  const p = $('stream-state');
  p.textContent = text;
  p.className = `pill ${cls}`;
}

// A seat of one of our reservations changed: read the reservation again (expired, paid…).
function seatChanged(seat) {
  for (const r of state.reservations.values()) {
    if (r.seatId === seat.seatId && ['HELD', 'CONFIRMED'].includes(r.status)) refreshReservation(r.reservationId);
  }
}

function mySeatIds() {
  const ids = new Set();
  for (const r of state.reservations.values()) if (['HELD', 'CONFIRMED'].includes(r.status)) ids.add(r.seatId);
  return ids;
}

function renderSeats() {
  const map = $('seatmap');
  const mine = mySeatIds();
  const seats = [...state.seats.values()].sort((a, b) => a.seatNo - b.seatNo);
  const counts = { AVAILABLE: 0, HELD: 0, SOLD: 0 };
  // Buttons are kept (not rebuilt) so focus and pending clicks survive updates.
  const existing = new Map([...map.children].map((b) => [b.dataset.seatId, b]));
  seats.forEach((s, i) => {
    counts[s.status] = (counts[s.status] || 0) + 1;
    let b = existing.get(s.seatId);
    if (!b) {
      b = document.createElement('button');
      b.type = 'button';
      b.dataset.seatId = s.seatId;
      b.addEventListener('click', () => holdSeat(b.dataset.seatId));
    }
    existing.delete(s.seatId);
    if (map.children[i] !== b) map.insertBefore(b, map.children[i] || null);
    const status = s.status.toLowerCase();
    b.textContent = s.seatNo;
    b.className = `seat ${status}${mine.has(s.seatId) ? ' mine' : ''}`;
    b.dataset.status = s.status;
    b.setAttribute('aria-label', `Seat ${s.seatNo}: ${status}`);
    b.title = `Seat ${s.seatNo}: ${status}${s.price !== undefined ? ` · ${fmtPoints(s.price)} points` : ''}`;
    b.disabled = s.status !== 'AVAILABLE';
  });
  for (const b of existing.values()) b.remove();
  $('seat-counts').textContent = `· ${counts.AVAILABLE} available, ${counts.HELD} held, ${counts.SOLD} sold`;
}

// ---------------------------------------------------------------------------------------------
// The visitor

async function signUp(ev) {
  ev.preventDefault();
  const name = new FormData(ev.target).get('name').trim();
  if (!name) return;
  try {
    const u = await api('POST', '/v1/users', { body: { name }, auth: false });
    state.user = { ...u, name };
    sessionStorage.setItem('booking.user', JSON.stringify(state.user));
    show('');
    await startSession();
  } catch (e) {
    failed('Sign up')(e);
  }
}

async function startSession() {
  $('signup').hidden = true;
  $('account').hidden = false;
  $('user-name').textContent = state.user.name;
  renderQueue();
  await refreshBalance();
  loadReservations();
  followNotifications();
}

async function refreshBalance() {
  try {
    const { balance } = await api('GET', '/v1/users/me/points');
    $('balance').textContent = fmtPoints(balance);
  } catch (e) {
    if (e.status === 401) return signOut();
    failed('Balance')(e);
  }
}

function signOut() {
  sessionStorage.removeItem('booking.user');
  state.user = null;
  if (state.notesAbort) state.notesAbort.abort();
  $('signup').hidden = false;
  $('account').hidden = true;
  renderQueue();
}

async function charge() {
  try {
    const { balance } = await api('POST', '/v1/users/me/points/charges', { body: { amount: 100000 }, headers: { 'Idempotency-Key': newKey() } });
    $('balance').textContent = fmtPoints(balance);
    show('');
  } catch (e) {
    failed('Charge')(e);
  }
}

// ---------------------------------------------------------------------------------------------
// The waiting queue

async function enterQueue() {
  if (!state.user || !state.scheduleId) return;
  try {
    const q = await api('POST', '/v1/queue/tokens', { body: { scheduleId: state.scheduleId } });
    state.queue = { token: q.queueToken, scheduleId: state.scheduleId, samples: [], ...q };
    show('');
    queueUpdated(q);
  } catch (e) {
    failed('Queue')(e);
  }
}

function stopQueue() {
  clearTimeout(state.queueTimer);
  state.queueTimer = null;
}

// Records a queue answer and asks again when the server says to (sooner near the front).
function queueUpdated(q) {
  const queue = state.queue;
  Object.assign(queue, q);
  if (q.status === 'WAITING') {
    queue.samples.push([Date.now(), q.position]);
    queue.samples = queue.samples.filter(([t]) => Date.now() - t < 30000);
  }
  renderQueue();
  stopQueue();
  if (q.status === 'EXPIRED') return;
  const wait = q.status === 'ACTIVE' ? 5000 : Math.min(Math.max(q.retryAfterMs || 1000, 250), 5000);
  state.queueTimer = setTimeout(pollQueue, wait);
}

async function pollQueue() {
  const queue = state.queue;
  if (!queue || queue.scheduleId !== state.scheduleId) return;
  try {
    const q = await api('GET', '/v1/queue/tokens/me', { headers: { 'X-Queue-Token': queue.token } });
    if (state.queue === queue) queueUpdated(q);
  } catch (_) {
    state.queueTimer = setTimeout(pollQueue, 2000);
  }
}

// Seconds until admission, from how fast the position has been falling; null until it moved.
function waitEstimate(queue) {
  const s = queue.samples;
  if (s.length < 2) return null;
  const [t0, p0] = s[0];
  const [t1, p1] = s[s.length - 1];
  if (p1 >= p0 || t1 <= t0) return null;
  const perSecond = (p0 - p1) / ((t1 - t0) / 1000);
  return Math.ceil(p1 / perSecond);
}

function renderQueue() {
  const status = $('queue-status');
  const button = $('enter-queue');
  const q = state.queue;
  button.disabled = !state.user || !state.scheduleId || (q && q.status !== 'EXPIRED');
  status.className = '';
  if (!state.scheduleId) {
    status.textContent = 'Pick a schedule, then enter its queue to book.';
  } else if (!state.user) {
    status.textContent = 'Sign up to enter the queue.';
  } else if (!q) {
    status.textContent = 'Enter the queue to book a seat.';
  } else if (q.status === 'WAITING') {
    const eta = waitEstimate(q);
    status.textContent = `Waiting: position ${q.position}${eta === null ? ' · estimating the wait…' : ` · about ${eta} s to go`}`;
  } else if (q.status === 'ACTIVE') {
    status.className = 'ok';
    status.textContent = `Your turn: pick an available seat${q.activeUntil ? ` (until ${new Date(q.activeUntil).toLocaleTimeString()})` : ''}.`;
  } else {
    status.textContent = 'Your turn lapsed. Enter the queue again to book.';
  }
}

// ---------------------------------------------------------------------------------------------
// Holds, payment, cancellation, refund

async function holdSeat(seatId) {
  const seat = state.seats.get(seatId);
  if (!state.user) return show('Sign up first, then enter the queue.', 'info');
  if (!state.queue || state.queue.status !== 'ACTIVE') return show('Enter the queue and wait for your turn to hold a seat.', 'info');
  try {
    const r = await api('POST', '/v1/reservations', { body: { seatId }, headers: { 'X-Queue-Token': state.queue.token } });
    r.seatNo = seat && seat.seatNo;
    state.reservations.set(r.reservationId, r);
    show('');
    renderReservations();
    renderSeats();
  } catch (e) {
    failed(`Seat ${seat ? seat.seatNo : ''}`)(e);
  }
}

async function loadReservations() {
  // GET /v1/users/me/reservations where the api has it; otherwise this tab's own holds.
  try {
    const { items } = await api('GET', '/v1/users/me/reservations');
    for (const r of items) state.reservations.set(r.reservationId, { ...state.reservations.get(r.reservationId), ...r });
  } catch (_) { /* older api */ }
  renderReservations();
}

async function refreshReservation(id) {
  try {
    const r = await api('GET', `/v1/reservations/${id}`);
    const old = state.reservations.get(id) || {};
    state.reservations.set(id, { ...old, ...r });
    renderReservations();
    renderSeats();
  } catch (_) { /* shown on the next change */ }
}

async function pay(id) {
  try {
    // One key per reservation: a double click pays once.
    const p = await api('POST', '/v1/payments', { body: { reservationId: id }, headers: { 'Idempotency-Key': `pay-${id}` } });
    $('balance').textContent = fmtPoints(p.balance);
    show('');
    if (state.queue) { state.queue.status = 'EXPIRED'; renderQueue(); } // paying frees the queue place
  } catch (e) {
    failed('Payment')(e);
  }
  refreshReservation(id);
}

async function cancel(id) {
  try {
    await api('DELETE', `/v1/reservations/${id}`);
    show('');
  } catch (e) {
    failed('Cancel')(e);
  }
  refreshReservation(id);
}

async function refund(id) {
  try {
    const r = await api('POST', `/v1/reservations/${id}/refund`, { headers: { 'Idempotency-Key': `refund-${id}` } });
    $('balance').textContent = fmtPoints(r.balance);
    show(`Refunded ${fmtPoints(r.refundedAmount)} points.`, 'info');
  } catch (e) {
    failed('Refund')(e);
  }
  refreshReservation(id);
}

function seatNoOf(r) {
  if (r.seatNo) return r.seatNo;
  const s = state.seats.get(r.seatId);
  return s ? s.seatNo : '?';
}

function renderReservations() {
  const list = $('reservations');
  const items = [...state.reservations.values()].sort((a, b) => (b.createdAt || '').localeCompare(a.createdAt || ''));
  list.replaceChildren();
  if (!items.length) list.append(li('None yet.', 'muted'));
  for (const r of items) {
    const item = document.createElement('li');
    item.className = `reservation ${r.status.toLowerCase()}`;
    item.dataset.reservationId = r.reservationId;
    const head = document.createElement('div');
    head.innerHTML = '<strong></strong> <span class="status"></span>';
    head.querySelector('strong').textContent = `Seat ${seatNoOf(r)}`;
    head.querySelector('.status').textContent = r.status;
    item.append(head);
    const detail = document.createElement('div');
    detail.className = 'muted';
    detail.textContent = `${fmtPoints(r.price)} points`;
    item.append(detail);
    if (r.status === 'HELD') {
      const countdown = document.createElement('div');
      countdown.className = 'countdown';
      countdown.dataset.expiresAt = r.expiresAt;
      countdown.dataset.reservationId = r.reservationId;
      item.append(countdown);
      item.append(button(`Pay ${fmtPoints(r.price)} points`, () => pay(r.reservationId)));
      item.append(button('Cancel hold', () => cancel(r.reservationId), 'secondary'));
    } else if (r.status === 'CONFIRMED') {
      item.append(button('Refund', () => refund(r.reservationId), 'secondary'));
    }
    list.append(item);
  }
  tick();
}

function button(text, onClick, cls) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = text;
  if (cls) b.className = cls;
  b.addEventListener('click', onClick);
  return b;
}

// Countdowns to expiresAt. At zero the hold can no longer be paid (the server checks the same
// time), and the reservation is read again until the expirer has ended it.
function tick() {
  for (const c of document.querySelectorAll('.countdown')) {
    const left = Math.max(0, new Date(c.dataset.expiresAt).getTime() - Date.now());
    if (left > 0) {
      const s = Math.ceil(left / 1000);
      c.textContent = `Expires in ${Math.floor(s / 60)}:${String(s % 60).padStart(2, '0')}`;
    } else {
      c.textContent = 'Expired';
      const id = c.dataset.reservationId;
      const r = state.reservations.get(id);
      if (r && !(r.recheckAt > Date.now())) {
        r.recheckAt = Date.now() + 1000;
        refreshReservation(id);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Notifications: fetch() + a Server-Sent Events parser (EventSource cannot send Authorization)

async function followNotifications() {
  if (state.notesAbort) state.notesAbort.abort();
  const abort = new AbortController();
  state.notesAbort = abort;
  const user = state.user;
  // What is stored already, then the stream from right after it (cursor = event id).
  let lastId = null;
  try {
    let after = '';
    for (;;) {
      const page = await api('GET', `/v1/users/me/notifications${after ? `?after=${after}` : ''}`);
      page.items.forEach(addNotification);
      if (!page.items.length || !page.next || page.next === after) break;
      after = page.next;
    }
    lastId = after || null;
  } catch (_) { /* the stream still runs */ }
  let backoff = 500;
  while (!abort.signal.aborted && state.user === user) {
    try {
      const headers = { Authorization: `Bearer ${user.token}`, Accept: 'text/event-stream' };
      if (lastId) headers['Last-Event-ID'] = lastId;
      const res = await fetch('/v1/users/me/notifications/stream', { headers, signal: abort.signal });
      if (res.status === 401) return signOut();
      if (!res.ok || !res.body) throw new Error(`stream answered ${res.status}`);
      notesState('live', 'live');
      backoff = 500;
      await readSse(res.body, (ev) => {
        if (ev.id) lastId = ev.id;
        if (!ev.data) return;
        try { addNotification(JSON.parse(ev.data)); } catch (_) { /* not JSON */ }
      });
    } catch (e) {
      if (abort.signal.aborted) return;
    }
    notesState('reconnecting…', 'warn');
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 5000);
  }
}

// Reads an SSE body, calling onEvent({id, event, data}) per event (the WHATWG rules: lines end
// with LF, CR or CRLF; a blank line dispatches; `:` starts a comment; data lines are joined).
async function readSse(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  let ev = { id: null, event: 'message', data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value;
    for (;;) {
      const m = /\r\n|\r|\n/.exec(buf);
      // A lone CR at the end may be the first half of CRLF: wait for the next chunk.
      if (!m || (m[0] === '\r' && m.index === buf.length - 1)) break;
      const line = buf.slice(0, m.index);
      buf = buf.slice(m.index + m[0].length);
      if (line === '') {
        if (ev.data.length) onEvent({ id: ev.id, event: ev.event, data: ev.data.join('\n') });
        ev = { id: ev.id, event: 'message', data: [] };
        continue;
      }
      if (line.startsWith(':')) continue;
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? '' : line.slice(colon + 1);
      if (val.startsWith(' ')) val = val.slice(1);
      if (field === 'data') ev.data.push(val);
      else if (field === 'event') ev.event = val;
      else if (field === 'id') ev.id = val;
    }
  }
}

function notesState(text, cls) {
  const p = $('notes-state');
  p.textContent = text;
  p.className = `pill ${cls}`;
}

function addNotification(n) {
  if (state.notes.has(n.notificationId)) return;
  state.notes.add(n.notificationId);
  const item = document.createElement('li');
  item.className = `note ${String(n.type).toLowerCase()}`;
  item.innerHTML = '<div class="note-head"><strong></strong> <code></code></div><div class="note-msg"></div><time class="muted"></time>';
  item.querySelector('strong').textContent = n.title;
  item.querySelector('code').textContent = n.type;
  item.querySelector('.note-msg').textContent = n.message;
  item.querySelector('time').textContent = new Date(n.createdAt).toLocaleTimeString();
  $('notifications').prepend(item);
  // A notification about one of our reservations: its status changed.
  const id = n.data && n.data.reservationId;
  if (id) {
    if (!state.reservations.has(id) && ['PAYMENT_CONFIRMED', 'PAYMENT_REFUNDED', 'RESERVATION_EXPIRED'].includes(n.type)) {
      state.reservations.set(id, { reservationId: id, seatId: n.data.seatId, status: 'HELD', price: n.data.amount || 0 });
    }
    refreshReservation(id);
  }
  if (['PAYMENT_CONFIRMED', 'PAYMENT_REFUNDED'].includes(n.type)) refreshBalance();
  if (n.type === 'QUEUE_ACTIVATED' && state.queue) pollQueue();
}

// ---------------------------------------------------------------------------------------------

document.addEventListener('DOMContentLoaded', () => {
  $('signup').addEventListener('submit', signUp);
  $('charge').addEventListener('click', charge);
  $('enter-queue').addEventListener('click', enterQueue);
  setInterval(tick, 250);
  setInterval(() => state.queue && state.queue.status === 'WAITING' && renderQueue(), 1000);
  loadConcerts();
  if (state.user) startSession();
});

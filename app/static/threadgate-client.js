// threadgate-client: a dependency-free client of threadgate (browsers and node >= 18).
//
// `reduce` is the one place the client rules live (reset, resume_from, duplicates, stalled);
// `attach` follows a thread's latest run over SSE with it, reconnecting with Last-Event-ID
// across pod deaths and network drops; `post`, `cancel`, `run`, `runs`, `messagesPage` and
// `messages` are the rest of the HTTP API (listings come a page at a time, newest first). Several base URLs may be given: a request goes to the next one when a
// pod is unreachable or answers 503. The chat page served by the pods loads this very file
// (app/static/threadgate-client.js is a copy, kept identical by a test).

export const THREAD_RE = /^[A-Za-z0-9_-]{1,128}$/;
export const EVENT_TYPES = ["run_started", "reset", "chunk", "data", "stalled", "done"];
export const TERMINAL = ["success", "error", "cancelled", "interrupted"];

// ---- the reducer ----------------------------------------------------------------------------

/** The state of a reply before any event: no run yet. */
export function initial(runId = null) {
  return {
    runId, // the run whose events this state holds
    attempt: 0, // the newest attempt seen
    parts: [], // {index, attempt, type: "text", text} | {index, attempt, type: "data", name, payload}, by index
    status: "pending", // pending | running | success | error | cancelled | interrupted
    done: false,
    error: null, // done.error: {code, message}
    stalled: null, // the executor that went away, until the next run_started
    notice: null, // what to tell a person about it: "threadgate-2 went away, resuming…"
    resets: 0, // how many times held parts were dropped (a reset, or a continuation's cut)
  };
}

/**
 * state + event → state. Pure: the state given is never changed.
 * `event` is `{type, data}` with `data` the event's JSON object (`run_id`, `attempt`, ...).
 */
export function reduce(state, event) {
  const type = event && event.type;
  const d = event && event.data;
  if (!d || typeof d !== "object" || typeof d.run_id !== "string") return state;
  let s = state;
  if (s.runId !== d.run_id) s = initial(d.run_id); // another run: a reply of its own
  if (s.done) return s; // a run's one `done` is final
  switch (type) {
    case "run_started": {
      const attempt = d.attempt | 0;
      if (attempt < s.attempt) return s; // a superseded attempt's straggler
      let { parts, resets } = s;
      if (Number.isInteger(d.resume_from)) {
        // A continuation: parts 0..k-1 stay; what an earlier attempt wrote from k on is void.
        const k = d.resume_from;
        const kept = parts.filter((p) => p.index < k || p.attempt >= attempt);
        if (kept.length !== parts.length) [parts, resets] = [kept, resets + 1];
      } else if (attempt > s.attempt && parts.length) {
        // A regenerating attempt: the server sends `reset` first; drop in any case.
        [parts, resets] = [[], resets + 1];
      }
      return { ...s, attempt, parts, resets, status: "running", stalled: null, notice: null };
    }
    case "reset":
      return {
        ...s,
        attempt: Math.max(s.attempt, d.attempt | 0),
        parts: [],
        resets: s.resets + 1,
        status: "running",
      };
    case "chunk":
    case "data": {
      const attempt = d.attempt | 0;
      const index = d.index;
      if (!Number.isInteger(index) || index < 0 || attempt < s.attempt) return s;
      let { parts, resets } = s;
      if (attempt > s.attempt) {
        // Its run_started never reached us: whatever we hold from this index on is superseded.
        const kept = parts.filter((p) => p.index < index);
        if (kept.length !== parts.length) [parts, resets] = [kept, resets + 1];
      }
      const part =
        type === "chunk"
          ? { index, attempt, type: "text", text: String(d.text ?? "") }
          : { index, attempt, type: "data", name: String(d.name ?? ""), payload: d.payload };
      const at = insertionPoint(parts, index);
      if (at < 0) {
        // This index is held already: a duplicate of the same attempt.
        return parts === s.parts ? s : { ...s, attempt, parts, resets };
      }
      parts = [...parts.slice(0, at), part, ...parts.slice(at)];
      return { ...s, attempt, parts, resets, status: "running" };
    }
    case "stalled": {
      const executor = String(d.executor ?? "the pod");
      return { ...s, stalled: executor, notice: `${executor} went away, resuming…` };
    }
    case "done":
      return {
        ...s,
        done: true,
        status: d.status || "error",
        error: d.error || null,
        attempt: Math.max(s.attempt, d.attempt | 0),
        stalled: null,
        notice: null,
      };
    default:
      return s;
  }
}

// Where a part with `index` goes in `parts` (sorted by index); -1 if that index is held.
function insertionPoint(parts, index) {
  const n = parts.length;
  if (n === 0 || parts[n - 1].index < index) return n; // the usual case: in order
  let lo = 0;
  let hi = n;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (parts[mid].index < index) lo = mid + 1;
    else hi = mid;
  }
  return parts[lo].index === index ? -1 : lo;
}

/** The reply's text: its text parts in index order. */
export function textOf(state) {
  let text = "";
  for (const p of state.parts) if (p.type === "text") text += p.text;
  return text;
}

/** What `attach` resolves to. */
export function replyOf(state) {
  return {
    runId: state.runId,
    status: state.status,
    attempt: state.attempt,
    text: textOf(state),
    parts: state.parts.map((p) =>
      p.type === "text"
        ? { type: "text", index: p.index, text: p.text }
        : { type: "data", index: p.index, name: p.name, payload: p.payload },
    ),
    error: state.error,
  };
}

// ---- errors and HTTP ------------------------------------------------------------------------

/** An HTTP error answer (`status` > 0) or no pod answering (`status` 0, code "unreachable"). */
export class ThreadgateError extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.name = "ThreadgateError";
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

function urlsOf(url) {
  const list = (Array.isArray(url) ? url : [url]).map((u) => String(u).replace(/\/+$/, ""));
  if (!list.length) throw new TypeError("threadgate-client: no base URL given");
  return list;
}

function checkThread(thread) {
  if (!THREAD_RE.test(thread)) {
    throw new ThreadgateError(400, "invalid_thread_id", "a thread id is 1 to 128 letters, digits, _ or -");
  }
  return thread;
}

function randomId() {
  // crypto.randomUUID needs a secure context; getRandomValues does not.
  const b = globalThis.crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function abortError(signal) {
  if (signal && signal.reason !== undefined) return signal.reason;
  const err = new Error("aborted");
  err.name = "AbortError";
  return err;
}

function isAbort(err, signal) {
  return (signal && signal.aborted) || (err && err.name === "AbortError");
}

async function errorOf(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    // not JSON: the status says enough
  }
  const e = (body && body.error) || {};
  return new ThreadgateError(resp.status, e.code || "http_error", e.message || `HTTP ${resp.status}`, body);
}

/**
 * One request, tried on each base URL in turn while a pod is unreachable or answers 503.
 * Resolves to the JSON body (null for 204); rejects with a ThreadgateError.
 */
export async function request(url, method, path, { token, body, headers, query, signal } = {}) {
  const urls = urlsOf(url);
  const qs = query ? new URLSearchParams(Object.entries(query).filter(([, v]) => v != null)).toString() : "";
  const h = { Accept: "application/json", ...(headers || {}) };
  if (token) h.Authorization = `Bearer ${token}`;
  if (body !== undefined) h["Content-Type"] = "application/json";
  let last = null;
  for (let i = 0; i < urls.length; i++) {
    let resp;
    try {
      resp = await fetch(`${urls[i]}${path}${qs ? `?${qs}` : ""}`, {
        method,
        headers: h,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
      });
    } catch (err) {
      if (isAbort(err, signal)) throw err;
      last = err;
      continue; // unreachable: the next pod
    }
    if (resp.status === 503 && i < urls.length - 1) {
      last = await errorOf(resp); // draining or not ready: the next pod can answer
      continue;
    }
    if (resp.status === 204) return null;
    if (!resp.ok) throw await errorOf(resp);
    return resp.json();
  }
  if (last instanceof ThreadgateError) throw last;
  throw new ThreadgateError(0, "unreachable", `no pod answered ${method} ${path}: ${last}`);
}

/**
 * Post a message to a thread: a new run. An Idempotency-Key is always sent (made up when not
 * given), so that a POST retried on another pod after a lost answer cannot make a second run.
 */
export async function post(url, thread, input, opts = {}) {
  const body = {
    input,
    multitask_strategy: opts.strategy || "enqueue",
    model_options: opts.modelOptions || {},
  };
  if (opts.timeoutS != null) body.timeout_s = opts.timeoutS;
  return request(url, "POST", `/threads/${checkThread(thread)}/runs`, {
    token: opts.token,
    signal: opts.signal,
    body,
    headers: { "Idempotency-Key": opts.idempotencyKey || `client-${randomId()}` },
  });
}

export async function cancel(url, thread, runId, opts = {}) {
  return request(url, "POST", `/threads/${checkThread(thread)}/runs/${encodeURIComponent(runId)}/cancel`, {
    token: opts.token,
    signal: opts.signal,
    query: { wait: opts.wait ? "true" : undefined },
  });
}

export async function run(url, thread, runId, opts = {}) {
  return request(url, "GET", `/threads/${checkThread(thread)}/runs/${encodeURIComponent(runId)}`, opts);
}

/**
 * One page of the thread's runs, newest first: `{runs, next_cursor, next_before}`. `limit`:
 * the page's size (the server's default, 50, when not given; at most its maximum, 200);
 * `cursor`: a page's `next_cursor`, for the page after it (null on the last page).
 */
export async function runs(url, thread, opts = {}) {
  return request(url, "GET", `/threads/${checkThread(thread)}/runs`, {
    token: opts.token,
    signal: opts.signal,
    query: { limit: opts.limit, cursor: opts.cursor, before: opts.before },
  });
}

/**
 * One page of the conversation, newest message first (what a chat opens on: its latest turns;
 * older pages go above them): `{thread_id, messages, next_cursor}`. `limit` and `cursor` as
 * for `runs`. A message's `parts` is null when it is text only (its `content` is all of it).
 */
export async function messagesPage(url, thread, opts = {}) {
  return request(url, "GET", `/threads/${checkThread(thread)}/messages`, {
    token: opts.token,
    signal: opts.signal,
    query: { limit: opts.limit, cursor: opts.cursor },
  });
}

/**
 * The conversation in order, oldest first: `{thread_id, messages}` with its `limit` latest
 * messages, or all of it (every page, read newest first) when `limit` is not given.
 */
export async function messages(url, thread, opts = {}) {
  const newestFirst = [];
  let cursor;
  for (;;) {
    const left = opts.limit == null ? null : opts.limit - newestFirst.length;
    const page = await messagesPage(url, thread, { ...opts, limit: left != null && left < 50 ? left : undefined, cursor });
    newestFirst.push(...page.messages);
    cursor = page.next_cursor;
    if (!cursor || (left != null && newestFirst.length >= opts.limit)) break;
  }
  const kept = opts.limit == null ? newestFirst : newestFirst.slice(0, opts.limit);
  return { thread_id: thread, messages: kept.reverse() };
}

// ---- SSE ------------------------------------------------------------------------------------

/** An incremental SSE parser: feed it text, it calls `onEvent({type, id, data})` per event. */
export function sseParser(onEvent) {
  let buf = "";
  let type = "";
  let data = [];
  let id = null;
  const line = (l) => {
    if (l === "") {
      if (data.length) onEvent({ type: type || "message", id, data: data.join("\n") });
      type = "";
      data = [];
      id = null;
      return;
    }
    if (l[0] === ":") return;
    const colon = l.indexOf(":");
    const field = colon < 0 ? l : l.slice(0, colon);
    let value = colon < 0 ? "" : l.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
    else if (field === "id" && !value.includes("\0")) id = value;
  };
  let afterCR = false; // a CR ended the last line: an LF right after it (next feed too) is its pair
  return (text) => {
    buf += text;
    let start = 0;
    for (let i = 0; i < buf.length; i++) {
      const c = buf[i];
      if (c === "\n" && afterCR && i === start) {
        start = i + 1;
        afterCR = false;
        continue;
      }
      afterCR = false;
      if (c === "\n" || c === "\r") {
        line(buf.slice(start, i));
        afterCR = c === "\r";
        start = i + 1;
      }
    }
    buf = buf.slice(start);
  };
}

// Reads one attach response with fetch (node, or a browser asked for it). Resolves to
// {done} once the run's `done` came, {empty} for a 204, {ended} when the stream stopped early.
async function fetchStream(base, thread, { token, lastEventId, signal, idleMs, wait }, onEvent, onOpen) {
  const ctrl = new AbortController();
  const stop = () => ctrl.abort(abortError(signal));
  if (signal) signal.addEventListener("abort", stop, { once: true });
  let idle = 0;
  const arm = () => {
    clearTimeout(idle);
    // A connection that went silent (no keepalive) is dead without anyone saying so.
    if (idleMs > 0) idle = setTimeout(() => ctrl.abort(new Error("attach: no data, not even a keepalive")), idleMs);
  };
  try {
    const headers = { Accept: "text/event-stream" };
    if (token) headers.Authorization = `Bearer ${token}`;
    if (lastEventId) headers["Last-Event-ID"] = String(lastEventId);
    arm();
    const q = wait ? "" : "?wait=false";
    const resp = await fetch(`${base}/threads/${thread}/attach${q}`, { headers, signal: ctrl.signal, cache: "no-store" });
    if (resp.status === 204) return { empty: true };
    if (!resp.ok) throw await errorOf(resp);
    onOpen();
    let done = false;
    const feed = sseParser((ev) => {
      if (!done && onEvent(ev)) done = true;
    });
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      arm();
      const { value, done: eof } = await reader.read();
      if (eof) break;
      feed(decoder.decode(value, { stream: true }));
      if (done) {
        reader.cancel().catch(() => {});
        return { done: true };
      }
    }
    feed("\n\n"); // an event the server completed but did not terminate is not dispatched
    return { ended: true };
  } finally {
    clearTimeout(idle);
    if (signal) signal.removeEventListener("abort", stop);
  }
}

// Reads one attach response with EventSource (browsers: it cannot send headers, so the token
// and the resume point go in the query). The browser's own reconnect is not used: a failed
// connection is closed and the caller decides where to go next.
function eventSourceStream(base, thread, { token, lastEventId, signal, wait }, onEvent, onOpen) {
  return new Promise((resolve, reject) => {
    const q = new URLSearchParams();
    if (!wait) q.set("wait", "false");
    if (token) q.set("access_token", token);
    if (lastEventId) q.set("last_event_id", String(lastEventId));
    const qs = q.toString();
    const es = new EventSource(`${base}/threads/${thread}/attach${qs ? `?${qs}` : ""}`);
    let settled = false;
    const finish = (fn, value) => {
      if (settled) return;
      settled = true;
      es.close();
      if (signal) signal.removeEventListener("abort", onAbort);
      fn(value);
    };
    const onAbort = () => finish(reject, abortError(signal));
    if (signal) signal.addEventListener("abort", onAbort, { once: true });
    for (const type of EVENT_TYPES) {
      es.addEventListener(type, (m) => {
        if (settled) return;
        if (onEvent({ type, id: m.lastEventId || null, data: m.data })) finish(resolve, { done: true });
      });
    }
    es.onopen = () => settled || onOpen();
    // No status code reaches us: a 204, a 401 and a dead pod look the same. `unknown` asks
    // the caller to find out.
    es.onerror = () => finish(resolve, { ended: true, unknown: true });
  });
}

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    if (signal && signal.aborted) return reject(abortError(signal));
    const t = setTimeout(() => {
      if (signal) signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(t);
      reject(abortError(signal));
    };
    if (signal) signal.addEventListener("abort", onAbort, { once: true });
  });

/**
 * Follow the thread's latest run to its `done`; resolves to its reply
 * `{runId, status, attempt, text, parts, error}`, or null when the thread has no run.
 *
 * Callbacks: `onText(delta, state)` and `onData(part, state)` for each new part in order;
 * `onReset(state)` when parts already given were dropped (a regenerating attempt, or a
 * continuation that cuts them): the parts the state still holds are then given again, so the
 * concatenated `onText` deltas since the last `onReset` are always the reply's text;
 * `onStatus(status)` with `{connection, run, attempt, notice, runId}` whenever one changes;
 * `onUpdate(state, event)` after every event applied. `lastEventId` resumes after that event.
 * `transport`: "eventsource" (default where EventSource exists) or "fetch". `wait`: on a
 * thread with no run yet, wait for its first one (servers that can) instead of resolving null.
 */
export async function attach(url, thread, opts = {}) {
  const urls = urlsOf(url);
  checkThread(thread);
  const { signal, token } = opts;
  const useEventSource =
    opts.transport === "eventsource" || (opts.transport !== "fetch" && typeof EventSource === "function");
  const maxFailures = opts.maxReconnects ?? 60;
  const idleMs = opts.idleMs ?? 60_000;
  let state = opts.state || initial();
  let lastEventId = opts.lastEventId ? String(opts.lastEventId) : null;
  let connection = "connecting";
  let status = null;

  const report = () => {
    const next = { connection, run: state.status, attempt: state.attempt, notice: state.notice, runId: state.runId };
    if (status && Object.keys(next).every((k) => next[k] === status[k])) return;
    status = next;
    if (opts.onStatus) opts.onStatus(next);
  };
  const give = (parts, s) => {
    for (const p of parts) {
      if (p.type === "text") opts.onText && opts.onText(p.text, s);
      else opts.onData && opts.onData({ index: p.index, name: p.name, payload: p.payload }, s);
    }
  };
  const onEvent = (raw) => {
    if (raw.id) lastEventId = raw.id;
    let data;
    try {
      data = JSON.parse(raw.data);
    } catch {
      return false;
    }
    const event = { type: raw.type, id: raw.id, data };
    const prev = state;
    state = reduce(prev, event);
    if (state !== prev) {
      const p = prev.parts;
      const n = state.parts;
      // Parts are shared between states: the old ones, still first and the same, mean appended.
      const appended =
        p.length === 0 ||
        (state.resets === prev.resets && state.runId === prev.runId && n.length >= p.length && n[p.length - 1] === p[p.length - 1]);
      if (appended) give(n.slice(p.length), state);
      else {
        if (opts.onReset) opts.onReset(state);
        give(n, state);
      }
    }
    if (opts.onUpdate) opts.onUpdate(state, event);
    report();
    return state.done;
  };
  const onOpen = () => {
    connection = "live";
    report();
  };

  let failures = 0;
  let pod = 0;
  report();
  for (;;) {
    if (signal && signal.aborted) throw abortError(signal);
    const base = urls[pod % urls.length];
    const args = { token, lastEventId, signal, idleMs, wait: Boolean(opts.wait) };
    let outcome;
    const before = lastEventId;
    try {
      outcome = useEventSource
        ? await eventSourceStream(base, thread, args, onEvent, onOpen)
        : await fetchStream(base, thread, args, onEvent, onOpen);
    } catch (err) {
      if (isAbort(err, signal)) throw abortError(signal);
      if (err instanceof ThreadgateError && err.status !== 503 && err.status !== 429) {
        connection = "closed";
        report();
        throw err; // 400, 401, 404: retrying will not help
      }
      outcome = { ended: true, error: err };
    }
    if (outcome.done) {
      connection = "closed";
      report();
      return replyOf(state);
    }
    if (outcome.empty && state.runId === null && !lastEventId) {
      connection = "closed"; // 204: the thread has no run
      report();
      return null;
    }
    if (outcome.empty) {
      // 204 for a resume point at or after the run's `done`: final once the run says so.
      try {
        const info = state.runId && (await run(base, thread, state.runId, { token, signal }));
        if (info && TERMINAL.includes(info.status)) {
          state = { ...state, done: true, status: info.status, error: info.error || null, notice: null };
          connection = "closed";
          report();
          return replyOf(state);
        }
      } catch (err) {
        if (isAbort(err, signal)) throw abortError(signal);
      }
    }
    if (outcome.unknown) {
      // EventSource hides the status: ask the pod with a plain request what it was.
      try {
        const latest = await request(base, "GET", `/threads/${thread}/runs`, { token, signal, query: { limit: 1 } });
        const last = latest && latest.runs && latest.runs[0];
        if (state.runId === null && !last && !opts.wait) {
          connection = "closed"; // a 204: the thread has no run
          report();
          return null;
        }
        if (last && last.run_id === state.runId && TERMINAL.includes(last.status) && lastEventId && lastEventId === before) {
          // A 204 for a resume point at or after the run's `done`: nothing more will come.
          state = { ...state, done: true, status: last.status, error: last.error || null, notice: null };
          connection = "closed";
          report();
          return replyOf(state);
        }
      } catch (err) {
        if (isAbort(err, signal)) throw abortError(signal);
        if (err instanceof ThreadgateError && err.status >= 400 && err.status < 500 && err.status !== 429) {
          connection = "closed";
          report();
          throw err;
        }
      }
    }
    if (lastEventId !== before) failures = 0; // it made progress before it broke
    failures += 1;
    if (failures > maxFailures) {
      connection = "closed";
      report();
      throw new ThreadgateError(0, "unreachable", `attach to ${thread} failed ${failures} times in a row`);
    }
    pod += 1; // the pod may be dead or draining: the next one can serve the rest
    connection = "reconnecting";
    report();
    const delay = Math.min(200 * 2 ** Math.min(failures - 1, 5), 5000);
    await sleep(delay * (0.75 + Math.random() / 2), signal);
  }
}

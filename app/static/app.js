// The threadgate chat page: pick a thread, send messages, watch each reply stream.
//
// Every rule about the stream (reset, resume_from, duplicates, stalled, reconnects with
// Last-Event-ID) is threadgate-client's: this file only renders what its `attach` reports.
// A reply lives in one element keyed by its run id; its parts are drawn as they come (text
// runs, and a small labelled block per data event); `onReset` clears them, and the client
// then gives the parts it still holds again. The history from /messages is merged into those
// elements, never appended beside them: the latest page when a thread opens (and after each
// reply), older pages above it when the reader asks for them ("Earlier messages").
//
// Demo and testing: `chunks`, `delay_ms`, `fail`, `fail_at`, `fail_attempts`, `vary`,
// `data_every` and `refuse_continue` in the page's query string are sent as `model_options`
// with every message (the mock model honours them), e.g. /?chunks=40&delay_ms=50&vary=1;
// `thread` opens that thread; a thread with no run yet is followed from its first run on,
// whoever posts it.
import {
  attach,
  cancel as cancelRun,
  messagesPage as loadMessages,
  post,
  runs as loadRuns,
  THREAD_RE,
  ThreadgateError,
} from "./threadgate-client.js";

const ACTIVE = new Set(["pending", "running"]);
const TOKEN_KEY = "threadgate.token";
const THREAD_KEY = "threadgate.thread";
const BASE = ""; // this page's own pod

const $ = (id) => document.getElementById(id);
const el = {
  pod: $("pod"),
  conn: $("conn"),
  threadForm: $("thread-form"),
  threadId: $("thread-id"),
  newThread: $("new-thread"),
  token: $("token"),
  modelOptions: $("model-options"),
  error: $("error"),
  messages: $("messages"),
  older: $("older"),
  runStatus: $("run-status"),
  compose: $("compose"),
  input: $("input"),
  send: $("send"),
  cancel: $("cancel"),
};

const params = new URLSearchParams(location.search);
const modelOptions = readModelOptions(params);

const PAGE = 50; // messages a page of history holds

const state = {
  thread: null,
  older: null, // the cursor of the history's next (older) page; null: all of it is shown
  follow: null, // AbortController of the current attach
  waiting: false, // that attach waits for the thread's first run (sending stays possible)
  reply: null, // the client's state of the reply being followed
};

// ---- settings -------------------------------------------------------------------------

function readModelOptions(p) {
  const out = {};
  for (const key of ["chunks", "delay_ms", "fail_at", "fail_attempts", "data_every"]) {
    const value = p.get(key);
    if (value !== null && value.trim() !== "" && Number.isFinite(Number(value))) {
      out[key] = Number(value);
    }
  }
  if (p.get("fail")) out.fail = p.get("fail");
  for (const flag of ["vary", "refuse_continue"]) if (["1", "true"].includes(p.get(flag))) out[flag] = true;
  return out;
}

// The token is kept for this tab only: sessionStorage, never localStorage (it rides in the
// stream's URL, and a page's storage outlives the page). Only short-lived JWTs belong here.
function storage(kind) {
  try {
    return kind === "session" ? sessionStorage : localStorage;
  } catch {
    return null; // storage disabled: settings last for this page only
  }
}

function stored(kind, key) {
  const s = storage(kind);
  return (s && s.getItem(key)) || "";
}

function store(kind, key, value) {
  const s = storage(kind);
  if (!s) return;
  if (value) s.setItem(key, value);
  else s.removeItem(key);
}

function token() {
  return el.token.value.trim();
}

// ---- the conversation -----------------------------------------------------------------

function bubble(runId, role) {
  return el.messages.querySelector(`li[data-run-id="${CSS.escape(runId)}"][data-role="${role}"]`);
}

function makeBubble(runId, role) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  li.dataset.runId = runId;
  li.dataset.role = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  const text = document.createElement("div");
  text.className = "text";
  const meta = document.createElement("span");
  meta.className = "meta";
  li.append(who, text, meta);
  return li;
}

// The run's bubble for `role`, created if missing: an assistant reply goes after its user
// message and a user message before its reply (a stream may show the run before the POST
// that began it answers), anything else after `after` (null: first) or at the end.
function ensureBubble(runId, role, after) {
  const found = bubble(runId, role);
  if (found) return found;
  const li = makeBubble(runId, role);
  const user = role === "assistant" ? bubble(runId, "user") : null;
  const reply = role === "user" ? bubble(runId, "assistant") : null;
  if (user) user.after(li);
  else if (reply) reply.before(li);
  else if (after === null) el.messages.prepend(li);
  else if (after) after.after(li);
  else el.messages.append(li);
  return li;
}

// A reply's body: text runs (`span`) and data blocks (`figure.data-part`), in index order.
function clearParts(li) {
  li.querySelector(".text").replaceChildren();
}

function appendText(li, text) {
  const box = li.querySelector(".text");
  const last = box.lastElementChild;
  if (last && last.tagName === "SPAN") last.textContent += text;
  else {
    const span = document.createElement("span");
    span.textContent = text;
    box.append(span);
  }
}

function appendData(li, part) {
  const figure = document.createElement("figure");
  figure.className = "data-part";
  figure.dataset.name = part.name;
  const caption = document.createElement("figcaption");
  caption.textContent = part.name;
  const pre = document.createElement("pre");
  const flat = JSON.stringify(part.payload) ?? "null";
  pre.textContent = flat.length <= 72 ? flat : JSON.stringify(part.payload, null, 2);
  figure.append(caption, pre);
  li.querySelector(".text").append(figure);
}

function setParts(li, parts) {
  clearParts(li);
  for (const p of parts) {
    if (p.type === "text") appendText(li, p.text);
    else appendData(li, p);
  }
}

function setMeta(li, text) {
  li.querySelector(".meta").textContent = text;
}

function scrollToEnd(force) {
  const box = el.messages;
  if (force || box.scrollHeight - box.scrollTop - box.clientHeight < 80) {
    box.scrollTop = box.scrollHeight;
  }
}

// Put a page of the stored conversation into the page (`page.messages`: newest first):
// existing bubbles get the stored reply (what a finished stream showed), missing ones are
// inserted in conversation order, before the page's next shown message (an older page: above
// everything shown; the latest page: after everything shown).
function mergeHistory(page, { older = false } = {}) {
  const list = [...page.messages].reverse();
  let prev = null;
  for (const [i, m] of list.entries()) {
    let li = bubble(m.run_id, m.role);
    if (!li) {
      const next = list.slice(i + 1).map((n) => bubble(n.run_id, n.role)).find(Boolean);
      if (prev) li = ensureBubble(m.run_id, m.role, prev);
      else if (next) {
        li = makeBubble(m.run_id, m.role);
        next.before(li);
      } else li = ensureBubble(m.run_id, m.role, older ? null : undefined);
    }
    const live = state.reply && state.reply.runId === m.run_id && !state.reply.done;
    if (!(live && m.role === "assistant")) {
      setParts(li, Array.isArray(m.parts) && m.parts.length ? m.parts : [{ type: "text", text: m.content }]);
      if (m.role === "assistant") {
        li.dataset.state = m.status === "complete" ? "success" : m.status;
        if (m.status !== "complete") setMeta(li, m.status);
        else if (li.querySelector(".meta").textContent === "waiting…") setMeta(li, "");
      }
    }
    prev = li;
  }
  if (!older) scrollToEnd(true);
}

function showOlder(cursor) {
  state.older = cursor;
  el.older.hidden = !cursor;
}

async function loadOlder() {
  const thread = state.thread;
  if (!state.older) return;
  el.older.disabled = true;
  try {
    const page = await loadMessages(BASE, thread, { token: token() || undefined, limit: PAGE, cursor: state.older });
    if (state.thread !== thread) return;
    const box = el.messages;
    const below = box.scrollHeight - box.scrollTop; // keeps what the reader looks at in place
    mergeHistory(page, { older: true });
    box.scrollTop = box.scrollHeight - below;
    showOlder(page.next_cursor);
  } catch (err) {
    showError(err);
  } finally {
    el.older.disabled = false;
  }
}

// ---- status lines ---------------------------------------------------------------------

const short = (runId) => runId.slice(0, 8);

function setRunStatus(status, text, runId) {
  el.runStatus.dataset.state = status;
  if (runId) el.runStatus.dataset.runId = runId;
  else delete el.runStatus.dataset.runId;
  el.runStatus.textContent = text;
}

function setConn(kind) {
  const label = { idle: "", connecting: "connecting…", live: "live", reconnecting: "reconnecting…" }[kind];
  el.conn.dataset.state = kind;
  el.conn.textContent = label;
}

function setBusy(busy) {
  el.send.disabled = busy;
  el.cancel.disabled = !busy;
}

function describe(r) {
  const run = `Run ${short(r.runId)}`;
  if (!r.done) {
    if (r.notice) return `${run} · ${r.notice}`;
    if (r.attempt === 0) return `${run} · queued`;
    const replay = r.attempt > 1 ? " (replayed after a lost pod)" : "";
    return `${run} · attempt ${r.attempt}${replay} · streaming`;
  }
  const error = r.error && r.error.message ? `: ${r.error.message}` : "";
  return `${run} · ${r.status}${error} · attempt ${r.attempt}`;
}

function showError(err) {
  el.error.textContent = err instanceof Error ? err.message : String(err);
  el.error.hidden = false;
}

function clearError() {
  el.error.hidden = true;
  el.error.textContent = "";
}

// ---- the reply stream -----------------------------------------------------------------

function startReply(runId) {
  const li = ensureBubble(runId, "assistant");
  li.dataset.state = "pending";
  setMeta(li, "waiting…");
  setRunStatus("pending", describe({ runId, attempt: 0, done: false }), runId);
  setBusy(true);
  scrollToEnd(true);
}

function stopFollowing() {
  if (state.follow) state.follow.abort();
  state.follow = null;
  state.waiting = false;
  setConn("idle");
}

// Follow the thread's latest run to its `done` (threadgate-client does the reconnecting).
// `first`: the thread has no run yet; wait for its first one, whoever posts it (another tab,
// the CLI, `threadgate dev demo`), and show it live.
async function follow({ first = false } = {}) {
  stopFollowing();
  const ctrl = new AbortController();
  state.follow = ctrl;
  state.waiting = first;
  const thread = state.thread;
  const mine = () => state.follow === ctrl;
  const seen = (s) => {
    if (!state.waiting || !mine() || !s.runId) return;
    state.waiting = false; // a run began: its user message is stored, show it above the reply
    startReply(s.runId);
    loadMessages(BASE, thread, { token: token() || undefined })
      .then((history) => mine() && mergeHistory(history.messages))
      .catch(() => {});
  };
  // The client gives a run's parts from its first one: a bubble this stream has not drawn
  // yet starts empty (whatever it showed came from an earlier stream or the history).
  const drawn = new Set();
  const li = (s) => {
    const box = ensureBubble(s.runId, "assistant");
    if (!drawn.has(s.runId)) {
      drawn.add(s.runId);
      clearParts(box);
    }
    return box;
  };
  try {
    const reply = await attach(BASE, thread, {
      signal: ctrl.signal,
      token: token() || undefined,
      onReset: (s) => mine() && clearParts(li(s)),
      onText: (text, s) => mine() && appendText(li(s), text),
      onData: (part, s) => mine() && appendData(li(s), part),
      onUpdate: (s) => mine() && (seen(s), render(s)),
      wait: first,
      onStatus: (st) => mine() && setConn(st.connection === "closed" ? "idle" : st.connection),
    });
    if (!mine()) return;
    state.follow = null;
    state.waiting = false;
    setConn("idle");
    if (reply) await finish();
    else setBusy(false);
  } catch (err) {
    if (!mine() || err.name === "AbortError") return;
    state.follow = null;
    state.waiting = false;
    setConn("idle");
    setBusy(false);
    showError(err);
  }
}

function render(s) {
  state.reply = s;
  const li = ensureBubble(s.runId, "assistant");
  li.dataset.state = s.status;
  li.dataset.attempt = String(s.attempt);
  if (s.notice) li.dataset.notice = s.notice;
  else delete li.dataset.notice;
  if (!s.done) setMeta(li, s.notice || (s.attempt > 1 ? `attempt ${s.attempt} · streaming…` : "streaming…"));
  else if (s.status !== "success") setMeta(li, s.status);
  else setMeta(li, s.attempt > 1 ? `recovered on attempt ${s.attempt}` : "");
  setRunStatus(s.notice && !s.done ? "stalled" : s.status, describe(s), s.runId);
  if (s.done) setBusy(false);
  scrollToEnd(false);
}

async function finish() {
  setBusy(false);
  const thread = state.thread;
  try {
    const latest = await loadMessages(BASE, thread, { token: token() || undefined, limit: PAGE });
    if (state.thread === thread) mergeHistory(latest);
  } catch (err) {
    showError(err);
  }
}

// ---- actions --------------------------------------------------------------------------

function refuseThreadId(id) {
  el.threadId.value = id;
  el.threadId.setAttribute("aria-invalid", "true");
  showError(`"${id}" is not a thread id: a thread id is 1 to 128 letters, digits, _ or -.`);
  el.threadId.focus();
}

async function openThread(id) {
  if (!THREAD_RE.test(id)) {
    refuseThreadId(id);
    return;
  }
  el.threadId.removeAttribute("aria-invalid");
  clearError();
  stopFollowing();
  state.thread = id;
  state.reply = null;
  el.threadId.value = id;
  store("local", THREAD_KEY, id);
  const url = new URL(location.href);
  url.searchParams.set("thread", id);
  history.replaceState(null, "", url);
  el.messages.replaceChildren();
  showOlder(null);
  setRunStatus("idle", "");
  setBusy(false);
  const auth = { token: token() || undefined };
  try {
    const [conversation, latest] = await Promise.all([
      loadMessages(BASE, id, { ...auth, limit: PAGE }),
      loadRuns(BASE, id, { ...auth, limit: 1 }),
    ]);
    if (state.thread !== id) return; // another thread was opened meanwhile
    mergeHistory(conversation);
    showOlder(conversation.next_cursor);
    const run = latest.runs[0];
    if (run && ACTIVE.has(run.status)) {
      startReply(run.run_id);
      follow();
    } else if (run) {
      const r = { runId: run.run_id, done: true, status: run.status, error: run.error, attempt: run.attempt };
      setRunStatus(run.status, describe(r), run.run_id);
    } else {
      follow({ first: true });
    }
  } catch (err) {
    showError(err);
  }
}

function newThreadId() {
  const bytes = crypto.getRandomValues(new Uint8Array(6));
  return `t-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

async function send(event) {
  event.preventDefault();
  const text = el.input.value;
  if (!text.trim() || !state.thread || (state.follow && !state.waiting)) return;
  clearError();
  el.send.disabled = true;
  try {
    const accepted = await post(BASE, state.thread, text, {
      modelOptions,
      token: token() || undefined,
    });
    el.input.value = "";
    appendText(ensureBubble(accepted.run_id, "user"), text);
    startReply(accepted.run_id);
    follow(); // a new stream for the new run: the previous one ended at its `done`
  } catch (err) {
    showError(err);
    el.send.disabled = false;
  }
}

async function cancel() {
  const r = state.reply;
  if (!r || r.done || !state.follow) return;
  el.cancel.disabled = true;
  try {
    await cancelRun(BASE, state.thread, r.runId, { token: token() || undefined });
    if (state.reply && !state.reply.done) setRunStatus("cancelling", `Run ${short(r.runId)} · cancelling…`, r.runId);
  } catch (err) {
    if (!(err instanceof ThreadgateError && err.status === 409)) {
      showError(err); // 409: it finished first; its `done` is on the way
      el.cancel.disabled = false;
    }
  }
}

// ---- wiring ---------------------------------------------------------------------------

el.threadForm.addEventListener("submit", (event) => {
  event.preventDefault();
  openThread(el.threadId.value.trim());
});
el.newThread.addEventListener("click", () => openThread(newThreadId()));
el.compose.addEventListener("submit", send);
el.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    el.compose.requestSubmit();
  }
});
el.cancel.addEventListener("click", cancel);
el.older.addEventListener("click", loadOlder);
store("local", TOKEN_KEY, ""); // earlier versions kept the token in localStorage: drop it
el.token.value = stored("session", TOKEN_KEY);
el.token.addEventListener("change", () => {
  store("session", TOKEN_KEY, token());
  if (state.thread) openThread(state.thread);
});

if (Object.keys(modelOptions).length) {
  el.modelOptions.textContent = `Model options from the page URL: ${JSON.stringify(modelOptions)}`;
  el.modelOptions.hidden = false;
}

fetch("/readyz")
  .then((resp) => resp.json())
  .then((body) => {
    if (body && body.pod) el.pod.textContent = `served by ${body.pod}`;
  })
  .catch(() => {});

// A thread named in the URL is opened or refused, never swapped for a random one.
const asked = params.get("thread");
if (asked !== null) openThread(asked.trim());
else {
  const last = stored("local", THREAD_KEY);
  openThread(last && THREAD_RE.test(last) ? last : newThreadId());
}

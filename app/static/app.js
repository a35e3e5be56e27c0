// The threadgate chat page: pick a thread, send messages, watch each reply stream over SSE.
//
// A reply is shown exactly once: it lives in one element keyed by its run id, rebuilt from
// the chunks of its current attempt (a `reset` or a newer attempt drops the partial text),
// and the history from /messages is merged into those elements, never appended beside them.
//
// Demo and testing: `chunks`, `delay_ms`, `fail`, `fail_at` and `fail_attempts` in the page's
// query string are sent as `model_options` with every message (the mock model honours them),
// e.g. /?chunks=40&delay_ms=50; `thread` opens that thread.
"use strict";

(() => {
  const THREAD_RE = /^[A-Za-z0-9_-]{1,128}$/;
  const ACTIVE = new Set(["pending", "running"]);
  const EVENTS = ["run_started", "reset", "chunk", "done"];
  const TOKEN_KEY = "threadgate.token";
  const THREAD_KEY = "threadgate.thread";

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
    runStatus: $("run-status"),
    compose: $("compose"),
    input: $("input"),
    send: $("send"),
    cancel: $("cancel"),
  };

  const params = new URLSearchParams(location.search);
  const modelOptions = readModelOptions(params);

  const state = {
    thread: null,
    es: null, // the EventSource of the current attach
    lastEventId: "", // the last `id:` seen, for a reconnect we make ourselves
    reopens: 0,
    reopenTimer: 0,
    reply: null, // { runId, attempt, chunks: Map<index, text>, done, status, error }
  };

  // ---- settings -------------------------------------------------------------------------

  function readModelOptions(p) {
    const out = {};
    for (const key of ["chunks", "delay_ms", "fail_at", "fail_attempts"]) {
      const value = p.get(key);
      if (value !== null && value.trim() !== "" && Number.isFinite(Number(value))) {
        out[key] = Number(value);
      }
    }
    if (p.get("fail")) out.fail = p.get("fail");
    return out;
  }

  function stored(key) {
    try {
      return localStorage.getItem(key) || "";
    } catch {
      return "";
    }
  }

  function store(key, value) {
    try {
      if (value) localStorage.setItem(key, value);
      else localStorage.removeItem(key);
    } catch {
      // Private mode or storage disabled: the setting lasts for this page only.
    }
  }

  function token() {
    return el.token.value.trim();
  }

  // ---- HTTP -----------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = `Bearer ${token()}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (resp.status === 204) return null;
    let data = null;
    try {
      data = await resp.json();
    } catch {
      // not JSON: the status line says enough
    }
    if (!resp.ok) {
      const err = (data && data.error) || {};
      throw new ApiError(resp.status, err.code, err.message || `HTTP ${resp.status}`);
    }
    return data;
  }

  // ---- the conversation -----------------------------------------------------------------

  function bubble(runId, role) {
    return el.messages.querySelector(
      `li[data-run-id="${CSS.escape(runId)}"][data-role="${role}"]`,
    );
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

  // The run's bubble for `role`, created if missing: an assistant reply goes after its
  // user message, anything else after `after` (null: first) or at the end.
  function ensureBubble(runId, role, after) {
    const found = bubble(runId, role);
    if (found) return found;
    const li = makeBubble(runId, role);
    const user = role === "assistant" ? bubble(runId, "user") : null;
    if (user) user.after(li);
    else if (after === null) el.messages.prepend(li);
    else if (after) after.after(li);
    else el.messages.append(li);
    return li;
  }

  function setText(li, text) {
    const node = li.querySelector(".text");
    if (node.textContent !== text) node.textContent = text;
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

  // Put the stored conversation into the page: existing bubbles get the stored text (the
  // same text a finished stream showed), missing ones are inserted in the server's order.
  function mergeHistory(messages) {
    let prev = null;
    for (const m of messages) {
      const li = ensureBubble(m.run_id, m.role, prev);
      const live = state.reply && state.reply.runId === m.run_id && !state.reply.done;
      if (!(live && m.role === "assistant")) {
        setText(li, m.content);
        if (m.role === "assistant") {
          li.dataset.state = m.status === "complete" ? "success" : m.status;
          if (m.status !== "complete") setMeta(li, m.status);
          else if (li.querySelector(".meta").textContent === "waiting…") setMeta(li, "");
        }
      }
      prev = li;
    }
    scrollToEnd(true);
  }

  // ---- run status -----------------------------------------------------------------------

  function short(runId) {
    return runId.slice(0, 8);
  }

  function setRunStatus(status, text, runId) {
    el.runStatus.dataset.state = status;
    if (runId) el.runStatus.dataset.runId = runId;
    else delete el.runStatus.dataset.runId;
    el.runStatus.textContent = text;
  }

  function setConn(kind) {
    const label = {
      idle: "",
      connecting: "connecting…",
      live: "live",
      reconnecting: "reconnecting…",
    }[kind];
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
    if (state.reply && state.reply.runId === runId) return state.reply;
    state.reply = { runId, attempt: 0, chunks: new Map(), done: false, status: "pending" };
    const li = ensureBubble(runId, "assistant");
    li.dataset.state = "pending";
    setMeta(li, "waiting…");
    setRunStatus("pending", describe(state.reply), runId);
    setBusy(true);
    scrollToEnd(true);
    return state.reply;
  }

  function closeStream() {
    clearTimeout(state.reopenTimer);
    if (state.es) {
      // The server ends the stream after `done`; an EventSource left open would reconnect
      // and replay the run, so it is closed here, always.
      state.es.close();
      state.es = null;
    }
    setConn("idle");
  }

  // Follow the thread's latest run from its first event.
  function attach() {
    closeStream();
    state.lastEventId = "";
    state.reopens = 0;
    openStream();
  }

  function openStream() {
    clearTimeout(state.reopenTimer);
    const q = new URLSearchParams();
    if (token()) q.set("access_token", token());
    if (state.lastEventId) q.set("last_event_id", state.lastEventId);
    const qs = q.toString();
    const es = new EventSource(`/threads/${state.thread}/attach${qs ? `?${qs}` : ""}`);
    state.es = es;
    for (const type of EVENTS) es.addEventListener(type, onEvent);
    es.onopen = () => {
      if (es !== state.es) return;
      state.reopens = 0;
      setConn("live");
    };
    es.onerror = () => {
      if (es !== state.es) return;
      if (es.readyState === EventSource.CONNECTING) {
        // A dropped connection: the browser reconnects by itself, sending Last-Event-ID.
        setConn("reconnecting");
        return;
      }
      // Closed for good (an HTTP error, or the browser gave up): reconnect ourselves.
      es.close();
      state.es = null;
      if (state.reply && !state.reply.done) scheduleReopen();
      else setConn("idle");
    };
    setConn("connecting");
  }

  function scheduleReopen() {
    const thread = state.thread;
    const reply = state.reply;
    const delay = Math.min(250 * 2 ** state.reopens, 5000);
    state.reopens += 1;
    setConn("reconnecting");
    state.reopenTimer = setTimeout(async () => {
      if (state.thread !== thread || state.reply !== reply || reply.done || state.es) return;
      try {
        await api("GET", `/threads/${thread}/runs/${reply.runId}`);
      } catch (err) {
        if (err instanceof ApiError && err.status < 500) {
          showError(err); // e.g. 401: retrying will not help
          setConn("idle");
          return;
        }
        // The pod is unreachable or not ready: keep trying.
      }
      if (state.thread === thread && state.reply === reply && !state.es) openStream();
    }, delay);
  }

  function onEvent(ev) {
    if (ev.target !== state.es) return; // a stream we already left
    if (ev.lastEventId) state.lastEventId = ev.lastEventId;
    let d;
    try {
      d = JSON.parse(ev.data);
    } catch {
      return;
    }
    const r = startReply(d.run_id);
    switch (ev.type) {
      case "run_started":
        if (d.attempt !== r.attempt) r.chunks.clear();
        r.attempt = d.attempt;
        r.status = "running";
        break;
      case "reset": // a replay began: what this page holds of the earlier attempt is void
        r.chunks.clear();
        r.attempt = d.attempt;
        r.status = "running";
        break;
      case "chunk":
        if (d.attempt < r.attempt) return; // a superseded attempt's straggler
        if (d.attempt > r.attempt) {
          r.chunks.clear();
          r.attempt = d.attempt;
        }
        if (!r.chunks.has(d.index)) r.chunks.set(d.index, d.text);
        r.status = "running";
        break;
      case "done":
        r.done = true;
        r.status = d.status;
        r.error = d.error || null;
        if (d.attempt) r.attempt = Math.max(r.attempt, d.attempt);
        closeStream();
        break;
      default:
        return;
    }
    render(r);
    if (r.done) finish(r);
  }

  function render(r) {
    const li = ensureBubble(r.runId, "assistant");
    const indexes = [...r.chunks.keys()].sort((a, b) => a - b);
    setText(li, indexes.map((i) => r.chunks.get(i)).join(""));
    li.dataset.state = r.status;
    li.dataset.attempt = String(r.attempt);
    if (!r.done) setMeta(li, r.attempt > 1 ? `attempt ${r.attempt} · streaming…` : "streaming…");
    else if (r.status !== "success") setMeta(li, r.status);
    else setMeta(li, r.attempt > 1 ? `recovered on attempt ${r.attempt}` : "");
    setRunStatus(r.status, describe(r), r.runId);
    scrollToEnd(false);
  }

  async function finish(r) {
    setBusy(false);
    const thread = state.thread;
    try {
      const history = await api("GET", `/threads/${thread}/messages`);
      if (state.thread === thread) mergeHistory(history.messages);
    } catch (err) {
      showError(err);
    }
  }

  // ---- actions --------------------------------------------------------------------------

  async function openThread(id) {
    if (!THREAD_RE.test(id)) {
      el.threadId.setAttribute("aria-invalid", "true");
      showError("A thread id is 1 to 128 letters, digits, _ or -.");
      el.threadId.focus();
      return;
    }
    el.threadId.removeAttribute("aria-invalid");
    clearError();
    closeStream();
    state.thread = id;
    state.reply = null;
    el.threadId.value = id;
    store(THREAD_KEY, id);
    const url = new URL(location.href);
    url.searchParams.set("thread", id);
    history.replaceState(null, "", url);
    el.messages.replaceChildren();
    setRunStatus("idle", "");
    setBusy(false);
    try {
      const [conversation, runs] = await Promise.all([
        api("GET", `/threads/${id}/messages`),
        api("GET", `/threads/${id}/runs?limit=1`),
      ]);
      if (state.thread !== id) return; // another thread was opened meanwhile
      mergeHistory(conversation.messages);
      const latest = runs.runs[0];
      if (latest && ACTIVE.has(latest.status)) {
        startReply(latest.run_id);
        attach();
      } else if (latest) {
        setRunStatus(
          latest.status,
          describe({
            runId: latest.run_id,
            done: true,
            status: latest.status,
            error: latest.error,
            attempt: latest.attempt,
          }),
          latest.run_id,
        );
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
    if (!text.trim() || !state.thread || (state.reply && !state.reply.done)) return;
    clearError();
    el.send.disabled = true;
    try {
      const accepted = await api("POST", `/threads/${state.thread}/runs`, {
        input: text,
        model_options: modelOptions,
      });
      el.input.value = "";
      setText(ensureBubble(accepted.run_id, "user"), text);
      startReply(accepted.run_id);
      attach(); // a new stream for the new run: the previous one ended at its `done`
    } catch (err) {
      showError(err);
      el.send.disabled = false;
    }
  }

  async function cancel() {
    const r = state.reply;
    if (!r || r.done) return;
    el.cancel.disabled = true;
    try {
      await api("POST", `/threads/${state.thread}/runs/${r.runId}/cancel`);
      if (!r.done) setRunStatus("cancelling", `Run ${short(r.runId)} · cancelling…`, r.runId);
    } catch (err) {
      if (!(err instanceof ApiError && err.status === 409)) {
        showError(err); // 409: it finished first; its `done` is on the way
        el.cancel.disabled = r.done;
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
  el.token.value = stored(TOKEN_KEY);
  el.token.addEventListener("change", () => {
    store(TOKEN_KEY, token());
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

  const initial = params.get("thread") || stored(THREAD_KEY);
  openThread(initial && THREAD_RE.test(initial) ? initial : newThreadId());
})();

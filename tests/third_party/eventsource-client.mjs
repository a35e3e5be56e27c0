// The WHATWG `eventsource` package attached to /threads/{t}/attach, applying contract v3's
// client rules with nothing of threadgate's own code:
//   reset → drop every part held; run_started with resume_from k → keep the first k parts;
//   a part's index must be the number of parts held (checked: anything else fails the run);
//   done → the reply is final.
// The package reconnects by itself with Last-Event-ID (its default delay: the server sends
// no `retry:`). After `done` its own reconnect must get 204 and stop: readyState CLOSED.
//
// Options (JSON argument): {url, hangups?: [n, ...], away?: bool, limitMs?}. `hangups`: after
// the n-th event received (counted over the whole run, from 1) the client closes its
// EventSource and opens a new one with `?last_event_id=` (what a browser can send), as a page
// reload would. `away`: it comes back only when a line arrives on its stdin (a laptop lid
// closed meanwhile).
//
// Prints JSON lines: {type: "progress", parts, attempt}, {type: "open"}, {type: "error", ...},
// {type: "hangup", after, lastEventId}, then {type: "final", ...} or {type: "fail", ...}.
import { EventSource } from "eventsource";

import { deadline, fail, merged, options, say } from "./common.mjs";

const opts = options();
const hangups = [...(opts.hangups || [])].sort((a, b) => a - b);
deadline(opts.limitMs ?? 240_000, "the eventsource client");

const TYPES = ["run_started", "reset", "chunk", "data", "stalled", "done"];
const reply = { runId: null, attempt: 0, parts: [], status: null, resets: 0, cuts: 0 };
const stats = { events: 0, opens: 0, errors: [], hangups: 0, ids: 0 };
let lastEventId = null;
let es = null;
let doneAt = 0; // the number of opens when `done` arrived

function apply(type, data) {
  if (reply.runId === null) reply.runId = data.run_id;
  if (data.run_id !== reply.runId) fail(`an event of another run: ${JSON.stringify(data)}`);
  if (reply.status !== null) fail(`an event after done: ${type} ${JSON.stringify(data)}`);
  switch (type) {
    case "reset":
      reply.parts = [];
      reply.resets += 1;
      break;
    case "run_started":
      reply.attempt = Math.max(reply.attempt, data.attempt);
      if (Number.isInteger(data.resume_from) && reply.parts.length > data.resume_from) {
        reply.parts = reply.parts.slice(0, data.resume_from);
        reply.cuts += 1;
      }
      break;
    case "chunk":
    case "data":
      if (data.index !== reply.parts.length) {
        fail(`part ${data.index} while holding ${reply.parts.length}`, { event: { type, data }, lastEventId });
      }
      reply.parts.push(
        type === "chunk"
          ? { type: "text", text: data.text }
          : { type: "data", name: data.name, payload: data.payload },
      );
      say({ type: "progress", parts: reply.parts.length, attempt: data.attempt });
      break;
    case "done":
      reply.status = data.status;
      doneAt = stats.opens;
      say({ type: "done", status: data.status, parts: reply.parts.length });
      break;
    default:
      break; // stalled: nothing held changes
  }
}

function open(url) {
  const source = new EventSource(url);
  source.onopen = () => {
    stats.opens += 1;
    say({ type: "open", opens: stats.opens });
    // An open after `done` means a 200 where the contract says 204.
    if (reply.status !== null) fail("the stream opened again after done (200, not 204)");
  };
  source.onerror = (err) => {
    const e = { code: err.code ?? null, message: err.message ?? null, readyState: source.readyState };
    stats.errors.push(e);
    say({ type: "error", ...e });
    if (source.readyState !== source.CLOSED) return; // the package reconnects by itself
    if (reply.status === null) fail(`the EventSource stopped for good before done: ${JSON.stringify(e)}`);
    if (err.code !== 204) fail(`after done the EventSource stopped with ${JSON.stringify(e)}, not 204`);
    finish(source);
  };
  for (const type of TYPES) {
    source.addEventListener(type, (m) => {
      if (source !== es) return; // a closed source's last event
      stats.events += 1;
      if (m.lastEventId) {
        lastEventId = m.lastEventId;
        stats.ids += 1;
      }
      apply(type, JSON.parse(m.data));
      if (hangups.length && stats.events >= hangups[0] && reply.status === null) {
        hangups.shift();
        stats.hangups += 1;
        say({ type: "hangup", after: stats.events, lastEventId, parts: reply.parts.length });
        source.close();
        const again = new URL(opts.url);
        if (lastEventId) again.searchParams.set("last_event_id", lastEventId);
        es = null;
        const back = () => {
          say({ type: "back", lastEventId });
          es = open(again.href);
        };
        if (opts.away) process.stdin.once("data", back);
        else back();
      }
    });
  }
  return source;
}

let finished = false;
async function finish(source) {
  if (finished) return;
  finished = true;
  // A fresh EventSource with the id of `done`: 204 at once, nothing else.
  const again = new URL(opts.url);
  again.searchParams.set("last_event_id", lastEventId);
  const late = await new Promise((resolve) => {
    const s = new EventSource(again.href);
    s.onopen = () => fail("a new EventSource with the id of done got a stream (200, not 204)");
    s.onerror = (err) => resolve({ code: err.code ?? null, readyState: s.readyState });
  });
  say({
    type: "final",
    runId: reply.runId,
    status: reply.status,
    attempt: reply.attempt,
    text: reply.parts.filter((p) => p.type === "text").map((p) => p.text).join(""),
    parts: merged(reply.parts),
    count: reply.parts.length,
    resets: reply.resets,
    cuts: reply.cuts,
    readyState: source.readyState,
    lastEventId,
    reconnectsAfterDone: stats.opens - doneAt,
    late,
    ...stats,
  });
  process.exit(0);
}

es = open(opts.url);

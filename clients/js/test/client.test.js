// threadgate-client against real pods (tests/js_stack.py): a plain reply, a pod SIGKILLed
// mid-reply (the client on a survivor, and on the dying pod itself), Last-Event-ID resumes.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { attach, cancel, messages, messagesPage, post, run, runs, ThreadgateError } from "../index.js";
import { mockReply, startStack, unique, waitRun } from "./stack.js";

const LIMIT = 180_000; // a hang fails the test instead of the whole run

let stack;

before(async () => {
  stack = await startStack({ pods: 2 });
});

after(async () => {
  await stack?.stop();
});

const FINISHED = ["success", "error", "cancelled", "interrupted"];

// Everything a client saw, for the exactly-once checks.
function recorder() {
  const rec = { events: [], shown: "", resets: 0, statuses: [] };
  rec.opts = {
    transport: "fetch",
    onUpdate: (state, ev) => rec.events.push(ev),
    onText: (t) => {
      rec.shown += t;
    },
    onReset: () => {
      rec.shown = "";
      rec.resets += 1;
    },
    onStatus: (s) => rec.statuses.push(s),
  };
  return rec;
}

// The chunk events of the final reply, after resets applied: each index exactly once.
function assertEachIndexOnce(events, n) {
  const held = new Map();
  for (const ev of events) {
    if (ev.type === "reset") held.clear();
    if (ev.type === "run_started" && Number.isInteger(ev.data.resume_from)) {
      for (const i of [...held.keys()]) if (i >= ev.data.resume_from) held.delete(i);
    }
    if (ev.type === "chunk") {
      assert.ok(!held.has(ev.data.index), `chunk ${ev.data.index} delivered twice: ${JSON.stringify(ev)}`);
      held.set(ev.data.index, ev.data.attempt);
    }
  }
  assert.deepEqual([...held.keys()].sort((a, b) => a - b), Array.from({ length: n }, (_, i) => i));
}

test("a plain reply: post, attach, and the stored conversation agree", { timeout: LIMIT }, async () => {
  const thread = unique();
  const accepted = await post(stack.urls, thread, "hello from node", { modelOptions: { chunks: 12, delay_ms: 5 } });
  assert.equal(accepted.thread_id, thread);
  const rec = recorder();
  const reply = await attach(stack.urls, thread, rec.opts);
  assert.equal(reply.runId, accepted.run_id);
  assert.equal(reply.status, "success");
  assert.equal(reply.text, mockReply(12));
  assert.equal(rec.shown, reply.text);
  assert.deepEqual(
    reply.parts.map((p) => p.index),
    Array.from({ length: 12 }, (_, i) => i),
  );
  assert.equal(rec.statuses.at(-1).connection, "closed");
  const stored = await run(stack.urls, thread, accepted.run_id);
  assert.equal(stored.output, reply.text);
  const convo = await messages(stack.urls, thread);
  assert.deepEqual(
    convo.messages.map((m) => [m.role, m.content]),
    [
      ["user", "hello from node"],
      ["assistant", reply.text],
    ],
  );
  const listed = await runs(stack.urls, thread, { limit: 5 });
  assert.deepEqual(
    listed.runs.map((r) => r.run_id),
    [accepted.run_id],
  );
});

test("listings come a page at a time, newest first, and messages() puts them in order", { timeout: LIMIT }, async () => {
  const thread = unique();
  const ids = [];
  for (let i = 0; i < 3; i++) {
    ids.push((await post(stack.urls, thread, `q${i}`, { modelOptions: { chunks: 1 } })).run_id);
  }
  await attach(stack.urls, thread, { transport: "fetch" }); // the last run: runs end in order
  const first = await messagesPage(stack.urls, thread, { limit: 4 });
  assert.deepEqual(
    first.messages.map((m) => [m.run_id, m.role]),
    [
      [ids[2], "assistant"],
      [ids[2], "user"],
      [ids[1], "assistant"],
      [ids[1], "user"],
    ],
  );
  assert.equal(first.messages[0].parts, null); // text only: no copy of its content
  const rest = await messagesPage(stack.urls, thread, { limit: 4, cursor: first.next_cursor });
  assert.equal(rest.messages.length, 2);
  assert.equal(rest.next_cursor, null);
  const all = await messages(stack.urls, thread);
  assert.deepEqual(
    all.messages.map((m) => m.content),
    ["q0", mockReply(1), "q1", mockReply(1), "q2", mockReply(1)],
  );
  assert.deepEqual((await messages(stack.urls, thread, { limit: 2 })).messages.map((m) => m.content), ["q2", mockReply(1)]);
  const newest = await runs(stack.urls, thread, { limit: 2 });
  assert.deepEqual(newest.runs.map((r) => r.run_id), [ids[2], ids[1]]);
  const oldest = await runs(stack.urls, thread, { limit: 2, cursor: newest.next_cursor });
  assert.deepEqual(oldest.runs.map((r) => r.run_id), [ids[0]]);
  await assert.rejects(messagesPage(stack.urls, thread, { cursor: "nonsense" }), (err) => err instanceof ThreadgateError && err.code === "invalid_cursor");
});

test("a retried POST with the same Idempotency-Key makes one run; a dead first URL is skipped", { timeout: LIMIT }, async () => {
  const thread = unique();
  const urls = ["http://127.0.0.1:9", ...stack.urls];
  const key = `k-${thread}`;
  const a = await post(urls, thread, "once", { idempotencyKey: key, modelOptions: { chunks: 2, delay_ms: 0 } });
  const b = await post(urls, thread, "once", { idempotencyKey: key, modelOptions: { chunks: 2, delay_ms: 0 } });
  assert.equal(a.run_id, b.run_id);
  await assert.rejects(
    post(urls, thread, "other body", { idempotencyKey: key }),
    (err) => err instanceof ThreadgateError && err.status === 409,
  );
  await attach(urls, thread, { transport: "fetch" });
  assert.equal((await runs(urls, thread)).runs.length, 1);
});

test("attach on a thread with no run resolves to null; cancel stops a run", { timeout: LIMIT }, async () => {
  const thread = unique();
  assert.equal(await attach(stack.urls, thread, { transport: "fetch" }), null);
  const accepted = await post(stack.urls, thread, "long", { modelOptions: { chunks: 400, delay_ms: 20 } });
  let cancelled = false;
  const reply = await attach(stack.urls, thread, {
    transport: "fetch",
    onText: () => {
      if (!cancelled) {
        cancelled = true;
        cancel(stack.urls, thread, accepted.run_id);
      }
    },
  });
  assert.equal(reply.status, "cancelled");
  assert.ok(mockReply(400).startsWith(reply.text));
});

// Does the server wait for a new thread's first run (GET attach?wait=true)? One that answers 204
// at once does not: a regression, not a reason to skip.
async function serverWaits(url) {
  const ctrl = new AbortController();
  const t = setTimeout(() => ctrl.abort(), 500);
  try {
    const resp = await fetch(`${url}/threads/${unique("probe")}/attach?wait=true`, { signal: ctrl.signal });
    return resp.status === 200;
  } catch {
    return true; // still waiting when aborted
  } finally {
    clearTimeout(t);
    ctrl.abort();
  }
}

test("wait: an attach opened before the thread's first run follows it", { timeout: LIMIT }, async () => {
  assert.ok(await serverWaits(stack.urls[0]), "attach?wait=true answered at once (204): it must wait");
  const thread = unique();
  const attached = attach(stack.urls, thread, { transport: "fetch", wait: true });
  const accepted = await post(stack.urls, thread, "first", { modelOptions: { chunks: 5, delay_ms: 5 } });
  const reply = await attached;
  assert.equal(reply.runId, accepted.run_id);
  assert.equal(reply.text, mockReply(5));
});

test("Last-Event-ID: a second attach continues after the first one's last event, no gap, no duplicate", { timeout: LIMIT }, async () => {
  const thread = unique();
  const n = 40;
  const accepted = await post(stack.urls, thread, "resume me", { modelOptions: { chunks: n, delay_ms: 20 } });
  const ctrl = new AbortController();
  let state = null;
  let lastId = null;
  const firstEvents = [];
  await assert.rejects(
    attach(stack.urls[0], thread, {
      transport: "fetch",
      signal: ctrl.signal,
      onUpdate: (s, ev) => {
        state = s;
        firstEvents.push(ev);
        if (ev.id) lastId = ev.id;
        if (ev.type === "chunk" && ev.data.index === 9) ctrl.abort();
      },
    }),
    (err) => err.name === "AbortError",
  );
  const secondEvents = [];
  const reply = await attach(stack.urls[1], thread, {
    transport: "fetch",
    lastEventId: lastId,
    state,
    onUpdate: (s, ev) => secondEvents.push(ev),
  });
  assert.equal(reply.text, mockReply(n));
  const firstChunks = firstEvents.filter((e) => e.type === "chunk").map((e) => e.data.index);
  const secondChunks = secondEvents.filter((e) => e.type === "chunk").map((e) => e.data.index);
  assert.deepEqual([...firstChunks, ...secondChunks], Array.from({ length: n }, (_, i) => i));
  // Ids are opaque strings (contract v3: they say what the client holds, not a number to
  // compare): the indexes above show no gap and no duplicate; no id comes back.
  assert.ok(secondEvents.every((e) => typeof e.id === "string" && e.id !== lastId));
  assert.equal((await run(stack.urls, thread, accepted.run_id)).output, reply.text);
});

// SIGKILL the pod executing a run once the client has `seen` chunks, restart it under its
// name; the client ends with the stored reply, each chunk index once.
async function killMidReply({ clientOn, modelOptions, n }) {
  const thread = unique();
  const accepted = await post(stack.urls, thread, "survive this", { modelOptions });
  const running = await waitRun(stack.urls, thread, accepted.run_id, (r) => r.status === "running");
  const victim = running.executor;
  const survivor = stack.pods.find((p) => p.name !== victim).name;
  const order = clientOn === "executor" ? [victim, survivor] : [survivor, victim];
  const rec = recorder();
  const ctrl = new AbortController();
  let killed = null;
  rec.opts.signal = ctrl.signal;
  rec.opts.onText = (t) => {
    rec.shown += t;
    if (!killed && rec.shown.split(" ").length > 8) {
      // A pod that does not come back fails the test now, not after every reconnect.
      killed = stack.kill(victim).then(() => stack.restart(victim));
      killed.catch((err) => ctrl.abort(err));
    }
  };
  const reply = await attach(order.map(stack.url), thread, rec.opts);
  await killed;
  const stored = await waitRun(stack.urls, thread, accepted.run_id, (r) => FINISHED.includes(r.status));
  assert.equal(stored.status, "success");
  assert.equal(reply.status, "success");
  assert.equal(reply.text, stored.output);
  assert.equal(rec.shown, reply.text, "what the callbacks gave since the last onReset is the reply");
  assertEachIndexOnce(rec.events, n);
  if (clientOn === "executor") {
    assert.ok(rec.statuses.some((s) => s.connection === "reconnecting"), "the client's pod died under it");
  }
  return { rec, reply, stored };
}

for (const clientOn of ["survivor", "executor"]) {
  test(`pod SIGKILLed mid-reply, client on the ${clientOn}: the stored reply, each chunk once`, { timeout: LIMIT }, async () => {
    const n = 60;
    const { reply, stored } = await killMidReply({ clientOn, modelOptions: { chunks: n, delay_ms: 40 }, n });
    assert.equal(stored.attempt, 2, "one replay after one kill");
    assert.equal(reply.text, mockReply(n));
  });
}

// With `vary` any mix of attempts shows in the text. The mock continues a reply (resume_from);
// with `refuse_continue` the replay regenerates it (a reset, then all of attempt 2).
for (const mode of ["continued", "regenerated"]) {
  for (const clientOn of ["survivor", "executor"]) {
    test(`pod SIGKILLed mid-reply with vary, ${mode}, client on the ${clientOn}: exactly the stored reply`, { timeout: LIMIT }, async () => {
      const n = 60;
      const modelOptions = { chunks: n, delay_ms: 40, vary: true, refuse_continue: mode === "regenerated" };
      const { rec, reply, stored } = await killMidReply({ clientOn, modelOptions, n });
      // A refused continuation regenerates in the same attempt (contract v3): one replay.
      assert.equal(stored.attempt, 2);
      const second = rec.events.find((e) => e.type === "run_started" && e.data.attempt === stored.attempt);
      assert.ok(second, "the client saw the replay start");
      const shownBefore = rec.events.filter((e) => e.type === "chunk" && e.data.attempt === 1).length;
      assert.ok(shownBefore >= 8, "the client held attempt-1 chunks when the pod died");
      if (mode === "continued") {
        // Attempt-1 chunks then attempt-2 chunks, each index once, no reset.
        const k = second.data.resume_from;
        assert.ok(Number.isInteger(k) && k > 0, `a continuation: ${JSON.stringify(second.data)}`);
        assert.equal(reply.text, [...Array(n).keys()].map((i) => `chunk-${i}.${i < k ? 1 : 2} `).join(""));
        assert.ok(!rec.events.some((e) => e.type === "reset"), "a continuation sends no reset");
        assert.equal(rec.resets, 0, "nothing shown was taken back");
      } else {
        // A reset, then the whole attempt-2 reply.
        assert.equal(second.data.resume_from, undefined);
        assert.equal(rec.events.filter((e) => e.type === "reset").length, 1);
        assert.equal(rec.resets, 1);
        assert.equal(reply.text, [...Array(n).keys()].map((i) => `chunk-${i}.${stored.attempt} `).join(""));
      }
      assert.equal(stored.output, reply.text);
    });
  }
}

// The reducer on hand-made event sequences: every client rule of contract v1 and v2.
import assert from "node:assert/strict";
import { test } from "node:test";

import { initial, reduce, replyOf, textOf } from "../index.js";

const R = "run-1";
const started = (attempt, resume_from) => ({
  type: "run_started",
  data: resume_from === undefined ? { run_id: R, attempt } : { run_id: R, attempt, resume_from },
});
const reset = (attempt) => ({ type: "reset", data: { run_id: R, attempt } });
const chunk = (attempt, index, text = `chunk-${index}.${attempt} `) => ({
  type: "chunk",
  data: { run_id: R, attempt, index, text },
});
const data = (attempt, index, name, payload) => ({
  type: "data",
  data: { run_id: R, attempt, index, name, payload },
});
const done = (status = "success", error) => ({
  type: "done",
  data: error ? { run_id: R, attempt: 0, status, error } : { run_id: R, attempt: 0, status },
});
const chunks = (attempt, from, to) => Array.from({ length: to - from }, (_, i) => chunk(attempt, from + i));
const vary = (attempt, from, to) => Array.from({ length: to - from }, (_, i) => `chunk-${from + i}.${attempt} `).join("");

// Deep-frozen states prove the reducer never changes what it is given.
function freeze(o) {
  if (o && typeof o === "object" && !Object.isFrozen(o)) {
    Object.freeze(o);
    for (const v of Object.values(o)) freeze(v);
  }
  return o;
}
const fold = (events, s = initial()) => events.reduce((acc, ev) => freeze(reduce(acc, ev)), freeze(s));

test("a plain reply: run_started, chunks, done", () => {
  const s = fold([started(1), ...chunks(1, 0, 3), done()]);
  assert.equal(textOf(s), vary(1, 0, 3));
  assert.equal(s.status, "success");
  assert.equal(s.done, true);
  assert.equal(s.attempt, 1);
  assert.equal(s.resets, 0);
  assert.deepEqual(replyOf(s), {
    runId: R,
    status: "success",
    attempt: 1,
    text: vary(1, 0, 3),
    parts: [0, 1, 2].map((i) => ({ type: "text", index: i, text: `chunk-${i}.1 ` })),
    error: null,
  });
});

test("a duplicate index of the same attempt is ignored", () => {
  const s = fold([started(1), chunk(1, 0), chunk(1, 1), chunk(1, 1, "other "), chunk(1, 0)]);
  assert.equal(textOf(s), vary(1, 0, 2));
  const again = reduce(s, chunk(1, 1));
  assert.equal(again, s, "nothing changed: the same state object");
});

test("regenerated: a reset drops the partial reply; the new attempt's parts follow", () => {
  const s = fold([started(1), ...chunks(1, 0, 4), reset(2), started(2), ...chunks(2, 0, 5), done()]);
  assert.equal(textOf(s), vary(2, 0, 5));
  assert.equal(s.resets, 1);
  assert.equal(s.attempt, 2);
});

test("a new attempt without resume_from drops held parts even without a reset", () => {
  const s = fold([started(1), ...chunks(1, 0, 4), started(2), ...chunks(2, 0, 2)]);
  assert.equal(textOf(s), vary(2, 0, 2));
  assert.equal(s.resets, 1);
});

test("continued: resume_from k keeps parts 0..k-1, drops held parts from k on, appends", () => {
  const s = fold([started(1), ...chunks(1, 0, 5), started(2, 3), ...chunks(2, 3, 6), done()]);
  assert.equal(textOf(s), vary(1, 0, 3) + vary(2, 3, 6));
  assert.equal(s.resets, 1, "chunks 3 and 4 of attempt 1 were shown, then cut");
});

test("continued exactly where the client is: nothing dropped, no reset", () => {
  const s = fold([started(1), ...chunks(1, 0, 3), started(2, 3), ...chunks(2, 3, 6), done()]);
  assert.equal(textOf(s), vary(1, 0, 3) + vary(2, 3, 6));
  assert.equal(s.resets, 0);
});

test("a late attacher of a continued run sees attempt-1 chunks then attempt-2 chunks once", () => {
  // What the stream holds for a continued run: nothing was purged.
  const s = fold([started(1), ...chunks(1, 0, 3), started(2, 3), ...chunks(2, 3, 6), done()]);
  assert.deepEqual(
    s.parts.map((p) => [p.index, p.attempt]),
    [[0, 1], [1, 1], [2, 1], [3, 2], [4, 2], [5, 2]],
  );
});

test("a repeated run_started of the continuing attempt keeps that attempt's parts", () => {
  const s = fold([started(1), ...chunks(1, 0, 2), started(2, 2), ...chunks(2, 2, 4), started(2, 2)]);
  assert.equal(textOf(s), vary(1, 0, 2) + vary(2, 2, 4));
});

test("an earlier attempt's stragglers are ignored", () => {
  const s = fold([started(1), ...chunks(1, 0, 2), reset(2), started(2), chunk(1, 2), chunk(2, 0), started(1)]);
  assert.equal(textOf(s), vary(2, 0, 1));
  assert.equal(s.attempt, 2);
});

test("a newer attempt's part without its run_started supersedes held parts from its index on", () => {
  const s = fold([started(1), ...chunks(1, 0, 4), chunk(2, 2), chunk(2, 3)]);
  assert.equal(textOf(s), vary(1, 0, 2) + vary(2, 2, 4));
  assert.equal(s.attempt, 2);
  assert.equal(s.resets, 1);
});

test("data events share the index sequence; parts stay in index order", () => {
  const s = fold([
    started(1),
    chunk(1, 0),
    data(1, 1, "tool_call", { name: "search", args: { q: "x" } }),
    chunk(1, 2),
    data(1, 1, "tool_call", { dup: true }),
    done(),
  ]);
  assert.deepEqual(
    s.parts.map((p) => [p.index, p.type]),
    [[0, "text"], [1, "data"], [2, "text"]],
  );
  assert.deepEqual(s.parts[1].payload, { name: "search", args: { q: "x" } });
  assert.equal(textOf(s), "chunk-0.1 chunk-2.1 ");
  assert.deepEqual(replyOf(s).parts[1], {
    type: "data",
    index: 1,
    name: "tool_call",
    payload: { name: "search", args: { q: "x" } },
  });
});

test("parts that arrive out of order are put in index order", () => {
  const s = fold([started(1), chunk(1, 2), chunk(1, 0), chunk(1, 1)]);
  assert.equal(textOf(s), vary(1, 0, 3));
});

test("a continuation cuts data parts like text parts", () => {
  const s = fold([started(1), chunk(1, 0), data(1, 1, "cite", 1), data(1, 2, "cite", 2), started(2, 2), chunk(2, 2)]);
  assert.deepEqual(
    s.parts.map((p) => [p.index, p.type, p.attempt]),
    [[0, "text", 1], [1, "data", 1], [2, "text", 2]],
  );
});

test("stalled: a notice until the next run_started", () => {
  let s = fold([started(1), ...chunks(1, 0, 2), { type: "stalled", data: { run_id: R, executor: "threadgate-2" } }]);
  assert.equal(s.stalled, "threadgate-2");
  assert.equal(s.notice, "threadgate-2 went away, resuming…");
  assert.equal(textOf(s), vary(1, 0, 2), "a stall drops nothing");
  s = fold([started(2, 2)], s);
  assert.equal(s.stalled, null);
  assert.equal(s.notice, null);
});

test("stalled then done: the notice goes", () => {
  const s = fold([started(1), { type: "stalled", data: { run_id: R, executor: "x" } }, done()]);
  assert.equal(s.notice, null);
});

test("done with an error keeps the error; the partial text stays", () => {
  const error = { code: "model_error", message: "boom" };
  const s = fold([started(1), chunk(1, 0), done("error", error)]);
  assert.equal(s.status, "error");
  assert.deepEqual(s.error, error);
  assert.equal(textOf(s), vary(1, 0, 1));
});

test("events after done are ignored", () => {
  const s = fold([started(1), chunk(1, 0), done(), chunk(1, 1), reset(2)]);
  assert.equal(textOf(s), vary(1, 0, 1));
  assert.equal(s.resets, 0);
});

test("another run's events start a reply of its own", () => {
  const s = fold([started(1), chunk(1, 0), { type: "run_started", data: { run_id: "run-2", attempt: 1 } }]);
  assert.equal(s.runId, "run-2");
  assert.deepEqual(s.parts, []);
});

test("malformed events leave the state as it was", () => {
  const s = fold([started(1)]);
  for (const ev of [null, {}, { type: "chunk" }, { type: "chunk", data: { run_id: R, attempt: 1 } }, { type: "nope", data: { run_id: R } }]) {
    assert.equal(reduce(s, ev), s);
  }
});

// The Vercel AI SDK against real pods: the `ai` package's own transport, parser and reader
// (DefaultChatTransport → parseJsonEventStream with uiMessageChunkSchema → readUIMessageStream)
// on POST /ai-sdk/chat and GET /ai-sdk/chat/{id}/stream, including a pod SIGKILLed mid-reply.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { DefaultChatTransport, readUIMessageStream } from "ai";

import { threadgateFetch } from "../ai-sdk.js";
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
let nextId = 0;
const userMessage = (text) => ({ id: `m${++nextId}-${Date.now()}`, role: "user", parts: [{ type: "text", text }] });
const textOf = (message) =>
  message.parts
    .filter((p) => p.type === "text")
    .map((p) => p.text)
    .join("");

// Reads a UI message stream to its end with the SDK's reader; the last message and every
// chunk the SDK's parser let through.
async function read(stream, { onChunk } = {}) {
  const seen = [];
  const errors = [];
  const tap = stream.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        seen.push(chunk);
        if (onChunk) onChunk(chunk, seen);
        controller.enqueue(chunk);
      },
    }),
  );
  let last = null;
  for await (const message of readUIMessageStream({ stream: tap, onError: (e) => errors.push(e) })) last = message;
  return { message: last, chunks: seen, errors };
}

function send(transport, thread, text, body = {}) {
  return transport.sendMessages({
    chatId: thread,
    messages: [userMessage(text)],
    trigger: "submit-message",
    messageId: undefined,
    abortSignal: undefined,
    body,
  });
}

test("useChat's transport sends a message and reads the reply: the stored reply, message id = run id", { timeout: LIMIT }, async () => {
  const thread = unique("ai");
  const transport = new DefaultChatTransport({ api: `${stack.urls[0]}/ai-sdk/chat` });
  const stream = await send(transport, thread, "hello ai sdk", { model_options: { chunks: 15, delay_ms: 5 } });
  const { message, chunks, errors } = await read(stream);
  assert.deepEqual(errors, []);
  const runs = await (await fetch(`${stack.urls[0]}/threads/${thread}/runs`)).json();
  const runId = runs.runs[0].run_id;
  const stored = await waitRun(stack.urls, thread, runId, (r) => FINISHED.includes(r.status));
  assert.equal(message.id, runId);
  assert.equal(message.role, "assistant");
  assert.equal(textOf(message), mockReply(15));
  assert.equal(textOf(message), stored.output);
  assert.deepEqual(message.metadata, { threadgate: { thread_id: thread, run_id: runId, status: "success", attempt: 1 } });
  assert.equal(chunks[0].type, "start");
  assert.equal(chunks.at(-1).type, "finish");
  assert.equal(chunks.at(-1).finishReason, "stop");
  const convo = await (await fetch(`${stack.urls[1]}/threads/${thread}/messages`)).json();
  assert.deepEqual(
    convo.messages.map((m) => [m.role, m.content]),
    [
      // newest first: the reply, then the message it answers
      ["assistant", stored.output],
      ["user", "hello ai sdk"],
    ],
  );
});

test("resume: reconnectToStream replays the active run from its start on any pod; 204 once it ended", { timeout: LIMIT }, async () => {
  const thread = unique("ai");
  const post = await fetch(`${stack.urls[0]}/threads/${thread}/runs`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ input: "resume", model_options: { chunks: 30, delay_ms: 20 } }),
  });
  const { run_id: runId } = await post.json();
  await waitRun(stack.urls, thread, runId, (r) => r.status === "running");
  const transport = new DefaultChatTransport({ api: `${stack.urls[1]}/ai-sdk/chat` });
  const stream = await transport.reconnectToStream({ chatId: thread });
  assert.ok(stream, "an active run to resume");
  const { message, errors } = await read(stream);
  assert.deepEqual(errors, []);
  assert.equal(message.id, runId);
  const stored = await waitRun(stack.urls, thread, runId, (r) => FINISHED.includes(r.status));
  assert.equal(textOf(message), stored.output);
  assert.equal(await transport.reconnectToStream({ chatId: thread }), null);
});

test("errors are the native routes' JSON: a bad thread id is 400 before any run", { timeout: LIMIT }, async () => {
  const transport = new DefaultChatTransport({ api: `${stack.urls[0]}/ai-sdk/chat` });
  await assert.rejects(send(transport, "bad.id", "x"), (err) => /invalid_thread_id|thread id/.test(err.message));
  const resp = await fetch(`${stack.urls[0]}/ai-sdk/chat`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ id: unique("ai"), messages: [{ id: "a", role: "assistant", parts: [] }] }),
  });
  assert.equal(resp.status, 400);
  assert.equal((await resp.json()).error.code, "invalid_request");
});

// SIGKILL the executor once `after` text deltas arrived, restart it; the reader's message
// must be exactly the stored reply.
async function killMidReply({ clientOn, modelOptions, wrapped }) {
  const thread = unique("ai");
  // Which pod executes is not ours to choose: POST via a pod, then see where it runs.
  const requests = [];
  const counted = (url, init) => {
    requests.push(String(url));
    return fetch(url, init);
  };
  const transportFor = (urls) =>
    new DefaultChatTransport({
      api: `${urls[0]}/ai-sdk/chat`,
      fetch: wrapped ? threadgateFetch({ urls, fetch: counted }) : undefined,
    });
  const posted = await fetch(`${stack.urls[0]}/threads/${thread}/runs`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ input: "survive", model_options: modelOptions }),
  });
  const { run_id: runId } = await posted.json();
  const running = await waitRun(stack.urls, thread, runId, (r) => r.status === "running");
  const victim = running.executor;
  const survivor = stack.pods.find((p) => p.name !== victim).name;
  const urls = (clientOn === "executor" ? [victim, survivor] : [survivor, victim]).map(stack.url);
  const stream = await transportFor(urls).reconnectToStream({ chatId: thread });
  let killed = null;
  let deltas = 0;
  const { message, chunks, errors } = await read(stream, {
    onChunk: (c) => {
      if (c.type === "text-delta" && ++deltas === 8) killed = stack.kill(victim).then(() => stack.restart(victim));
    },
  });
  await killed;
  const stored = await waitRun(stack.urls, thread, runId, (r) => FINISHED.includes(r.status));
  assert.equal(stored.status, "success");
  assert.deepEqual(errors, []);
  assert.equal(message.id, runId);
  assert.equal(textOf(message), stored.output);
  assert.equal(chunks.at(-1).type, "finish");
  return { message, chunks, stored, requests, urls };
}

test("pod SIGKILLed mid-reply, reader on the survivor: the message is exactly the stored reply", { timeout: LIMIT }, async () => {
  const { message, chunks, stored } = await killMidReply({
    clientOn: "survivor",
    modelOptions: { chunks: 60, delay_ms: 40 },
    wrapped: false,
  });
  assert.equal(stored.attempt, 2);
  assert.equal(textOf(message), mockReply(60));
  const regenerated = chunks.some((c) => c.type === "reset-step");
  const continued = chunks.some((c) => c.type === "data-threadgate-attempt" && c.data.resume_from !== undefined);
  assert.ok(regenerated || continued, "the reader saw the replay");
});

test("pod SIGKILLed mid-reply, reader on the dying pod: threadgateFetch resumes on the other pod", { timeout: LIMIT }, async () => {
  const { message, requests, urls, stored } = await killMidReply({
    clientOn: "executor",
    modelOptions: { chunks: 60, delay_ms: 40 },
    wrapped: true,
  });
  assert.equal(stored.attempt, 2);
  assert.equal(textOf(message), mockReply(60));
  // The first request went to the pod that died; the stream went on from the other one.
  assert.ok(requests[0].startsWith(urls[0]));
  assert.ok(
    requests.some((u) => u.startsWith(urls[1]) && u.includes("run_id=")),
    `no resume request: ${requests}`,
  );
});

for (const mode of ["continued", "regenerated"]) {
  for (const clientOn of ["survivor", "executor"]) {
    test(`pod SIGKILLed mid-reply with vary, ${mode}, reader on the ${clientOn}: exactly the stored mix of attempts`, { timeout: LIMIT }, async () => {
      const { message, chunks, stored } = await killMidReply({
        clientOn,
        modelOptions: { chunks: 60, delay_ms: 40, vary: true, refuse_continue: mode === "regenerated" },
        wrapped: true,
      });
      assert.equal(textOf(message), stored.output);
      assert.ok(!chunks.some((c) => c.type === "error"), "a replay is not an error");
      if (mode === "continued") {
        assert.equal(stored.attempt, 2);
        assert.match(stored.output, /^chunk-0\.1 .*chunk-59\.2 $/);
        const attempt = chunks.find((c) => c.type === "data-threadgate-attempt" && c.data.attempt === 2);
        assert.ok(Number.isInteger(attempt.data.resume_from));
      } else {
        assert.equal(stored.attempt, 2); // a refused continuation regenerates in the same attempt
        assert.match(stored.output, /^(chunk-\d+\.2 ){60}$/);
        assert.ok(chunks.some((c) => c.type === "reset-step"), "the reader dropped attempt 1's text");
        assert.ok(chunks.some((c) => c.type === "data-threadgate-reset" && c.transient));
      }
    });
  }
}

// A plug-in reply source with data events (tests/js_stack.py: demo_source) on
// real pods: the JS client and the AI SDK reader get text and data parts in order, and the
// stored message has the same parts.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { DefaultChatTransport, readUIMessageStream } from "ai";

import { attach, messages, post } from "../index.js";
import { startStack, unique } from "./stack.js";

const LIMIT = 180_000; // a hang fails the test instead of the whole run

let stack;

before(async () => {
  stack = await startStack({ pods: 1, knobs: { model: "tests.js_stack:demo_source" } });
});

after(async () => {
  await stack?.stop();
});

// demo_source with chunks=7: every third part (i % 3 == 1) is a data event `step`.
const EXPECTED = [
  { type: "text", index: 0, text: "chunk-0.1 " },
  { type: "data", index: 1, name: "step", payload: { i: 1, attempt: 1 } },
  { type: "text", index: 2, text: "chunk-2.1 " },
  { type: "text", index: 3, text: "chunk-3.1 " },
  { type: "data", index: 4, name: "step", payload: { i: 4, attempt: 1 } },
  { type: "text", index: 5, text: "chunk-5.1 " },
  { type: "text", index: 6, text: "chunk-6.1 " },
];
const TEXT = EXPECTED.filter((p) => p.type === "text").map((p) => p.text).join("");

test("the JS client gets text and data parts in index order", { timeout: LIMIT }, async () => {
  const thread = unique("plug");
  await post(stack.urls, thread, "with data", { modelOptions: { chunks: 7, delay_ms: 10 } });
  const order = [];
  const reply = await attach(stack.urls, thread, {
    transport: "fetch",
    onText: (t) => order.push(["text", t]),
    onData: (p) => order.push(["data", p.name, p.payload]),
  });
  assert.deepEqual(reply.parts, EXPECTED);
  assert.equal(reply.text, TEXT);
  assert.deepEqual(
    order,
    EXPECTED.map((p) => (p.type === "text" ? ["text", p.text] : ["data", p.name, p.payload])),
  );
  const stored = (await messages(stack.urls, thread)).messages.find((m) => m.role === "assistant");
  assert.equal(stored.content, TEXT);
  // Stored, adjacent text parts are one part.
  assert.deepEqual(
    stored.parts.map((p) => (p.type === "text" ? ["text", p.text] : ["data", p.name, p.payload])),
    [
      ["text", "chunk-0.1 "],
      ["data", "step", { i: 1, attempt: 1 }],
      ["text", "chunk-2.1 chunk-3.1 "],
      ["data", "step", { i: 4, attempt: 1 }],
      ["text", "chunk-5.1 chunk-6.1 "],
    ],
  );
});

test("the AI SDK reader gets data-<name> parts between text parts", { timeout: LIMIT }, async () => {
  const thread = unique("plug");
  const transport = new DefaultChatTransport({ api: `${stack.urls[0]}/ai-sdk/chat` });
  const stream = await transport.sendMessages({
    chatId: thread,
    messages: [{ id: `u-${thread}`, role: "user", parts: [{ type: "text", text: "with data" }] }],
    trigger: "submit-message",
    messageId: undefined,
    body: { model_options: { chunks: 7, delay_ms: 10 } },
  });
  let message = null;
  for await (const m of readUIMessageStream({ stream })) message = m;
  const parts = message.parts.filter((p) => p.type !== "step-start");
  assert.deepEqual(
    parts.map((p) => (p.type === "text" ? ["text", p.text] : [p.type, p.data])),
    [
      ["text", "chunk-0.1 "],
      ["data-step", { i: 1, attempt: 1 }],
      ["text", "chunk-2.1 chunk-3.1 "],
      ["data-step", { i: 4, attempt: 1 }],
      ["text", "chunk-5.1 chunk-6.1 "],
    ],
  );
});

// The Vercel AI SDK's own chat (AbstractChat: what useChat and the other bindings wrap) with a
// DefaultChatTransport on POST /ai-sdk/chat, sending one message and reading its reply.
//
// Options (JSON argument): {api, text, body, resume: "resumeStream" | "threadgateFetch", base}.
// - "resumeStream": the transport as it comes; when the stream breaks (the chat ends in
//   `error`), the app calls `chat.resumeStream()` — GET {api}/{chat id}/stream, which replays
//   the run from its start (`resumeStreamIsReplay`, true by default) — until the reply ends.
// - "threadgateFetch": the transport's fetch is clients/js/ai-sdk.js's threadgateFetch with
//   the one URL `base`: it stitches a broken stream with Last-Event-ID, the chat never knows.
//
// - "away": threadgateFetch as above over a fetch that breaks the chat's first stream once it
//   carried `cutAt` reply parts, then holds the resume request until a line arrives on stdin
//   (a laptop lid closed meanwhile): threadgateFetch resumes with the Last-Event-ID it had.
//
// Prints JSON lines: {type: "progress", parts}, {type: "broken", ...}, {type: "cut"}, then
// {type: "final", message, ...} or {type: "fail", ...}.
import { AbstractChat, DefaultChatTransport } from "ai";

import { threadgateFetch } from "../../clients/js/ai-sdk.js";
import { deadline, fail, options, say } from "./common.mjs";

const opts = options();
deadline(opts.limitMs ?? 240_000, "the AI SDK chat");

let shown = 0; // the most reply parts (text deltas and data parts) an update showed
function watch(message) {
  if (!message || message.role !== "assistant") return;
  let n = 0;
  for (const p of message.parts) {
    if (p.type === "text") n += (p.text.match(/chunk-/g) || []).length;
    else if (p.type.startsWith("data-")) n += 1;
  }
  if (n !== shown) say({ type: "progress", parts: n });
  shown = n;
}

// The state a framework binding keeps (React's useChat keeps it in a store).
class State {
  status = "ready";
  error = undefined;
  messages = [];
  pushMessage = (m) => {
    this.messages = [...this.messages, m];
    watch(m);
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
  };
  replaceMessage = (i, m) => {
    this.messages = this.messages.map((x, j) => (j === i ? m : x));
    watch(m);
  };
  snapshot = (thing) => structuredClone(thing);
}

class Chat extends AbstractChat {
  constructor(init) {
    super({ ...init, state: new State() });
  }
}

// The first response's body, broken after `cutAt` reply parts (text deltas, data parts).
function cut(resp, cutAt) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  const encoder = new TextEncoder();
  let text = "";
  const body = new ReadableStream({
    async pull(controller) {
      const { value, done } = await reader.read();
      if (done) return controller.close();
      text += decoder.decode(value, { stream: true });
      const frames = text.split("\n\n");
      text = frames.pop();
      let parts = (cut.parts ??= 0);
      for (const frame of frames) {
        if (/"type":"(text-delta|data-tick)"/.test(frame)) parts += 1;
        controller.enqueue(encoder.encode(`${frame}\n\n`));
        if (parts >= cutAt) {
          say({ type: "cut", parts });
          reader.cancel().catch(() => {});
          controller.error(new TypeError("network error (cut by the test)"));
          return;
        }
      }
      cut.parts = parts;
    },
    cancel: (reason) => reader.cancel(reason),
  });
  return new Response(body, { status: resp.status, headers: resp.headers });
}

function awayFetch() {
  let first = true;
  return async (url, init) => {
    if (first) {
      first = false;
      return cut(await fetch(url, init), opts.cutAt);
    }
    await new Promise((resolve) => process.stdin.once("data", resolve));
    say({ type: "back", url: String(url), lastEventId: new Headers(init.headers).get("last-event-id") });
    return fetch(url, init);
  };
}

const transient = [];
const finishes = [];
const transport = new DefaultChatTransport({
  api: opts.api,
  fetch:
    opts.resume === "threadgateFetch"
      ? threadgateFetch({ urls: [opts.base] })
      : opts.resume === "away"
        ? threadgateFetch({ urls: [opts.base], fetch: awayFetch() })
        : undefined,
});
const chat = new Chat({
  id: opts.chatId,
  transport,
  onData: (part) => transient.push(part),
  onFinish: ({ isError, isDisconnect, isAbort, finishReason }) =>
    finishes.push({ isError, isDisconnect, isAbort, finishReason }),
  onError: (err) => say({ type: "broken", error: `${err.name}: ${err.message}`, cause: String(err.cause ?? "") }),
});

await chat.sendMessage({ text: opts.text }, { body: opts.body });
let resumes = 0;
while (finishes.at(-1)?.finishReason === undefined) {
  if (opts.resume !== "resumeStream") fail("the chat's stream broke though threadgateFetch keeps it going", { finishes });
  if (chat.status !== "error") fail(`the stream ended with no finish and no error (${chat.status})`, { finishes });
  if (++resumes > 30) fail("resumeStream never got to the end of the reply", { finishes });
  // A pod that is down refuses the proxy's connection: the next one takes it. The app
  // waits a little between tries as an app would.
  await new Promise((r) => setTimeout(r, resumes === 1 ? 0 : 500)); // an app's retry delay
  say({ type: "resume", n: resumes });
  await chat.resumeStream();
}
const message = chat.messages.at(-1);
say({
  type: "final",
  status: chat.status,
  message,
  messages: chat.messages.map((m) => ({ id: m.id, role: m.role })),
  finishes,
  resumes,
  resets: transient.filter((p) => p.type === "data-threadgate-reset").length,
  attempts: transient.filter((p) => p.type === "data-threadgate-attempt").map((p) => p.data),
});
process.exit(0);

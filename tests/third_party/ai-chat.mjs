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
// Prints JSON lines: {type: "progress", parts}, {type: "broken", ...}, then
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

const transient = [];
const finishes = [];
const transport = new DefaultChatTransport({
  api: opts.api,
  fetch: opts.resume === "threadgateFetch" ? threadgateFetch({ urls: [opts.base] }) : undefined,
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

// The AI SDK's chat (AbstractChat: what useChat wraps) pointed at threadgate, in plain DOM.
//
// `?chat=ID` picks the chat (= threadgate thread); `chunks`, `delay_ms`, `vary` in the query go
// to the mock model as model_options. On load the stored conversation is shown and the chat's
// stream is resumed, as `useChat({ resume: true })` does.
import { AbstractChat, DefaultChatTransport } from "ai";
import { threadgateFetch } from "threadgate-client/ai-sdk";

// The state a framework binding keeps (React's useChat keeps it in a store): here, a plain
// object that re-renders the page on every change.
class PageState {
  #status = "ready";
  #error = undefined;
  #messages = [];
  constructor(onChange) {
    this.onChange = onChange;
  }
  get status() {
    return this.#status;
  }
  set status(value) {
    this.#status = value;
    this.onChange();
  }
  get error() {
    return this.#error;
  }
  set error(value) {
    this.#error = value;
    this.onChange();
  }
  get messages() {
    return this.#messages;
  }
  set messages(value) {
    this.#messages = [...value];
    this.onChange();
  }
  pushMessage = (message) => {
    this.#messages = [...this.#messages, message];
    this.onChange();
  };
  popMessage = () => {
    this.#messages = this.#messages.slice(0, -1);
    this.onChange();
  };
  replaceMessage = (index, message) => {
    this.#messages = this.#messages.map((m, i) => (i === index ? message : m));
    this.onChange();
  };
  snapshot = (thing) => structuredClone(thing);
}

class Chat extends AbstractChat {
  constructor({ onChange, ...init }) {
    super({ ...init, state: new PageState(onChange) });
  }
}

const params = new URLSearchParams(location.search);
let chatId = params.get("chat");
if (!chatId || !/^[A-Za-z0-9_-]{1,128}$/.test(chatId)) {
  chatId = `c-${Array.from(crypto.getRandomValues(new Uint8Array(6)), (b) => b.toString(16).padStart(2, "0")).join("")}`;
  params.set("chat", chatId);
  history.replaceState(null, "", `?${params}`);
}
const modelOptions = {};
for (const key of ["chunks", "delay_ms"]) if (params.get(key)) modelOptions[key] = Number(params.get(key));
if (params.get("vary")) modelOptions.vary = true;

const $ = (id) => document.getElementById(id);
$("chat-id").textContent = chatId;
let notice = "";
// Nothing is sent before the stored conversation is shown: a message sent meanwhile would be
// replaced by the stored list (holding its run's reply as it was when read).
let loaded = false;

const chat = new Chat({
  id: chatId,
  transport: new DefaultChatTransport({
    api: "/ai-sdk/chat",
    // Keeps a reply streaming across pod deaths: resumes after the last whole batch.
    fetch: threadgateFetch({ urls: [location.origin] }),
    // threadgate keeps the conversation: send only the new message.
    prepareSendMessagesRequest: ({ id, messages }) => ({
      body: { id, message: messages[messages.length - 1], model_options: modelOptions },
    }),
  }),
  onData: (part) => {
    // threadgate's transient parts: they say what happens to the run, not what it says.
    if (part.type === "data-threadgate-stalled") notice = part.data.message;
    else if (part.type === "data-threadgate-reset") notice = "replaying after a lost pod…";
    else if (part.type === "data-threadgate-attempt") notice = part.data.attempt > 1 ? `attempt ${part.data.attempt}` : "";
    render();
  },
  onError: (err) => {
    notice = `error: ${err.message}`;
    render();
  },
  onChange: () => render(),
});

function render() {
  const list = $("messages");
  list.replaceChildren(
    ...chat.messages.map((m) => {
      const li = document.createElement("li");
      li.className = m.role;
      li.dataset.id = m.id;
      for (const part of m.parts) {
        if (part.type === "text") {
          const span = document.createElement("span");
          span.className = "text";
          span.textContent = part.text;
          li.append(span);
        } else if (part.type.startsWith("data-")) {
          const block = document.createElement("div");
          block.className = "data";
          block.dataset.name = part.type.slice(5);
          block.textContent = `${part.type.slice(5)}: ${JSON.stringify(part.data)}`;
          li.append(block);
        }
      }
      // A stopped reply keeps what was shown of it, as threadgate stores it; it says so.
      const ended = m.metadata?.threadgate?.status;
      if (m.role === "assistant" && (ended === "cancelled" || ended === "interrupted")) {
        li.dataset.stopped = ended;
        const note = document.createElement("div");
        note.className = "stopped";
        note.textContent = ended === "cancelled" ? "stopped" : "interrupted by a newer message";
        li.append(note);
      }
      return li;
    }),
  );
  $("status").textContent = [chat.status, notice].filter(Boolean).join(" · ");
  $("status").dataset.status = chat.status;
  $("send").disabled = !loaded || chat.status === "submitted" || chat.status === "streaming";
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  notice = "";
  chat.sendMessage({ text });
});
// Stop cancels the run in threadgate (chat.stop() alone would only stop reading it): the
// stream then ends by itself with the run's `done`. The partial reply stays on the page,
// marked stopped, and after a reload too: threadgate stores a cancelled run's partial reply
// (what its clients saw), and the page shows the stored conversation as it is.
$("stop").addEventListener("click", async () => {
  const last = chat.messages[chat.messages.length - 1];
  if (chat.status !== "streaming" || !last || last.role !== "assistant") return;
  await fetch(`/threads/${chatId}/runs/${last.id}/cancel`, { method: "POST" });
});

// The stored conversation (its latest page: threadgate lists newest first), then whatever run
// is still going (useChat({ resume: true })).
const stored = await fetch(`/threads/${chatId}/messages`).then((r) => (r.ok ? r.json() : { messages: [] }));
chat.messages = [...stored.messages].reverse().map((m) => ({
  id: m.role === "assistant" ? m.run_id : `user-${m.run_id}`,
  role: m.role,
  metadata: { threadgate: { run_id: m.run_id, status: m.status } },
  parts:
    Array.isArray(m.parts) && m.parts.length
      ? m.parts.map((p) => (p.type === "data" ? { type: `data-${p.name}`, data: p.payload } : { type: "text", text: p.text }))
      : [{ type: "text", text: m.content }],
}));
const resumed = chat.resumeStream();
loaded = true;
document.body.dataset.loaded = "true";
render();
await resumed;

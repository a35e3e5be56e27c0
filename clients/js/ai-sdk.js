// threadgate-client/ai-sdk: a `fetch` for the Vercel AI SDK's DefaultChatTransport that keeps
// threadgate's UI message streams going across pod deaths (dependency-free; `ai` not needed).
//
//   import { DefaultChatTransport } from "ai";
//   import { threadgateFetch } from "threadgate-client/ai-sdk";
//   const transport = new DefaultChatTransport({
//     api: "https://chat.example.com/ai-sdk/chat",
//     fetch: threadgateFetch({ urls: ["https://chat.example.com"], token }),
//   });
//
// What it does: requests go to the first base URL that answers (the next one on a connection
// error or 503); a UI message stream from threadgate (`x-vercel-ai-ui-message-stream`) is
// passed on one whole batch at a time (a batch ends with the frame that carries an `id:`),
// and when it breaks before `data: [DONE]` the rest is fetched from
// `GET /ai-sdk/chat/{thread}/stream?run_id=…` with `Last-Event-ID`, on the next pod: the
// server continues right after the last batch the reader got, with the part ids it knows.

const STREAM_HEADER = "x-vercel-ai-ui-message-stream";

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal && signal.aborted) return reject(signal.reason);
    const t = setTimeout(resolve, ms);
    if (signal) {
      signal.addEventListener(
        "abort",
        () => {
          clearTimeout(t);
          reject(signal.reason);
        },
        { once: true },
      );
    }
  });
}

/**
 * @param {{urls?: string[], token?: string, fetch?: typeof fetch, maxReconnects?: number}} opts
 * @returns {typeof fetch}
 */
export function threadgateFetch(opts = {}) {
  const baseFetch = opts.fetch || ((...a) => globalThis.fetch(...a));
  const bases = (opts.urls || []).map((u) => String(u).replace(/\/+$/, ""));
  const maxReconnects = opts.maxReconnects ?? 30;

  // The request's URL on each pod: its own first, then the other bases with the same path.
  function candidates(url) {
    const u = new URL(url, globalThis.location ? globalThis.location.href : undefined);
    const own = bases.find((b) => u.href.startsWith(`${b}/`));
    if (!own) return [u.href];
    const rest = u.href.slice(own.length);
    return [own, ...bases.filter((b) => b !== own)].map((b) => b + rest);
  }

  async function send(urls, init) {
    const headers = new Headers(init.headers || {});
    if (opts.token && !headers.has("authorization")) headers.set("authorization", `Bearer ${opts.token}`);
    let last = null;
    for (let i = 0; i < urls.length; i++) {
      let resp;
      try {
        resp = await baseFetch(urls[i], { ...init, headers });
      } catch (err) {
        if (init.signal && init.signal.aborted) throw err;
        last = err;
        continue;
      }
      if (resp.status === 503 && i < urls.length - 1) continue;
      return { resp, url: urls[i] };
    }
    throw last || new TypeError("fetch failed: no pod answered");
  }

  return async function fetchWithResume(input, init = {}) {
    const url = typeof input === "string" ? input : input.url;
    const urls = candidates(url);
    const { resp, url: used } = await send(urls, init);
    if (!resp.ok || !resp.body || !resp.headers.get(STREAM_HEADER)) return resp;
    const thread = resp.headers.get("x-threadgate-thread-id");
    const runId = resp.headers.get("x-threadgate-run-id");
    if (!thread || !runId) return resp;
    const origin = used.slice(0, used.indexOf("/ai-sdk/"));
    const order = [origin, ...bases.filter((b) => b !== origin)];
    const signal = init.signal;
    const encoder = new TextEncoder();

    let reader = resp.body.getReader();
    let decoder = new TextDecoder();
    let buf = ""; // read, not yet split into frames
    let held = ""; // frames of a batch not complete yet
    let lastId = null;
    let failures = 0;

    // The stream broke before [DONE]: what was held is dropped and asked for again, after
    // the last whole batch, from the pods in turn.
    async function reconnect() {
      reader.cancel().catch(() => {});
      if (++failures > maxReconnects) throw new TypeError("network error: the run's stream kept breaking");
      [buf, held, decoder] = ["", "", new TextDecoder()];
      await sleep(Math.min(200 * 2 ** (failures - 1), 3000), signal);
      const path = `/ai-sdk/chat/${encodeURIComponent(thread)}/stream?run_id=${encodeURIComponent(runId)}`;
      const k = failures % order.length;
      const rotate = [...order.slice(k), ...order.slice(0, k)];
      const headers = { accept: "text/event-stream" };
      if (lastId) headers["last-event-id"] = lastId;
      try {
        const next = await send(rotate.map((b) => b + path), { method: "GET", headers, signal });
        const status = next.resp.status;
        if (status >= 400 && status < 500 && status !== 429) {
          throw new Error(`threadgate: resuming the stream failed with HTTP ${status}`);
        }
        reader = next.resp.ok && next.resp.body ? next.resp.body.getReader() : emptyReader();
      } catch (err) {
        if ((signal && signal.aborted) || !(err instanceof TypeError)) throw err;
        reader = emptyReader(); // no pod answered: the next round tries again
      }
    }

    const body = new ReadableStream({
      // One whole batch per pull (or the end).
      async pull(controller) {
        for (;;) {
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const frame = buf.slice(0, cut + 2);
            buf = buf.slice(cut + 2);
            if (frame.startsWith(":")) continue; // a keepalive
            held += frame;
            const done = /^data: ?\[DONE\]$/m.test(frame);
            const id = /^id: ?(.+)$/m.exec(frame); // opaque: contract v3 ids are not numbers
            if (done || id) {
              if (id) lastId = id[1];
              controller.enqueue(encoder.encode(held));
              held = "";
              if (done) {
                reader.cancel().catch(() => {});
                controller.close();
              } else {
                failures = 0;
              }
              return;
            }
          }
          let chunk;
          try {
            chunk = await reader.read();
          } catch (err) {
            if (signal && signal.aborted) throw err;
            chunk = null;
          }
          if (chunk && !chunk.done) buf += decoder.decode(chunk.value, { stream: true }); // threadgate ends lines with LF only
          else await reconnect();
        }
      },
      cancel(reason) {
        return reader.cancel(reason).catch(() => {});
      },
    });
    return new Response(body, { status: resp.status, headers: resp.headers });
  };
}

function emptyReader() {
  return { read: async () => ({ done: true }), cancel: async () => {} };
}

// The transport without pods: the SSE parser, attach's callbacks and reconnects, and request
// failover, against a scripted HTTP server (the real pods are in client.test.js).
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { test } from "node:test";

import { attach, post, request, sseParser, ThreadgateError } from "../index.js";

test("the SSE parser: fields, comments, multi-line data, CRLF and CR split across feeds", () => {
  const got = [];
  const feed = sseParser((ev) => got.push(ev));
  feed(": keepalive\n\nid: 5\nevent: chunk\ndata: {\"a\":\n");
  feed("data: 1}\r\n\r");
  feed("\nevent: done\rdata: x\r");
  feed("\r");
  assert.deepEqual(got, [
    { type: "chunk", id: "5", data: '{"a":\n1}' },
    { type: "done", id: null, data: "x" },
  ]);
});

// A server that answers each attach request with the next script: a function (req, res).
async function scripted(scripts) {
  const seen = [];
  const server = createServer((req, res) => {
    seen.push({ url: req.url, method: req.method, headers: req.headers });
    const next = scripts.shift();
    if (!next) {
      res.writeHead(500).end();
      return;
    }
    next(req, res);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const url = `http://127.0.0.1:${server.address().port}`;
  return { url, seen, close: () => new Promise((r) => server.close(r)) };
}

const frame = (id, type, data) => `${id ? `id: ${id}\n` : ""}event: ${type}\ndata: ${JSON.stringify(data)}\n\n`;
const R = "run-x";
const sse = (res) => res.writeHead(200, { "content-type": "text/event-stream" });

test("attach: a dropped stream resumes with Last-Event-ID; callbacks give each part once", async () => {
  const srv = await scripted([
    (req, res) => {
      sse(res);
      res.write(frame(1, "run_started", { run_id: R, attempt: 1 }));
      res.write(frame(2, "chunk", { run_id: R, attempt: 1, index: 0, text: "a" }));
      // The pod dies once these are out.
      res.write(frame(3, "chunk", { run_id: R, attempt: 1, index: 1, text: "b" }), () => res.destroy());
    },
    (req, res) => {
      sse(res);
      // A regenerating attempt after the resume point: reset, then the whole new reply.
      res.write(frame(null, "reset", { run_id: R, attempt: 2 }));
      res.write(frame(4, "run_started", { run_id: R, attempt: 2 }));
      res.write(frame(5, "chunk", { run_id: R, attempt: 2, index: 0, text: "A" }));
      res.write(frame(6, "data", { run_id: R, attempt: 2, index: 1, name: "cite", payload: { n: 1 } }));
      res.write(frame(7, "chunk", { run_id: R, attempt: 2, index: 2, text: "B" }));
      res.end(frame(8, "done", { run_id: R, attempt: 2, status: "success" }));
    },
  ]);
  try {
    const log = [];
    const statuses = [];
    const reply = await attach(srv.url, "t1", {
      transport: "fetch",
      onText: (t) => log.push(`text:${t}`),
      onData: (p) => log.push(`data:${p.name}:${JSON.stringify(p.payload)}`),
      onReset: () => log.push("reset"),
      onStatus: (s) => statuses.push(s.connection),
    });
    assert.deepEqual(log, ["text:a", "text:b", "reset", "text:A", 'data:cite:{"n":1}', "text:B"]);
    assert.equal(reply.text, "AB");
    assert.equal(reply.status, "success");
    assert.equal(reply.runId, R);
    assert.equal(reply.parts.length, 3);
    assert.equal(srv.seen[0].headers["last-event-id"], undefined);
    assert.equal(srv.seen[1].headers["last-event-id"], "3");
    assert.ok(statuses.includes("reconnecting"));
    assert.equal(statuses.at(-1), "closed");
  } finally {
    await srv.close();
  }
});

test("attach: a continuation that cuts shown parts gives onReset and the kept parts again", async () => {
  const srv = await scripted([
    (req, res) => {
      sse(res);
      res.write(frame(1, "run_started", { run_id: R, attempt: 1 }));
      for (let i = 0; i < 3; i++) res.write(frame(2 + i, "chunk", { run_id: R, attempt: 1, index: i, text: `${i}.1 ` }));
      res.write(frame(5, "run_started", { run_id: R, attempt: 2, resume_from: 2 }));
      res.write(frame(6, "chunk", { run_id: R, attempt: 2, index: 2, text: "2.2 " }));
      res.end(frame(7, "done", { run_id: R, attempt: 2, status: "success" }));
    },
  ]);
  try {
    let shown = "";
    const reply = await attach(srv.url, "t1", {
      transport: "fetch",
      onText: (t) => {
        shown += t;
      },
      onReset: () => {
        shown = "";
      },
    });
    assert.equal(reply.text, "0.1 1.1 2.2 ");
    assert.equal(shown, reply.text);
  } finally {
    await srv.close();
  }
});

test("attach: 204 resolves to null; 401 rejects at once with the server's error", async () => {
  const srv = await scripted([
    (req, res) => res.writeHead(204).end(),
    (req, res) =>
      res
        .writeHead(401, { "content-type": "application/json" })
        .end(JSON.stringify({ error: { code: "unauthorized", message: "a valid bearer token is required" } })),
  ]);
  try {
    assert.equal(await attach(srv.url, "t1", { transport: "fetch" }), null);
    await assert.rejects(attach(srv.url, "t1", { transport: "fetch", token: "nope" }), (err) => {
      assert.ok(err instanceof ThreadgateError);
      assert.equal(err.status, 401);
      assert.equal(err.code, "unauthorized");
      return true;
    });
    assert.equal(srv.seen[1].headers.authorization, "Bearer nope");
  } finally {
    await srv.close();
  }
});

test("attach: fails over to the next URL when the first is unreachable; abort stops it", async () => {
  const srv = await scripted([
    (req, res) => {
      sse(res);
      res.write(frame(1, "run_started", { run_id: R, attempt: 1 }));
      // never ends: the caller aborts
    },
  ]);
  const dead = "http://127.0.0.1:9"; // discard port: connection refused
  try {
    const ctrl = new AbortController();
    const attached = attach([dead, srv.url], "t1", {
      transport: "fetch",
      signal: ctrl.signal,
      onUpdate: (s) => s.attempt === 1 && ctrl.abort(),
    });
    await assert.rejects(attached, (err) => err.name === "AbortError");
    assert.equal(srv.seen.length, 1);
  } finally {
    await srv.close();
  }
});

test("request: 503 and unreachable pods are skipped; post always sends an Idempotency-Key", async () => {
  const srv503 = await scripted([(req, res) => res.writeHead(503, { "content-type": "application/json" }).end("{}")]);
  const srv = await scripted([
    (req, res) => {
      let body = "";
      req.on("data", (c) => {
        body += c;
      });
      req.on("end", () => {
        res.writeHead(202, { "content-type": "application/json" }).end(JSON.stringify({ run_id: "r", body: JSON.parse(body) }));
      });
    },
  ]);
  try {
    const out = await post(["http://127.0.0.1:9", srv503.url, srv.url], "t1", "hi", { modelOptions: { chunks: 3 } });
    assert.deepEqual(out.body, { input: "hi", multitask_strategy: "enqueue", model_options: { chunks: 3 } });
    assert.match(srv.seen[0].headers["idempotency-key"], /^client-[0-9a-f-]{36}$/);
    assert.equal(srv503.seen.length, 1);
    await assert.rejects(request("http://127.0.0.1:9", "GET", "/x"), (err) => err.status === 0 && err.code === "unreachable");
    await assert.rejects(post(srv.url, "bad.id", "x"), (err) => err.code === "invalid_thread_id");
  } finally {
    await srv503.close();
    await srv.close();
  }
});

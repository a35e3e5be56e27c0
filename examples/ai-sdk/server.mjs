// The example's server: the page, its ES modules straight from node_modules (no build step),
// and threadgate behind the same origin — what a Next.js app does with a rewrite:
//   { source: "/ai-sdk/:path*", destination: "http://threadgate:8000/ai-sdk/:path*" }
//
//   THREADGATE_URL=http://localhost:8000 PORT=3000 node server.mjs
import { createReadStream, statSync } from "node:fs";
import { createServer, request as httpRequest } from "node:http";
import { request as httpsRequest } from "node:https";
import { dirname, extname, join, normalize, sep } from "node:path";
import { fileURLToPath } from "node:url";
import { problems } from "./requirements.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const MODULES = join(HERE, "node_modules");
const missing = problems(MODULES);
if (missing.length) {
  for (const line of missing) console.error(`threadgate AI SDK example: ${line}`);
  process.exit(1);
}
const UPSTREAM = new URL(process.env.THREADGATE_URL || "http://localhost:8000");
const PORT = Number(process.env.PORT || 3000);
const HOST = process.env.HOST || "127.0.0.1";

const FILES = { "/": "index.html", "/chat.js": "chat.js", "/oidc-stub.js": "oidc-stub.js" };
const TYPES = { ".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8" };
// What threadgate serves that the page uses: the AI SDK routes, the stored conversation, cancel.
const PROXIED = [
  /^\/ai-sdk\//,
  /^\/threads\/[A-Za-z0-9_-]{1,128}\/messages$/,
  /^\/threads\/[A-Za-z0-9_-]{1,128}\/runs\/[0-9a-f-]{36}\/cancel$/,
];

function sendFile(res, path) {
  let size;
  try {
    const st = statSync(path);
    if (!st.isFile()) throw new Error("not a file");
    size = st.size;
  } catch {
    res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
    return;
  }
  res.writeHead(200, {
    "content-type": TYPES[extname(path)] || "application/octet-stream",
    "content-length": size,
    "cache-control": "no-cache",
  });
  createReadStream(path).pipe(res);
}

function proxy(req, res) {
  const target = new URL(req.url, UPSTREAM);
  const send = target.protocol === "https:" ? httpsRequest : httpRequest;
  const headers = { ...req.headers, host: target.host };
  const up = send(target, { method: req.method, headers }, (answer) => {
    res.writeHead(answer.statusCode, answer.headers);
    answer.pipe(res); // streamed as it comes: SSE needs no buffering here
    // A pod that dies mid-stream must break the browser's stream too (pipe would leave it
    // open forever): the client then resumes where it was.
    answer.on("close", () => answer.complete || res.destroy());
  });
  up.on("error", () => {
    if (res.headersSent) return res.destroy();
    res.writeHead(502, { "content-type": "application/json" });
    res.end(JSON.stringify({ error: { code: "bad_gateway", message: "threadgate is unreachable" } }));
  });
  res.on("close", () => up.destroy()); // the browser left: so does the upstream stream
  req.pipe(up);
}

const server = createServer((req, res) => {
  const path = new URL(req.url, "http://x").pathname;
  if (PROXIED.some((re) => re.test(path))) return proxy(req, res);
  if (req.method !== "GET") return res.writeHead(405).end();
  if (FILES[path]) return sendFile(res, join(HERE, FILES[path]));
  if (path.startsWith("/vendor/") && path.endsWith(".js")) {
    // Only .js files inside node_modules (followed symlinks included: threadgate-client).
    const file = normalize(join(MODULES, decodeURIComponent(path.slice("/vendor/".length))));
    if (!file.startsWith(MODULES + sep)) return res.writeHead(404).end();
    return sendFile(res, file);
  }
  res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
});

server.listen(PORT, HOST, () => {
  console.log(`threadgate AI SDK example on http://${HOST}:${server.address().port} → ${UPSTREAM.origin}`);
});

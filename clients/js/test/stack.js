// Real pods for the node tests: spawns `python -m tests.js_stack` (PostgreSQL, nats-server and
// N `threadgate serve` pods) and drives it over stdin: kill and restart a pod by name.
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

function python() {
  if (process.env.THREADGATE_PYTHON) return process.env.THREADGATE_PYTHON;
  const venv = join(REPO, ".venv/bin/python");
  return existsSync(venv) ? venv : "python3";
}

/** Start a stack; resolves once every pod is ready. `knobs` become THREADGATE_<KEY>. */
export async function startStack({ pods = 2, knobs = {} } = {}) {
  const args = ["-m", "tests.js_stack", "--pods", String(pods)];
  for (const [k, v] of Object.entries(knobs)) args.push("--knob", `${k}=${v}`);
  const child = spawn(python(), args, { cwd: REPO, stdio: ["pipe", "pipe", "inherit"] });
  const lines = createInterface({ input: child.stdout });
  const waiting = new Map();
  let ready;
  const first = new Promise((res, rej) => {
    ready = { res, rej };
    child.once("exit", (code) => rej(new Error(`tests.js_stack exited with ${code} before it was ready`)));
  });
  lines.on("line", (line) => {
    const msg = JSON.parse(line);
    if (ready) {
      ready.res(msg);
      ready = null;
      return;
    }
    const w = waiting.get(msg.id);
    if (w) {
      waiting.delete(msg.id);
      if (msg.ok) w.res(msg);
      else w.rej(new Error(msg.error));
    }
  });
  const info = await first;
  let next = 1;
  const send = (op, extra = {}) =>
    new Promise((res, rej) => {
      const id = next++;
      waiting.set(id, { res, rej });
      child.stdin.write(`${JSON.stringify({ id, op, ...extra })}\n`);
    });
  const exited = new Promise((res) => child.once("exit", res));
  return {
    pods: info.pods,
    urls: info.urls,
    url: (name) => info.pods.find((p) => p.name === name).url,
    kill: (pod) => send("kill", { pod }),
    restart: (pod) => send("restart", { pod }),
    logs: async () => (await send("logs")).logs,
    async stop() {
      child.stdin.end();
      await exited;
    },
  };
}

/** Poll a run until `until(run)` holds (any pod that answers). */
export async function waitRun(urls, thread, runId, until, timeoutMs = 30_000) {
  const deadline = Date.now() + timeoutMs;
  let delay = 20;
  let last = null;
  for (;;) {
    for (const url of urls) {
      try {
        const resp = await fetch(`${url}/threads/${thread}/runs/${runId}`);
        if (resp.ok) {
          last = await resp.json();
          break;
        }
      } catch {
        // that pod is down: ask the next
      }
    }
    if (last && until(last)) return last;
    if (Date.now() > deadline) throw new Error(`run ${runId} never satisfied the wait: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, delay)); // paces polling the run's status
    delay = Math.min(delay * 1.5, 250);
  }
}

export const unique = (prefix = "js") => `${prefix}-${Math.random().toString(16).slice(2, 14)}`;

export const mockReply = (n) => Array.from({ length: n }, (_, i) => `chunk-${i} `).join("");


// What the third-party client scripts share: their arguments, and the JSON lines they print
// for tests/multipod/test_third_party.py to read (one object a line on stdout).

/** The script's options: the JSON object given as its one argument. */
export function options() {
  const raw = process.argv[2];
  if (!raw) {
    say({ type: "fail", message: "usage: node <script> '<json options>'" });
    process.exit(2);
  }
  return JSON.parse(raw);
}

export function say(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

/** End the script with a failure the test shows as it is. */
export function fail(message, more = {}) {
  say({ type: "fail", message, ...more });
  process.exit(1);
}

/** Fail if `ms` pass first: a client that never ends is a failure, not a hang. The timer
 * also keeps node running while nothing else does: the eventsource package's reconnect timer
 * is unref'd (node would exit while the client waits to reconnect). */
export function deadline(ms, what) {
  return setTimeout(() => fail(`${what}: not done after ${ms} ms`), ms);
}

/** A reply's parts as a conversation stores them: adjacent text merged, data as it came. */
export function merged(parts) {
  const out = [];
  for (const p of parts) {
    if (p.type === "text") {
      if (out.length && out.at(-1).type === "text") out.at(-1).text += p.text;
      else out.push({ type: "text", text: p.text });
    } else {
      out.push({ type: "data", name: p.name, payload: p.payload });
    }
  }
  return out;
}

// What the example needs, checked before it serves anything: one line and exit 1 otherwise.
//
// ai 7 is the only AI SDK version threadgate's UI message stream is written for: a regenerated
// reply (a pod died and the source could not continue) is sent as `reset-step`, which ai 7's
// reader applies and ai 6's DefaultChatTransport rejects (AI_TypeValidationError: the chat
// ends in `error` with half a reply). ai 7 requires node >= 22.
import { readFileSync } from "node:fs";
import { join } from "node:path";

export const AI_MAJOR = 7;
export const NODE_MAJOR = 22;

export function problems(modules, nodeVersion = process.versions.node) {
  const found = [];
  if (Number(nodeVersion.split(".")[0]) < NODE_MAJOR) {
    found.push(`node ${nodeVersion} is too old: ai ${AI_MAJOR} requires node >= ${NODE_MAJOR}`);
  }
  let ai;
  try {
    ai = JSON.parse(readFileSync(join(modules, "ai", "package.json"), "utf8")).version;
  } catch {
    found.push("the `ai` package is not installed: run `npm ci` here first");
    return found;
  }
  if (Number(ai.split(".")[0]) !== AI_MAJOR) {
    found.push(
      `ai ${ai} is installed, threadgate needs ai ${AI_MAJOR} (ai 6's DefaultChatTransport` +
        " rejects the reset-step chunk of a regenerated reply): run `npm ci` here",
    );
  }
  return found;
}

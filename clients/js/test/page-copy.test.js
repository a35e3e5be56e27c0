// The chat page served by the pods loads app/static/threadgate-client.js: it must be this
// package's index.js, byte for byte (one source of truth; `npm run sync-page` copies it).
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { REPO } from "./stack.js";

test("app/static/threadgate-client.js is clients/js/index.js", () => {
  const page = readFileSync(`${REPO}/app/static/threadgate-client.js`, "utf8");
  const source = readFileSync(`${REPO}/clients/js/index.js`, "utf8");
  assert.ok(page === source, "app/static/threadgate-client.js differs: run `npm run sync-page` in clients/js");
});

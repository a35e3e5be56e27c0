// Types of threadgate-client (index.js).

export declare const THREAD_RE: RegExp;
export declare const EVENT_TYPES: readonly ["run_started", "reset", "chunk", "data", "stalled", "done"];
export declare const TERMINAL: readonly ["success", "error", "cancelled", "interrupted"];

export type RunStatus = "pending" | "running" | "success" | "error" | "cancelled" | "interrupted";
export type DoneStatus = "success" | "error" | "cancelled" | "interrupted";

export interface RunError {
  code: string;
  message: string;
  [key: string]: unknown;
}

/** An event as the server sends it: `type` is the SSE `event:`, `data` its JSON. */
export type ThreadgateEvent =
  | { type: "run_started"; id?: string | null; data: { run_id: string; attempt: number; resume_from?: number; executor?: string } }
  | { type: "reset"; id?: string | null; data: { run_id: string; attempt: number } }
  | { type: "chunk"; id?: string | null; data: { run_id: string; attempt: number; index: number; text: string } }
  | { type: "data"; id?: string | null; data: { run_id: string; attempt: number; index: number; name: string; payload: unknown } }
  | { type: "stalled"; id?: string | null; data: { run_id: string; executor: string } }
  | { type: "done"; id?: string | null; data: { run_id: string; attempt: number; status: DoneStatus; error?: RunError } };

export interface TextPart {
  index: number;
  attempt: number;
  type: "text";
  text: string;
}

export interface DataPart {
  index: number;
  attempt: number;
  type: "data";
  name: string;
  payload: unknown;
}

export type Part = TextPart | DataPart;

/** What the reducer holds of one run's reply. Never mutated: every event makes a new one. */
export interface ReplyState {
  runId: string | null;
  /** The newest attempt seen. */
  attempt: number;
  /** Text and data parts, in index order. */
  parts: readonly Part[];
  status: RunStatus;
  done: boolean;
  error: RunError | null;
  /** The executor a `stalled` event named, until the next `run_started`. */
  stalled: string | null;
  /** For people: "threadgate-2 went away, resuming…", until the next `run_started`. */
  notice: string | null;
  /** How many times held parts were dropped (a reset, or a continuation that cut them). */
  resets: number;
}

export interface Reply {
  runId: string;
  status: RunStatus;
  attempt: number;
  text: string;
  parts: Array<{ type: "text"; index: number; text: string } | { type: "data"; index: number; name: string; payload: unknown }>;
  error: RunError | null;
}

/** The state before any event. */
export declare function initial(runId?: string | null): ReplyState;
/** state + event → state (pure). */
export declare function reduce(state: ReplyState, event: ThreadgateEvent | { type: string; data: unknown }): ReplyState;
export declare function textOf(state: ReplyState): string;
export declare function replyOf(state: ReplyState): Reply;

export declare class ThreadgateError extends Error {
  /** The HTTP status; 0 when no pod answered. */
  status: number;
  /** The error code of the body (`invalid_thread_id`, `unauthorized`, ...), or "unreachable". */
  code: string;
  body: unknown;
  constructor(status: number, code: string, message: string, body?: unknown);
}

/** One base URL, or several: the next is tried when a pod is unreachable or answers 503. */
export type BaseUrl = string | string[];

export interface CallOptions {
  /** Bearer token: an API key or a JWT. */
  token?: string;
  signal?: AbortSignal;
}

export interface RunAccepted {
  run_id: string;
  thread_id: string;
  status: RunStatus;
}

export interface RunInfo {
  run_id: string;
  thread_id: string;
  status: RunStatus;
  attempt: number;
  executor: string | null;
  accepted_by: string;
  multitask_strategy: string;
  created_at: string;
  started_at?: string | null;
  finished_at?: string | null;
  output?: string | null;
  error?: RunError | null;
  [key: string]: unknown;
}

export interface Message {
  run_id: string;
  role: "user" | "assistant";
  content: string;
  status: string;
  /** null for a text-only message: its `content` is all of it. */
  parts?: Array<{ type: "text"; text: string } | { type: "data"; name: string; payload: unknown }> | null;
  [key: string]: unknown;
}

export declare function request<T = unknown>(
  url: BaseUrl,
  method: string,
  path: string,
  opts?: CallOptions & { body?: unknown; headers?: Record<string, string>; query?: Record<string, string | number | boolean | undefined | null> },
): Promise<T>;

export interface PostOptions extends CallOptions {
  strategy?: "enqueue" | "reject" | "interrupt";
  modelOptions?: Record<string, unknown>;
  /** Made up when not given: a retried POST never creates a second run. */
  idempotencyKey?: string;
  timeoutS?: number;
}

export declare function post(url: BaseUrl, thread: string, input: string, opts?: PostOptions): Promise<RunAccepted>;
export declare function cancel(url: BaseUrl, thread: string, runId: string, opts?: CallOptions & { wait?: boolean }): Promise<RunInfo>;
export declare function run(url: BaseUrl, thread: string, runId: string, opts?: CallOptions): Promise<RunInfo>;
export interface PageOptions extends CallOptions {
  /** Items in the page: the server's default (50) when not given, at most its maximum (200). */
  limit?: number;
  /** A page's `next_cursor`: the (older) page after it. */
  cursor?: string;
}
/** One page of runs, newest first. `before` (a run's seq) is the deprecated cursor. */
export declare function runs(
  url: BaseUrl,
  thread: string,
  opts?: PageOptions & { before?: number },
): Promise<{ runs: RunInfo[]; next_cursor: string | null; next_before: number | null }>;
/** One page of the conversation, newest message first. */
export declare function messagesPage(
  url: BaseUrl,
  thread: string,
  opts?: PageOptions,
): Promise<{ thread_id: string; messages: Message[]; next_cursor: string | null }>;
/** The conversation in order (oldest first): its `limit` latest messages, or all of it. */
export declare function messages(
  url: BaseUrl,
  thread: string,
  opts?: CallOptions & { limit?: number },
): Promise<{ thread_id: string; messages: Message[] }>;

export interface AttachStatus {
  connection: "connecting" | "live" | "reconnecting" | "closed";
  run: RunStatus;
  attempt: number;
  notice: string | null;
  runId: string | null;
}

export interface AttachOptions extends CallOptions {
  /** Each new text part, in order. Since the last `onReset`, the deltas concatenate to the reply's text. */
  onText?: (delta: string, state: ReplyState) => void;
  /** Each new data part, in order. */
  onData?: (part: { index: number; name: string; payload: unknown }, state: ReplyState) => void;
  /** Parts already given were dropped; the parts still held are given again right after. */
  onReset?: (state: ReplyState) => void;
  onStatus?: (status: AttachStatus) => void;
  /** After every event applied. */
  onUpdate?: (state: ReplyState, event: ThreadgateEvent) => void;
  /** Resume after this event id (an `id:` an earlier attach saw); pass its `state` along. */
  lastEventId?: string | number;
  state?: ReplyState;
  /** On a thread with no run yet, wait for its first run (false: resolve null at once). */
  wait?: boolean;
  /** "eventsource" (the default where EventSource exists: browsers) or "fetch" (node). */
  transport?: "eventsource" | "fetch";
  /** Consecutive failed connections before giving up (60). */
  maxReconnects?: number;
  /** fetch transport: a connection silent this long (no keepalive either) is dropped (60000). */
  idleMs?: number;
}

/** Follow the thread's latest run to its `done`: its reply, or null when the thread has no run. */
export declare function attach(url: BaseUrl, thread: string, opts?: AttachOptions): Promise<Reply | null>;

/** An incremental SSE parser: feed it text; `onEvent` per complete event. */
export declare function sseParser(onEvent: (event: { type: string; id: string | null; data: string }) => void): (text: string) => void;

// Types of threadgate-client/ai-sdk (ai-sdk.js).

export interface ThreadgateFetchOptions {
  /** threadgate's base URLs: a request or a broken stream goes on with the next one. */
  urls?: string[];
  /** Bearer token, sent as `Authorization` unless the request has one. */
  token?: string;
  /** The fetch to wrap (globalThis.fetch). */
  fetch?: typeof fetch;
  /** Consecutive failed resumes before the stream errors (30). */
  maxReconnects?: number;
}

/**
 * A `fetch` for the AI SDK's DefaultChatTransport: threadgate's UI message streams are passed
 * on whole batch by whole batch and resumed (Last-Event-ID, the next pod) when they break.
 */
export declare function threadgateFetch(opts?: ThreadgateFetchOptions): typeof fetch;

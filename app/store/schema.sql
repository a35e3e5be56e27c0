-- Tables threadgate owns, beside DBOS's own schema. Applied at start-up under an advisory lock.
CREATE SCHEMA IF NOT EXISTS threadgate;

CREATE TABLE IF NOT EXISTS threadgate.threads (
    thread_id   text PRIMARY KEY,
    owner       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per accepted run. `seq` is the order runs were accepted on their thread.
CREATE TABLE IF NOT EXISTS threadgate.runs (
    run_id             text PRIMARY KEY,
    thread_id          text NOT NULL REFERENCES threadgate.threads (thread_id),
    seq                bigserial NOT NULL,
    status             text NOT NULL DEFAULT 'pending',
    attempt            integer NOT NULL DEFAULT 0,
    executor           text,
    accepted_by        text NOT NULL,
    input              text NOT NULL,
    model_options      jsonb NOT NULL DEFAULT '{}'::jsonb,
    multitask_strategy text NOT NULL DEFAULT 'enqueue',
    idempotency_key    text,
    request_hash       text,
    stop_requested     text,
    timeout_s          double precision,
    error              jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz
);
-- Columns added after the first release: ADD COLUMN IF NOT EXISTS keeps old databases current.
ALTER TABLE threadgate.runs ADD COLUMN IF NOT EXISTS timeout_s double precision;
-- Executions of the reply step that began after one died (crash replays), not counting
-- hand-offs of a drained pod: a run past THREADGATE_MAX_REPLAYS ends `crashed_repeatedly`.
ALTER TABLE threadgate.runs ADD COLUMN IF NOT EXISTS replays integer NOT NULL DEFAULT 0;
ALTER TABLE threadgate.runs ADD COLUMN IF NOT EXISTS handoff boolean NOT NULL DEFAULT false;
-- One object per attempt: {attempt, executor, kind: first|replay|retry, resume_from}.
ALTER TABLE threadgate.runs ADD COLUMN IF NOT EXISTS attempts jsonb NOT NULL DEFAULT '[]'::jsonb;

CREATE INDEX IF NOT EXISTS runs_thread_seq ON threadgate.runs (thread_id, seq DESC);
CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency
    ON threadgate.runs (thread_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_active
    ON threadgate.runs (thread_id) WHERE status IN ('pending', 'running');

-- The conversation: at most one user and one assistant message per run.
CREATE TABLE IF NOT EXISTS threadgate.messages (
    run_id      text NOT NULL REFERENCES threadgate.runs (run_id),
    role        text NOT NULL CHECK (role IN ('user', 'assistant')),
    thread_id   text NOT NULL,
    content     text NOT NULL,
    status      text NOT NULL DEFAULT 'complete',
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, role)
);
CREATE INDEX IF NOT EXISTS messages_thread ON threadgate.messages (thread_id);
-- The reply's ordered parts when it has data events ([{type: text|data, ...}]); NULL: text only.
ALTER TABLE threadgate.messages ADD COLUMN IF NOT EXISTS parts jsonb;

-- Pods' heartbeats: a name whose heartbeat stopped long ago may have its runs adopted.
CREATE TABLE IF NOT EXISTS threadgate.executors (
    name         text PRIMARY KEY,
    app_version  text NOT NULL,
    last_seen    timestamptz NOT NULL DEFAULT now()
);
-- A reply is read back part by part (a client resuming inside an ended run): its layout
-- (app/store/replies.py); content PostgreSQL cannot hold as it is (NUL) is stored escaped.
ALTER TABLE threadgate.messages ADD COLUMN IF NOT EXISTS layout text;
ALTER TABLE threadgate.messages ADD COLUMN IF NOT EXISTS escaped boolean NOT NULL DEFAULT false;
-- A run's input is stored once, as its user message (runs.input: rows from before).
ALTER TABLE threadgate.runs ALTER COLUMN input DROP NOT NULL;

-- Retention (app/retention.py) deletes finished runs oldest first.
CREATE INDEX IF NOT EXISTS runs_finished
    ON threadgate.runs (finished_at) WHERE status IN ('success', 'error', 'cancelled', 'interrupted');

-- The trace context of a run's POST (app/tracing.py), written only by pods that trace: the pod
-- that executes the run continues that trace. Goes with the run.
CREATE TABLE IF NOT EXISTS threadgate.run_traces (
    run_id       text PRIMARY KEY REFERENCES threadgate.runs (run_id) ON DELETE CASCADE,
    traceparent  text NOT NULL
);

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
-- The id of the begin that made the current attempt (store/runs.py begin_attempt: a begin sent
-- again after its answer was lost gets that attempt instead of another).
ALTER TABLE threadgate.runs ADD COLUMN IF NOT EXISTS begun text;

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

-- Quotas per principal (app/store/quotas.py): counters kept up to date as rows are written,
-- so that a POST reads two rows instead of scanning a principal's runs or messages.
DO $$
BEGIN
    IF to_regclass('threadgate.usage') IS NULL THEN
        CREATE TABLE threadgate.usage (
            owner        text PRIMARY KEY,
            threads      bigint NOT NULL DEFAULT 0,
            stored_bytes bigint NOT NULL DEFAULT 0  -- its messages' bytes (uncompressed)
        );
        -- Once, when the table is new: what the principals already have.
        INSERT INTO threadgate.usage (owner, threads, stored_bytes)
        SELECT t.owner, count(*),
               coalesce(sum((SELECT sum(octet_length(m.content)
                                        + coalesce(octet_length(m.layout), 0)
                                        + coalesce(octet_length(m.parts::text), 0))
                             FROM threadgate.messages m WHERE m.thread_id = t.thread_id)), 0)
        FROM threadgate.threads t WHERE t.owner <> '' GROUP BY t.owner;
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS threadgate.usage_daily (
    owner  text NOT NULL,
    day    date NOT NULL,  -- UTC
    runs   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (owner, day)
);

-- A message's bytes (its text, layout and legacy parts, uncompressed: what a client sent and
-- was sent) count while it is stored, whoever writes or deletes it (a reply stored again,
-- retention): the difference of each change goes to the thread owner's counter. Threads of
-- no owner (auth off: no quota) are not counted: one row for all of them would serialize
-- every accept and every reply stored on its lock.
CREATE OR REPLACE FUNCTION threadgate.count_message_bytes() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_new bigint := 0;
    v_old bigint := 0;
    v_thread text;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        v_new := octet_length(NEW.content) + coalesce(octet_length(NEW.layout), 0)
                 + coalesce(octet_length(NEW.parts::text), 0);
        v_thread := NEW.thread_id;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        v_old := octet_length(OLD.content) + coalesce(octet_length(OLD.layout), 0)
                 + coalesce(octet_length(OLD.parts::text), 0);
        v_thread := OLD.thread_id;
    END IF;
    IF v_new <> v_old THEN
        INSERT INTO threadgate.usage AS u (owner, stored_bytes)
        SELECT t.owner, v_new - v_old FROM threadgate.threads t
        WHERE t.thread_id = v_thread AND t.owner <> ''
        ON CONFLICT (owner) DO UPDATE SET stored_bytes = u.stored_bytes + excluded.stored_bytes;
    END IF;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER messages_bytes AFTER INSERT OR UPDATE OR DELETE ON threadgate.messages
    FOR EACH ROW EXECUTE FUNCTION threadgate.count_message_bytes();

-- Charge one accepted run to its principal, or name the quota it would exceed (and charge
-- nothing). `p_bytes`: what its input will take (its user message counts once inserted).
-- One call, one transaction: the rows are locked from the check to the update, so
-- pods accepting at once cannot overshoot. A quota of 0 is off.
CREATE OR REPLACE FUNCTION threadgate.charge(
    p_owner text, p_thread text, p_bytes bigint,
    p_runs_quota bigint, p_threads_quota bigint, p_bytes_quota bigint
) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    v_day date := (now() AT TIME ZONE 'UTC')::date;
    v_new_thread boolean;
    v_usage threadgate.usage;
    v_runs bigint;
BEGIN
    INSERT INTO threadgate.usage (owner) VALUES (p_owner) ON CONFLICT DO NOTHING;
    INSERT INTO threadgate.usage_daily (owner, day) VALUES (p_owner, v_day) ON CONFLICT DO NOTHING;
    IF FOUND THEN  -- the day's first run: forget the days before last week
        DELETE FROM threadgate.usage_daily WHERE owner = p_owner AND day < v_day - 7;
    END IF;
    SELECT * INTO v_usage FROM threadgate.usage WHERE owner = p_owner FOR UPDATE;
    SELECT runs INTO v_runs FROM threadgate.usage_daily
        WHERE owner = p_owner AND day = v_day FOR UPDATE;
    v_new_thread := NOT EXISTS (SELECT 1 FROM threadgate.threads WHERE thread_id = p_thread);
    IF p_runs_quota > 0 AND v_runs >= p_runs_quota THEN
        RETURN 'runs_per_day';
    END IF;
    IF v_new_thread AND p_threads_quota > 0 AND v_usage.threads >= p_threads_quota THEN
        RETURN 'threads';
    END IF;
    IF p_bytes_quota > 0 AND v_usage.stored_bytes + p_bytes > p_bytes_quota THEN
        RETURN 'stored_bytes';
    END IF;
    UPDATE threadgate.usage SET threads = threads + v_new_thread::int WHERE owner = p_owner;
    UPDATE threadgate.usage_daily SET runs = runs + 1 WHERE owner = p_owner AND day = v_day;
    RETURN NULL;
END $$;

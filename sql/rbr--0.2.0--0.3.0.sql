-- rbr 0.2.0 -> 0.3.0 (ALTER EXTENSION rbr UPDATE TO '0.3.0').
--
-- After this script the catalog equals a fresh install of 0.3.0
-- (sql/rbr--0.3.0.sql); test/t/015_upgrade.t compares the two.
\echo Use "ALTER EXTENSION rbr UPDATE TO '0.3.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Bulk grading claims from the features table
-------------------------------------------------------------------------------
-- <source>_features keeps each row's folded response type (column
-- rbr_response_type, added to existing tables by the next rbr_featurize); chunks
-- claim rows there and read just the claimed source rows by key. The new
-- rbr.featurize_start and rbr.featurize_chunk, which also carry the batch and
-- cost options, are created once, in the section "cost" below; so are
-- rbr_featurize, rbr_synthesize, rbr.synth_start and rbr.synth_chunk.
-------------------------------------------------------------------------------
-- Fitting at scale: the aggregate state type and the scale-out fit
-------------------------------------------------------------------------------
-- (section: fitting)

-- The four row aggregates change their state from internal (with bytea
-- serialization) to the type rbr.fit_rows, so that Citus and partitionwise
-- aggregation can split them: an aggregate's state type cannot be altered,
-- so they are dropped and created again, with their support functions.
-- They are members of the extension: a user's view or function (BEGIN ATOMIC)
-- that calls rbr_fit, rbr_pair_accuracy or rbr_pair_errors blocks the DROP,
-- and this update then fails with "cannot drop ... because other objects
-- depend on it". Drop such views first, update, and create them again.
DROP AGGREGATE @extschema@.rbr_fit(text, int, float8[], float8);
DROP AGGREGATE @extschema@.rbr_fit(text, int, float8[], float8, jsonb);
DROP AGGREGATE @extschema@.rbr_pair_accuracy(text, int, float8);
DROP AGGREGATE @extschema@.rbr_pair_errors(text, int, text, float8, float8);
DROP FUNCTION rbr.fit_transfn(internal, text, int, float8[], float8);
DROP FUNCTION rbr.fit_transfn(internal, text, int, float8[], float8, jsonb);
DROP FUNCTION rbr.fit_finalfn(internal);
DROP FUNCTION rbr.pair_accuracy_transfn(internal, text, int, float8);
DROP FUNCTION rbr.pair_accuracy_finalfn(internal);
DROP FUNCTION rbr.pair_errors_transfn(internal, text, int, text, float8, float8);
DROP FUNCTION rbr.pair_errors_finalfn(internal);
DROP FUNCTION rbr.rows_combine(internal, internal);
DROP FUNCTION rbr.rows_serialize(internal);
DROP FUNCTION rbr.rows_deserialize(bytea, internal);

-- The rows that rbr_fit, rbr_pair_accuracy, rbr_pair_counts and
-- rbr_pair_errors collect: their aggregate state as a real type, so that
-- parallel workers, partitionwise aggregation and Citus can each aggregate
-- their part and combine the parts (rbr.fit_rows_combine). The text form is
-- versioned ("rbr2:" and base64) and checked on input; values are made by
-- the aggregates and passed on unchanged, never written by hand.
CREATE TYPE rbr.fit_rows;
CREATE FUNCTION rbr.fit_rows_in(cstring)
    RETURNS rbr.fit_rows AS 'MODULE_PATHNAME', 'rbr_fit_rows_in' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION rbr.fit_rows_out(rbr.fit_rows)
    RETURNS cstring AS 'MODULE_PATHNAME', 'rbr_fit_rows_out' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION rbr.fit_rows_recv(internal)
    RETURNS rbr.fit_rows AS 'MODULE_PATHNAME', 'rbr_fit_rows_recv' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE FUNCTION rbr.fit_rows_send(rbr.fit_rows)
    RETURNS bytea AS 'MODULE_PATHNAME', 'rbr_fit_rows_send' LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;
CREATE TYPE rbr.fit_rows (
    INPUT = rbr.fit_rows_in,
    OUTPUT = rbr.fit_rows_out,
    RECEIVE = rbr.fit_rows_recv,
    SEND = rbr.fit_rows_send,
    INTERNALLENGTH = VARIABLE,
    ALIGNMENT = double,
    STORAGE = extended
);
COMMENT ON TYPE rbr.fit_rows IS 'rows collected by rbr_fit, rbr_pair_accuracy, rbr_pair_counts and rbr_pair_errors (their aggregate state)';
CREATE FUNCTION rbr.fit_rows_combine(rbr.fit_rows, rbr.fit_rows)
    RETURNS rbr.fit_rows AS 'MODULE_PATHNAME', 'rbr_fit_rows_combine' LANGUAGE C PARALLEL SAFE;

CREATE FUNCTION rbr.fit_transfn(rbr.fit_rows, text, int, float8[], float8)
    RETURNS rbr.fit_rows AS 'MODULE_PATHNAME', 'rbr_fit_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION rbr.fit_transfn(rbr.fit_rows, text, int, float8[], float8, jsonb)
    RETURNS rbr.fit_rows AS 'MODULE_PATHNAME', 'rbr_fit_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION rbr.fit_finalfn(rbr.fit_rows)
    RETURNS jsonb AS 'MODULE_PATHNAME', 'rbr_fit_finalfn' LANGUAGE C PARALLEL SAFE;

-- Fit one weight vector over ranked completions: pairs within a group
-- (prompt) between different tiers (0 = best), mean hinge loss with margin.
-- Use GROUP BY response_type for one vector per response type.
CREATE AGGREGATE @extschema@.rbr_fit(group_key text, tier int, features float8[], base_reward float8) (
    SFUNC = rbr.fit_transfn,
    STYPE = rbr.fit_rows,
    COMBINEFUNC = rbr.fit_rows_combine,
    FINALFUNC = rbr.fit_finalfn,
    PARALLEL = SAFE
);
CREATE AGGREGATE @extschema@.rbr_fit(group_key text, tier int, features float8[], base_reward float8, options jsonb) (
    SFUNC = rbr.fit_transfn,
    STYPE = rbr.fit_rows,
    COMBINEFUNC = rbr.fit_rows_combine,
    FINALFUNC = rbr.fit_finalfn,
    PARALLEL = SAFE
);

CREATE FUNCTION rbr.pair_accuracy_transfn(rbr.fit_rows, text, int, float8)
    RETURNS rbr.fit_rows AS 'MODULE_PATHNAME', 'rbr_pair_accuracy_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION rbr.pair_accuracy_finalfn(rbr.fit_rows)
    RETURNS float8 AS 'MODULE_PATHNAME', 'rbr_pair_accuracy_finalfn' LANGUAGE C PARALLEL SAFE;

-- Share of ordered pairs (same group, different tiers) that a score ranks
-- right; ties count as wrong. 1 - rbr_pair_accuracy() is the paper's error rate.
CREATE AGGREGATE @extschema@.rbr_pair_accuracy(group_key text, tier int, score float8) (
    SFUNC = rbr.pair_accuracy_transfn,
    STYPE = rbr.fit_rows,
    COMBINEFUNC = rbr.fit_rows_combine,
    FINALFUNC = rbr.pair_accuracy_finalfn,
    PARALLEL = SAFE
);

-- The ordered pairs behind rbr_pair_accuracy, as counts that plain sum()
-- adds: aggregate per prompt first, then sum (two-level, splittable).
CREATE TYPE rbr.pair_counts AS (correct bigint, tied bigint, pairs bigint);
COMMENT ON TYPE rbr.pair_counts IS 'ordered pairs a score ranks right (correct), ties, and all pairs (rbr_pair_counts)';
CREATE FUNCTION rbr.pair_counts_finalfn(rbr.fit_rows)
    RETURNS rbr.pair_counts AS 'MODULE_PATHNAME', 'rbr_pair_counts_finalfn' LANGUAGE C PARALLEL SAFE;
CREATE AGGREGATE @extschema@.rbr_pair_counts(group_key text, tier int, score float8) (
    SFUNC = rbr.pair_accuracy_transfn,
    STYPE = rbr.fit_rows,
    COMBINEFUNC = rbr.fit_rows_combine,
    FINALFUNC = rbr.pair_counts_finalfn,
    PARALLEL = SAFE
);

CREATE FUNCTION rbr.pair_errors_transfn(rbr.fit_rows, text, int, text, float8, float8)
    RETURNS rbr.fit_rows AS 'MODULE_PATHNAME', 'rbr_pair_errors_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION rbr.pair_errors_finalfn(rbr.fit_rows)
    RETURNS jsonb AS 'MODULE_PATHNAME', 'rbr_pair_errors_finalfn' LANGUAGE C PARALLEL SAFE;

-- The paper's reward-signal error rates: share of ordered pairs ranked wrong
-- by the reward model alone (rm), by rm + rbr, and by rbr alone; overall and
-- per (better label, worse label). Use GROUP BY response_type.
CREATE AGGREGATE @extschema@.rbr_pair_errors(group_key text, tier int, label text, rm float8, rbr float8) (
    SFUNC = rbr.pair_errors_transfn,
    STYPE = rbr.fit_rows,
    COMBINEFUNC = rbr.fit_rows_combine,
    FINALFUNC = rbr.pair_errors_finalfn,
    PARALLEL = SAFE
);

-- Fitting without gathering
-- rbr_fit_table iterates over a table: each step (a few barrier Newton steps,
-- then working-set passes) is one SQL pass whose pairs are formed and summed
-- where the rows are, by plain aggregates with float8[] states and combine
-- functions (parallel query and Citus aggregate them partially on the workers).
CREATE FUNCTION rbr.fit_pairs_transfn(float8[], float8[], text, int, int, float8[], float8[], float8, float8)
    RETURNS float8[] AS 'MODULE_PATHNAME', 'rbr_fit_pairs_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION rbr.fit_sums_combine(float8[], float8[])
    RETURNS float8[] AS 'MODULE_PATHNAME', 'rbr_fit_sums_combine' LANGUAGE C STRICT PARALLEL SAFE;
-- One pass's sums over ordered pairs (a better than b) at the weights and
-- barrier parameter in params: hinge, barrier, multipliers, curvature.
CREATE AGGREGATE rbr.fit_pairs(params float8[], group_key text, tier_a int, tier_b int,
                               features_a float8[], features_b float8[], base_a float8, base_b float8) (
    SFUNC = rbr.fit_pairs_transfn,
    STYPE = float8[],
    COMBINEFUNC = rbr.fit_sums_combine,
    PARALLEL = SAFE
);
CREATE FUNCTION rbr.fit_band_transfn(float8[], float8[], text, int, int, float8[], float8[], float8, float8)
    RETURNS float8[] AS 'MODULE_PATHNAME', 'rbr_fit_band_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION rbr.fit_band_combine(float8[], float8[])
    RETURNS float8[] AS 'MODULE_PATHNAME', 'rbr_fit_band_combine' LANGUAGE C STRICT PARALLEL SAFE;
-- One working-set pass at the weights in params: the pairs near the kink
-- one by one (a bounded working set), the active ones as sums, the losses.
CREATE AGGREGATE rbr.fit_band(params float8[], group_key text, tier_a int, tier_b int,
                              features_a float8[], features_b float8[], base_a float8, base_b float8) (
    SFUNC = rbr.fit_band_transfn,
    STYPE = float8[],
    COMBINEFUNC = rbr.fit_band_combine,
    PARALLEL = SAFE
);
CREATE FUNCTION rbr.fit_table_rows_transfn(float8[], int, float8[], float8, boolean)
    RETURNS float8[] AS 'MODULE_PATHNAME', 'rbr_fit_table_rows_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION rbr.fit_table_rows_combine(float8[], float8[])
    RETURNS float8[] AS 'MODULE_PATHNAME', 'rbr_fit_table_rows_combine' LANGUAGE C STRICT PARALLEL SAFE;
-- The row check of a group: {complete rows, skipped rows, features, lowest
-- tier, highest tier}; errors on the values rbr_fit refuses.
CREATE AGGREGATE rbr.fit_table_rows(tier int, features float8[], base_reward float8, key_present boolean) (
    SFUNC = rbr.fit_table_rows_transfn,
    STYPE = float8[],
    COMBINEFUNC = rbr.fit_table_rows_combine,
    PARALLEL = SAFE
);
-- Fit the weights of rbr_fit by passes over a table, without gathering its
-- rows: the same objective and optimum (certified gap), the same report.
-- where_column/where_value pick the rows of one response type.
CREATE FUNCTION @extschema@.rbr_fit_table(source regclass, group_column name, tier_column name,
                                          features_column name, base_column name, options jsonb DEFAULT '{}',
                                          where_column name DEFAULT NULL, where_value text DEFAULT NULL)
    RETURNS jsonb AS 'MODULE_PATHNAME', 'rbr_fit_table' LANGUAGE C VOLATILE PARALLEL UNSAFE
    SET search_path = pg_catalog, pg_temp;
-- The query of one pass of rbr_fit_table ($1 its parameters, $2 where_value),
-- to EXPLAIN: pass 'barrier' or 'working_set'.
CREATE FUNCTION rbr.fit_table_pass_query(source regclass, group_column name, tier_column name,
                                         features_column name, base_column name, options jsonb DEFAULT '{}',
                                         where_column name DEFAULT NULL, where_value text DEFAULT NULL,
                                         pass text DEFAULT 'barrier')
    RETURNS text AS 'MODULE_PATHNAME', 'rbr_fit_table_pass_query' LANGUAGE C STABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp;

-------------------------------------------------------------------------------
-- Batch mode: the provider's Batch API
-------------------------------------------------------------------------------
-- (section: batch)
-- rbr_featurize(source, policy, '{"mode": "batch"}') sends the questions the
-- cache cannot answer through the provider's Batch API (OpenAI's /v1/files
-- and /v1/batches, or Azure OpenAI's), at half the price of online requests,
-- with answers within 24 hours. A call collects the batches that ended
-- (answers go to the grade cache through the grader's own parser), writes
-- every value the cache now answers exactly as online grading does, and
-- submits what is still missing; {"wait": true} polls until nothing is in
-- flight. rbr_synthesize takes the same options: its generations and grades
-- go through batches, a slot moving on as their answers come back.
-- src/batch.c describes the steps.

-- Batches of the Batch API, one row per uploaded file, of grader questions
-- or (rbr_synthesize) generator requests. No role may read or
-- write it: the functions below (C, src/batch.c) do, as the extension's
-- owner, after checking that the caller owns the run or batch.
CREATE TABLE rbr.batch (
    batch_id           bigserial   PRIMARY KEY,
    run_id             bigint      NOT NULL,     -- the run that submitted it
    owner              regrole     NOT NULL,
    kind               text        NOT NULL DEFAULT 'grade' CHECK (kind IN ('grade', 'generate')),
    api                text        NOT NULL CHECK (api IN ('openai', 'azure')),
    state              text        NOT NULL DEFAULT 'new' CHECK (state IN ('new', 'uploaded', 'submitted', 'ended')),
    lines              int         NOT NULL,
    input_file_id      text,                     -- recorded (committed) before the batch is created
    provider_id        text,
    provider_status    text,                     -- validating, in_progress, completed, expired, ...
    provider_completed int,
    provider_failed    int,
    answered           int,                      -- when collected: lines answered,
    requeued           int,                      -- queued again (failed or expired: submitted again),
    failed             int,                      -- failed for good
    created_at         timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    submitted_at       timestamptz,
    ended_at           timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
COMMENT ON TABLE rbr.batch IS 'Batch API batches of rbr_featurize runs in batch mode';
REVOKE ALL ON rbr.batch FROM PUBLIC;
REVOKE ALL ON SEQUENCE rbr.batch_batch_id_seq FROM PUBLIC;

-- One question of one owner asked through the Batch API: its grade cache
-- key, its request body until answered, its state. custom_id is
-- 'rbr-' || line_id (no user text). An owner has at most one line per
-- question that is not applied yet, so a question is never paid twice.
CREATE TABLE rbr.batch_line (
    line_id           bigserial   PRIMARY KEY,
    owner             regrole     NOT NULL,
    run_id            bigint      NOT NULL,      -- the run that queued it
    batch_id          bigint,                    -- its batch, NULL while queued for the next one
    kind              text        NOT NULL DEFAULT 'grade' CHECK (kind IN ('grade', 'generate')),
    key               bytea       NOT NULL CHECK (pg_catalog.length(key) = 32),   -- grade or generation cache key
    proposition       text        NOT NULL,         -- '' for a generation
    body              text,                      -- the request, as online (NULL once answered)
    state             text        NOT NULL DEFAULT 'queued'
                                  CHECK (state IN ('queued', 'submitted', 'done', 'applied', 'failed')),
    attempts          int         NOT NULL DEFAULT 0,   -- batches it was submitted in
    error             text,
    prompt_tokens     int,
    completion_tokens int,
    cached_tokens     int,
    reasoning_tokens  int,
    created_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    updated_at        timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
CREATE UNIQUE INDEX batch_line_question ON rbr.batch_line (owner, key) WHERE state <> 'applied';
CREATE INDEX batch_line_batch ON rbr.batch_line (batch_id);
CREATE INDEX batch_line_owner_state ON rbr.batch_line (owner, state);
COMMENT ON TABLE rbr.batch_line IS 'questions of rbr_featurize runs in batch mode, one per owner and grade cache key';
REVOKE ALL ON rbr.batch_line FROM PUBLIC;
REVOKE ALL ON SEQUENCE rbr.batch_line_line_id_seq FROM PUBLIC;

-- The batch options of rbr_featurize, checked: {} online, else mode, wait
-- and poll_seconds (NULL: rbr.batch_poll_seconds).
CREATE FUNCTION rbr.batch_options(options jsonb) RETURNS jsonb
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    mode text := COALESCE(options->>'mode', 'online');
    poll float8;
BEGIN
    IF mode NOT IN ('online', 'batch') THEN
        RAISE EXCEPTION 'mode must be ''online'' or ''batch''' USING ERRCODE = 'invalid_parameter_value',
            HINT = '''batch'' sends the questions through the provider''s Batch API (half price, answers within 24 hours).';
    END IF;
    IF options ? 'wait' AND jsonb_typeof(options->'wait') <> 'boolean' THEN
        RAISE EXCEPTION 'wait must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF options ? 'poll_seconds' THEN
        IF jsonb_typeof(options->'poll_seconds') <> 'number' OR (options->>'poll_seconds')::float8 NOT BETWEEN 0.01 AND 86400 THEN
            RAISE EXCEPTION 'poll_seconds must be a number between 0.01 and 86400' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        poll := (options->>'poll_seconds')::float8;
    END IF;
    IF mode = 'online' THEN
        IF options ? 'wait' OR options ? 'poll_seconds' THEN
            RAISE EXCEPTION 'wait and poll_seconds are options of batch mode' USING ERRCODE = 'invalid_parameter_value',
                HINT = 'Pass {"mode": "batch", "wait": true}.';
        END IF;
        RETURN '{}';
    END IF;
    IF options ? 'max_requests' OR options ? 'max_tokens' THEN
        RAISE EXCEPTION 'max_requests and max_tokens are options of online mode' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'A batch-mode call submits every missing question; see what they cost first with {"dry_run": true}.';
    END IF;
    RETURN jsonb_strip_nulls(jsonb_build_object('mode', 'batch', 'wait', COALESCE((options->>'wait')::boolean, false),
                                                'poll_seconds', poll));
END
$$;

-- Is a run in batch mode?
CREATE FUNCTION rbr.batch_mode(run bigint) RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT COALESCE((rbr.run_get(run)).options->>'mode' = 'batch', false)
$$;

-- One chunk of a batch-mode run: rbr.featurize_chunk (or rbr.synth_chunk),
-- grading (and generating) from the caches only; a missing question is
-- queued for a batch (or is in flight) and its value (or slot) is skipped.
CREATE FUNCTION rbr.batch_chunk(run bigint) RETURNS int
    AS 'MODULE_PATHNAME', 'rbr_batch_chunk'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
-- Start a run's chunks from its first row again.
CREATE FUNCTION rbr.batch_rewind(run bigint) RETURNS void
    AS 'MODULE_PATHNAME', 'rbr_batch_rewind'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
-- Collect the ended batches of the run's owner; returns the lines answered or failed.
CREATE FUNCTION rbr.batch_collect(run bigint) RETURNS int
    AS 'MODULE_PATHNAME', 'rbr_batch_collect'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
-- The next batch to submit (one left half-way, or a new one of queued lines); NULL if none.
CREATE FUNCTION rbr.batch_prepare(run bigint) RETURNS bigint
    AS 'MODULE_PATHNAME', 'rbr_batch_prepare'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
-- Upload a batch's lines as a JSONL file; returns the input file id.
CREATE FUNCTION rbr.batch_upload(batch bigint) RETURNS text
    AS 'MODULE_PATHNAME', 'rbr_batch_upload'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
-- Create the provider's batch of an uploaded file (or find the one created); returns its id.
CREATE FUNCTION rbr.batch_create(batch bigint) RETURNS text
    AS 'MODULE_PATHNAME', 'rbr_batch_create'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
-- The lines of a run's source by state, and the owner's batches in flight.
CREATE FUNCTION rbr.batch_state(run bigint, OUT queued bigint, OUT submitted bigint, OUT answered bigint,
                                OUT failed bigint, OUT batches_in_flight bigint, OUT provider_ids text)
    AS 'MODULE_PATHNAME', 'rbr_batch_state'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
-- Wait (cancellable at once); NULL: rbr.batch_poll_seconds.
CREATE FUNCTION rbr.batch_sleep(seconds float8) RETURNS void
    AS 'MODULE_PATHNAME', 'rbr_batch_sleep'
    LANGUAGE C VOLATILE PARALLEL UNSAFE;

-- Drive a batch-mode run: collect, write what the cache answers, submit
-- what is missing, committing after each step; with wait, poll until
-- nothing of the source is in flight. A procedure (it commits), every name
-- qualified.
CREATE PROCEDURE rbr.batch_drive(run bigint)
    LANGUAGE plpgsql
    AS $$
DECLARE
    r rbr.run;
    st record;
    b bigint;
    ended int;
    created int := 0;
    wait boolean;
    poll float8;
    first boolean := true;
    reasons text;
    proc text;
    what text;
BEGIN
    r := rbr.run_get(run);
    proc := CASE WHEN r.kind OPERATOR(pg_catalog.=) 'featurize' THEN 'rbr_featurize' ELSE 'rbr_synthesize' END;
    what := CASE WHEN r.kind OPERATOR(pg_catalog.=) 'featurize' THEN 'value(s)' ELSE 'slot(s) accepted' END;
    wait := COALESCE((r.options OPERATOR(pg_catalog.->>) 'wait')::boolean, false);
    poll := (r.options OPERATOR(pg_catalog.->>) 'poll_seconds')::float8;
    LOOP
        -- the batches that ended: answers into the cache, failed lines queued again
        ended := rbr.batch_collect(run);
        COMMIT;
        -- every value the cache answers, written as online; the rest queued
        IF first OR ended OPERATOR(pg_catalog.>) 0 THEN
            PERFORM rbr.batch_rewind(run);
            COMMIT;
            LOOP
                EXIT WHEN rbr.batch_chunk(run) OPERATOR(pg_catalog.=) 0;
                COMMIT;
            END LOOP;
            COMMIT;
        END IF;
        -- submit what is queued: file id committed before the batch is created
        LOOP
            b := rbr.batch_prepare(run);
            EXIT WHEN b IS NULL;
            COMMIT;
            PERFORM rbr.batch_upload(b);
            COMMIT;
            PERFORM rbr.batch_create(b);
            COMMIT;
            created := created OPERATOR(pg_catalog.+) 1;
        END LOOP;
        st := rbr.batch_state(run);
        EXIT WHEN NOT wait OR st.queued OPERATOR(pg_catalog.+) st.submitted OPERATOR(pg_catalog.=) 0;
        PERFORM rbr.batch_sleep(poll);
        first := false;
    END LOOP;
    r := rbr.run_finish(run);
    COMMIT;
    IF st.queued OPERATOR(pg_catalog.+) st.submitted OPERATOR(pg_catalog.>) 0 THEN
        RAISE NOTICE '% %: % question(s) in flight in % batch(es) of the Batch API (% created by this call: %)',
                     proc, r.source, st.queued OPERATOR(pg_catalog.+) st.submitted, st.batches_in_flight, created,
                     COALESCE(st.provider_ids, 'none')
            USING DETAIL = pg_catalog.format('%s %s written by this call, %s error(s).', r.done, what, r.errors),
                  HINT = pg_catalog.format('CALL %s again with {"mode": "batch"} to collect the answers (SELECT * FROM rbr.batch_progress shows the batches), or add "wait": true to wait for them.', proc);
    ELSE
        RAISE NOTICE '% %: nothing in flight; % % written by this call, % error(s)',
                     proc, r.source, r.done, what, r.errors;
    END IF;
    IF r.errors OPERATOR(pg_catalog.>) 0 THEN
        reasons := rbr.run_error_reasons(run);
        RAISE WARNING '% %: % of % % ended with an error', proc, r.source, r.errors, r.total,
                      CASE WHEN r.kind OPERATOR(pg_catalog.=) 'featurize' THEN 'values' ELSE 'slots' END
            USING DETAIL = 'Commonest reasons: ' OPERATOR(pg_catalog.||) reasons,
                  HINT = rbr.run_error_query(run);
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.batch_options(jsonb), rbr.batch_mode(bigint), rbr.batch_chunk(bigint),
                           rbr.batch_rewind(bigint), rbr.batch_collect(bigint), rbr.batch_prepare(bigint),
                           rbr.batch_upload(bigint), rbr.batch_create(bigint), rbr.batch_state(bigint),
                           rbr.batch_sleep(float8) FROM PUBLIC;
REVOKE EXECUTE ON PROCEDURE rbr.batch_drive(bigint) FROM PUBLIC;

-- The batches a role may see (its own, those of roles it is a member of; a
-- superuser sees all): state at the provider, lines, and once collected
-- the lines answered, queued again and failed.
CREATE VIEW rbr.batch_progress AS
    SELECT b.batch_id, b.run_id, b.owner, r.source, b.kind, b.api, b.state, b.provider_id, b.provider_status,
           b.lines, b.provider_completed, b.provider_failed, b.answered, b.requeued, b.failed,
           b.created_at, b.submitted_at, b.ended_at, b.updated_at
      FROM rbr.batch b JOIN rbr.run r ON r.run_id OPERATOR(pg_catalog.=) b.run_id
     WHERE pg_catalog.pg_has_role(b.owner::pg_catalog.oid, 'USAGE');
GRANT SELECT ON rbr.batch_progress TO PUBLIC;

-- rbr_featurize and rbr_synthesize take options mode, wait and
-- poll_seconds (their new definitions are in the section "cost" below).

-- The grade and synthesize capabilities: what batch mode needs.
CREATE OR REPLACE FUNCTION rbr.capability_privileges(OUT capability text, OUT kind text, OUT object text, OUT privileges text)
    RETURNS SETOF record
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    VALUES
        ('grade', 'FUNCTION', '@extschema@.rbr_grade(text, text, jsonb, text)', 'EXECUTE'),
        ('grade', 'FUNCTION', '@extschema@.rbr_grade_many(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('grade', 'PROCEDURE', '@extschema@.rbr_featurize(regclass, text, jsonb)', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.featurize_start(regclass, text, jsonb)', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.featurize_chunk(bigint)', 'EXECUTE'),
        ('grade', 'FUNCTION', '@extschema@.rbr_score(text, text, jsonb, text, float8)', 'EXECUTE'),
        ('grade', 'FUNCTION', '@extschema@.rbr_check_grader(text)', 'EXECUTE'),
        ('grade', 'FUNCTION', '@extschema@.rbr_featurize_estimate(regclass, text, jsonb)', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.featurize_dry_run(regclass, text, jsonb)', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.featurize_budget(bigint, text[], jsonb[], text[])', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.grade_plan(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', '@extschema@.rbr_generate_many(jsonb[], text[], int[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', '@extschema@.rbr_grade_many(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('synthesize', 'PROCEDURE', '@extschema@.rbr_synthesize(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_start(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_chunk(bigint)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', '@extschema@.rbr_synthesize_estimate(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_dry_run(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_budget(bigint, bigint, bigint, jsonb[], text[], int[], text[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_plan_cost(text, jsonb[], text[], int[], text[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.generate_plan(jsonb[], text[], int[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.grade_plan(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('policies', 'TABLE', 'rbr.policy_version', 'INSERT'),
        ('models', 'TABLE', 'rbr.model', 'INSERT, UPDATE, DELETE')
    UNION ALL
    SELECT c, k, o, p
      FROM (VALUES ('grade'), ('synthesize')) AS c(c),
           (VALUES ('FUNCTION', 'rbr.run_begin(text, regclass, regclass[], text, jsonb, bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_get(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_advance(bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint, jsonb, text)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_finish(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_error_reasons(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_error_query(bigint)', 'EXECUTE'),
                   ('PROCEDURE', 'rbr.run_drive(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_stop(bigint, text)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_stopped(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_stopped_report(bigint)', 'EXECUTE')) AS r(k, o, p)
    UNION ALL
    -- batch mode of rbr_featurize and rbr_synthesize
    SELECT c, k, o, p
      FROM (VALUES ('grade'), ('synthesize')) AS c(c),
           (VALUES ('FUNCTION', 'rbr.batch_options(jsonb)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_mode(bigint)', 'EXECUTE'),
                   ('PROCEDURE', 'rbr.batch_drive(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_chunk(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_rewind(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_collect(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_prepare(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_upload(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_create(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_state(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_sleep(float8)', 'EXECUTE')) AS b(k, o, p)
$$;

-- Roles holding the grade or synthesize capability get what batch mode needs
-- (granted here directly: the capability list names objects of later sections).
DO $$
DECLARE
    g record;
    f text;
BEGIN
    FOR g IN SELECT DISTINCT a.grantee::pg_catalog.regrole AS role
               FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
              WHERE p.oid OPERATOR(pg_catalog.=) ANY (ARRAY['@extschema@.rbr_featurize(regclass, text, jsonb)'::pg_catalog.regprocedure,
                                                          '@extschema@.rbr_synthesize(regclass, text, jsonb)'::pg_catalog.regprocedure])
                AND a.grantee OPERATOR(pg_catalog.<>) 0 AND a.grantee OPERATOR(pg_catalog.<>) p.proowner LOOP
        FOREACH f IN ARRAY ARRAY['FUNCTION rbr.batch_options(jsonb)', 'FUNCTION rbr.batch_mode(bigint)',
                                 'PROCEDURE rbr.batch_drive(bigint)', 'FUNCTION rbr.batch_chunk(bigint)',
                                 'FUNCTION rbr.batch_rewind(bigint)', 'FUNCTION rbr.batch_collect(bigint)',
                                 'FUNCTION rbr.batch_prepare(bigint)', 'FUNCTION rbr.batch_upload(bigint)',
                                 'FUNCTION rbr.batch_create(bigint)', 'FUNCTION rbr.batch_state(bigint)',
                                 'FUNCTION rbr.batch_sleep(float8)'] LOOP
            EXECUTE pg_catalog.format('GRANT EXECUTE ON %s TO %s', f, g.role);
        END LOOP;
    END LOOP;
END
$$;

-------------------------------------------------------------------------------
-- Rate budget shared by the cluster
-------------------------------------------------------------------------------
-- (section: rate)
-- The endpoints' rate budgets: shared by every session when rbr is
-- preloaded (shared = true), this session's otherwise. The endpoint's host
-- is shown to superusers and members of pg_read_all_settings only.
CREATE FUNCTION @extschema@.rbr_rate_status(
        OUT slot int, OUT kind text, OUT endpoint text, OUT model text, OUT shared boolean,
        OUT requests_per_minute float8, OUT tokens_per_minute float8, OUT "window" float8,
        OUT in_flight int, OUT requests bigint, OUT ok bigint, OUT throttled bigint,
        OUT waits bigint, OUT remaining_requests bigint, OUT remaining_tokens bigint,
        OUT last_used timestamptz)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_rate_status'
    LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-------------------------------------------------------------------------------
-- Cost before and after: dry runs, budgets, prompt caching
-------------------------------------------------------------------------------
-- (section: cost)
-- Runs may stop at a budget: state 'stopped', the reason in stop_reason.
ALTER TABLE rbr.run DROP CONSTRAINT run_state_check,
    ADD CONSTRAINT run_state_check CHECK (state IN ('running', 'done', 'stopped')),
    ADD COLUMN stop_reason text;

-- Changed in place: the progress views show stop_reason; rbr.run_drive ends
-- a stopped run; rbr_featurize takes dry_run / max_requests / max_tokens and
-- its chunks keep to the budget; rbr_synthesize's runs count cached and
-- reasoning tokens.
CREATE OR REPLACE VIEW rbr.run_progress AS
    SELECT r.run_id, r.kind, r.owner, r.source, r.policy,
           CASE WHEN r.state = 'running' AND NOT EXISTS
                     (SELECT 1 FROM pg_catalog.pg_stat_activity a WHERE a.pid OPERATOR(pg_catalog.=) r.pid)
                THEN 'interrupted' ELSE r.state END AS state,
           r.done, r.errors, r.total,
           pg_catalog.round(100.0 * (r.done + r.errors) / GREATEST(r.total, 1), 1) AS percent,
           pg_catalog.round(((r.done + r.errors) /
                 GREATEST(EXTRACT(epoch FROM r.updated_at - r.started_at), 0.001))::numeric, 1) AS per_second,
           CASE WHEN r.state = 'done' THEN interval '0'
                WHEN r.state = 'stopped' OR r.done + r.errors = 0 THEN NULL
                ELSE (r.updated_at - r.started_at) *
                     ((r.total - r.done - r.errors)::float8 / (r.done + r.errors))
           END AS eta,
           r.requests, r.cached, r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.reasoning_tokens,
           r.counters, r.chunks, r.started_at, r.updated_at, r.finished_at, r.stop_reason
      FROM rbr.run r
     WHERE pg_catalog.pg_has_role(r.owner::pg_catalog.oid, 'USAGE');

CREATE OR REPLACE VIEW rbr.featurize_progress AS
    SELECT p.run_id, p.owner, p.source, p.policy, p.state, p.done, p.errors, p.total, p.percent,
           p.per_second AS values_per_second, p.eta, p.requests, p.cached, p.prompt_tokens,
           p.completion_tokens, p.cached_tokens, p.reasoning_tokens, p.chunks, p.started_at, p.updated_at,
           p.finished_at, p.stop_reason
      FROM rbr.run_progress p
     WHERE p.kind OPERATOR(pg_catalog.=) 'featurize';

CREATE OR REPLACE VIEW rbr.synth_progress AS
    SELECT p.run_id, p.owner, p.source, p.policy, p.state,
           p.done AS accepted, COALESCE((p.counters ->> 'gave_up')::bigint, 0) AS gave_up, p.errors,
           p.total,
           pg_catalog.round(100.0 * (p.done + COALESCE((p.counters ->> 'gave_up')::bigint, 0) + p.errors)
                            / GREATEST(p.total, 1), 1) AS percent,
           CASE WHEN p.state = 'done' THEN interval '0'
                WHEN p.state = 'stopped' OR p.done + COALESCE((p.counters ->> 'gave_up')::bigint, 0) + p.errors = 0 THEN NULL
                ELSE (p.updated_at - p.started_at) *
                     ((p.total - p.done - COALESCE((p.counters ->> 'gave_up')::bigint, 0) - p.errors)::float8
                      / (p.done + COALESCE((p.counters ->> 'gave_up')::bigint, 0) + p.errors))
           END AS eta,
           COALESCE((p.counters ->> 'candidates')::bigint, 0) AS candidates,
           COALESCE((p.counters ->> 'rejections')::bigint, 0) AS rejections,
           COALESCE((p.counters ->> 'generator_requests')::bigint, 0) AS generator_requests,
           COALESCE((p.counters ->> 'generator_cached')::bigint, 0) AS generator_cached,
           COALESCE((p.counters ->> 'grader_requests')::bigint, 0) AS grader_requests,
           COALESCE((p.counters ->> 'grader_cached')::bigint, 0) AS grader_cached,
           p.prompt_tokens, p.completion_tokens, p.cached_tokens, p.reasoning_tokens,
           p.chunks, p.started_at, p.updated_at, p.finished_at, p.stop_reason
      FROM rbr.run_progress p
     WHERE p.kind OPERATOR(pg_catalog.=) 'synthesize';

CREATE OR REPLACE PROCEDURE rbr.run_drive(run bigint)
    LANGUAGE plpgsql
    AS $$
DECLARE
    r rbr.run;
    reasons text;
BEGIN
    r := rbr.run_get(run);
    LOOP
        IF r.kind OPERATOR(pg_catalog.=) 'featurize' THEN
            EXIT WHEN rbr.featurize_chunk(run) OPERATOR(pg_catalog.=) 0;
        ELSE
            EXIT WHEN rbr.synth_chunk(run) OPERATOR(pg_catalog.=) 0;
        END IF;
        COMMIT;
        -- a budget reached (rbr.featurize_budget): the run ends here
        EXIT WHEN rbr.run_stopped(run);
    END LOOP;
    IF rbr.run_stopped(run) THEN
        PERFORM rbr.run_stopped_report(run);
        RETURN;
    END IF;
    r := rbr.run_finish(run);
    COMMIT;
    reasons := rbr.run_error_reasons(run);
    IF r.errors OPERATOR(pg_catalog.>) 0 THEN
        RAISE WARNING '% %: % of % % ended with an error',
                      CASE WHEN r.kind OPERATOR(pg_catalog.=) 'featurize' THEN 'rbr_featurize' ELSE 'rbr_synthesize' END,
                      r.source, r.errors, r.total,
                      CASE WHEN r.kind OPERATOR(pg_catalog.=) 'featurize' THEN 'values' ELSE 'slots' END
            USING DETAIL = 'Commonest reasons: ' OPERATOR(pg_catalog.||) reasons,
                  HINT = rbr.run_error_query(run);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION rbr.featurize_start(source regclass, policy text, options jsonb) RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    info jsonb;
    polref text;
    nsp name;
    rel name;
    keycol name;
    keytype text;
    pcol text := COALESCE(options->>'prompt_column', 'prompt');
    ccol text := COALESCE(options->>'completion_column', 'completion');
    rcol text := COALESCE(options->>'response_type_column', 'response_type');
    chunk int;
    mode text := COALESCE(options->>'class_mode', 'product');
    which text := COALESCE(options->>'propositions', 'needed');
    rt_expr text;
    unknown_rt bigint;
    ftab text;
    gtab text;
    cols text[];
    col text;
    bad text;
    t text;
    nulls_expr text;
    total bigint;
BEGIN
    IF source IS NULL OR policy IS NULL OR options IS NULL THEN
        RAISE EXCEPTION 'rbr_featurize() arguments must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(k, ', ') INTO bad FROM jsonb_object_keys(options) k
     WHERE k NOT IN ('prompt_column', 'completion_column', 'response_type_column', 'chunk_rows', 'class_mode',
                     'propositions', 'dry_run', 'max_requests', 'max_tokens', 'mode', 'wait', 'poll_seconds');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown rbr_featurize option(s): %', bad USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Known options: prompt_column, completion_column, response_type_column, chunk_rows, class_mode, propositions, dry_run, max_requests, max_tokens, mode, wait, poll_seconds.';
    END IF;
    PERFORM rbr.cost_check_options(options);
    PERFORM rbr.batch_options(options);
    IF which NOT IN ('needed', 'all') THEN
        RAISE EXCEPTION 'propositions must be ''needed'' or ''all''' USING ERRCODE = 'invalid_parameter_value',
            HINT = '''needed'' (the default) grades what each row''s response type needs; ''all'' grades every simple proposition.';
    END IF;
    BEGIN
        chunk := COALESCE((options->>'chunk_rows')::int, 64);
    EXCEPTION WHEN others THEN
        chunk := 0;
    END;
    IF chunk NOT BETWEEN 1 AND 100000 THEN
        RAISE EXCEPTION 'chunk_rows must be an integer between 1 and 100000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mode NOT IN ('product', 'exact') THEN
        RAISE EXCEPTION 'class_mode must be ''product'' or ''exact''' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    info := @extschema@.rbr_policy_info(policy);
    polref := (info->>'name') || '@' || (info->>'version');

    SELECT * INTO nsp, rel, keycol, keytype
      FROM rbr.check_source(source, 'rbr_featurize', rcol, ARRAY[pcol, ccol],
           'Name the columns with options {"prompt_column": ..., "completion_column": ..., "response_type_column": ...}.',
           'prompt: jsonb messages or text; completion: text or jsonb messages; response_type: text.');
    IF length(rel) > 63 - length('_features') THEN
        RAISE EXCEPTION 'table name % is too long to derive %_features', rel, rel USING ERRCODE = 'name_too_long';
    END IF;
    ftab := format('%I.%I', nsp, rel || '_features');
    gtab := format('%I.%I', nsp, rel || '_grades');
    SELECT array_agg(x ORDER BY o) INTO cols FROM (
        SELECT x, o FROM jsonb_array_elements_text(info->'simple_propositions') WITH ORDINALITY AS e(x, o)
        UNION ALL
        SELECT x, o + 100000 FROM jsonb_array_elements_text(info->'classes') WITH ORDINALITY AS e(x, o)) s;
    IF keycol = ANY (cols || 'rbr_response_type'::text) THEN
        RAISE EXCEPTION 'the primary key column % of % has the name of a feature', quote_ident(keycol), source
            USING ERRCODE = 'duplicate_column',
                  HINT = '<source>_features holds the key, rbr_response_type and one column per feature; rename the key column.';
    END IF;
    IF 'rbr_response_type' = ANY (cols) THEN
        RAISE EXCEPTION 'policy % names a proposition or class rbr_response_type', polref
            USING ERRCODE = 'duplicate_column',
                  HINT = '<source>_features keeps each row''s folded response type in column rbr_response_type; rename the proposition.';
    END IF;

    -- one set-up at a time per source table
    PERFORM pg_advisory_xact_lock(hashtext('rbr.featurize'), source::oid::int);
    PERFORM rbr.check_own_table(ftab, 'rbr_featurize');
    PERFORM rbr.check_own_table(gtab, 'rbr_featurize');
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (%I %s PRIMARY KEY, rbr_response_type text)', ftab, keycol, keytype);
    -- features tables of 0.2.0: the folded response type, the bookkeeping claims read
    EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS rbr_response_type text', ftab);
    FOREACH col IN ARRAY cols LOOP
        EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS %I float8', ftab, col);
    END LOOP;
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (
        %I %s NOT NULL,
        proposition text NOT NULL,
        status text NOT NULL CHECK (status IN (''ok'', ''error'')),
        probability float8 CHECK ((status = ''ok'') = (probability IS NOT NULL)),
        method text,
        yes_no_mass float8,
        model text,
        error text,
        attempts int NOT NULL,
        prompt_tokens int,
        completion_tokens int,
        cached boolean NOT NULL,
        graded_at timestamptz NOT NULL,
        samples int,
        cached_tokens int,
        reasoning_tokens int,
        PRIMARY KEY (%I, proposition))', gtab, keycol, keytype, keycol);
    -- grades tables of 0.1.0: the columns of 0.2.0 (method's sample count, token kinds)
    IF NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = gtab::regclass AND a.attname = 'samples'
                                                 AND NOT a.attisdropped) THEN
        EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS samples int, ADD COLUMN IF NOT EXISTS cached_tokens int,'
                       ' ADD COLUMN IF NOT EXISTS reasoning_tokens int', gtab);
    END IF;
    -- one row per source row with its folded response type: the only pass over
    -- the source; chunks claim from this (local) table and read just the
    -- claimed source rows by key, so the source may be a distributed table
    rt_expr := rbr.fold_name_sql(format('s.%I', rcol));
    EXECUTE format('INSERT INTO %1$s AS f (%2$I, rbr_response_type) SELECT s.%2$I, %3$s FROM %4$s s'
                   ' ON CONFLICT (%2$I) DO UPDATE SET rbr_response_type = EXCLUDED.rbr_response_type'
                   ' WHERE f.rbr_response_type IS DISTINCT FROM EXCLUDED.rbr_response_type',
                   ftab, keycol, rt_expr, source);

    -- the needed values still missing, counted per row's response type
    nulls_expr := rbr.featurize_need_sql(info, which, 'f.rbr_response_type', 'f.%1$I', ', ', 'num_nulls(%s)', '0');
    EXECUTE format('SELECT COALESCE(sum(%s), 0) FROM %s f', nulls_expr, ftab) INTO total;
    IF which = 'needed' THEN
        EXECUTE format('SELECT count(*) FROM %s f WHERE f.rbr_response_type IS NULL OR NOT ($1 ? f.rbr_response_type)', ftab)
            INTO unknown_rt USING info->'response_types';
        IF unknown_rt > 0 THEN
            RAISE WARNING 'rbr_featurize %: % row(s) have no response type of policy %; they are not graded',
                source, unknown_rt, polref
                USING HINT = format('Its response types are %s. Fix column %I, or pass {"propositions": "all"} to grade every simple proposition of every row.',
                                    (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(info->'response_types') k), rcol);
        END IF;
    END IF;
    RETURN rbr.run_begin('featurize', source, ARRAY[ftab::regclass, gtab::regclass], polref,
                         jsonb_build_object('prompt_column', pcol, 'completion_column', ccol,
                                            'response_type_column', rcol, 'chunk_rows', chunk, 'class_mode', mode,
                                            'propositions', which) || rbr.cost_run_options(options)
                                            || rbr.batch_options(options),
                         total);
END
$$;

CREATE OR REPLACE FUNCTION rbr.featurize_chunk(run_id bigint) RETURNS int
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    r rbr.run;
    info jsonb;
    o jsonb;
    keycol text;
    keytype text;
    props text[];
    classes text[];
    nulls_cond text;
    prompt_expr text;
    compl_expr text;
    ptype text;
    ctype text;
    claim text;
    fetch_sql text;
    claimed_keys text[];
    claimed_cur jsonb[];
    src jsonb;
    k int;
    rec record;
    g record;
    keys text[] := '{}';
    rts text[] := '{}';
    q_idx int[] := '{}';
    q_prop text[] := '{}';
    q_prompt jsonb[] := '{}';
    q_compl text[] := '{}';
    vals jsonb[] := '{}';
    nrows int := 0;
    i int;
    p text;
    n_ok bigint := 0;
    n_err bigint := 0;
    n_cached bigint := 0;
    n_req bigint := 0;
    n_pt bigint := 0;
    n_ct bigint := 0;
    n_cat bigint := 0;
    n_rt bigint := 0;
    upd_props text;
    upd_classes text;
    rt text;
    needed text[];
    probs jsonb;
    cp jsonb;
    cur jsonb;
    elapsed float8;
    rate float8;
    remaining bigint;
    kept int[];
BEGIN
    r := rbr.run_get(featurize_chunk.run_id);
    o := r.options;
    -- names and types from the catalogs, on every use
    SELECT k.keycol, k.keytype INTO keycol, keytype FROM rbr.run_source_key(r.source) k;
    info := @extschema@.rbr_policy_info(r.policy);
    SELECT array_agg(x ORDER BY n) INTO props FROM jsonb_array_elements_text(info->'simple_propositions') WITH ORDINALITY e(x, n);
    SELECT array_agg(x ORDER BY n) INTO classes FROM jsonb_array_elements_text(info->'classes') WITH ORDINALITY e(x, n);
    -- a row is claimed while one of its needed values is missing
    nulls_cond := rbr.featurize_need_sql(info, COALESCE(o->>'propositions', 'needed'), 'f.rbr_response_type',
                                         'f.%1$I IS NULL', ' OR ', '(%s)', 'false');

    SELECT format_type(a.atttypid, NULL) INTO ptype FROM pg_attribute a
     WHERE a.attrelid = r.source AND a.attname = o->>'prompt_column' AND NOT a.attisdropped;
    SELECT format_type(a.atttypid, NULL) INTO ctype FROM pg_attribute a
     WHERE a.attrelid = r.source AND a.attname = o->>'completion_column' AND NOT a.attisdropped;
    prompt_expr := CASE WHEN ptype IN ('jsonb', 'json') THEN format('s.%I::jsonb', o->>'prompt_column')
                        ELSE format('to_jsonb(s.%I::text)', o->>'prompt_column') END;
    -- a jsonb completion: the content of its last message (or the string itself)
    compl_expr := CASE WHEN ctype IN ('jsonb', 'json') THEN
                       format('CASE jsonb_typeof(s.%1$I::jsonb) WHEN ''array'' THEN s.%1$I::jsonb -> -1 ->> ''content'''
                              ' WHEN ''object'' THEN s.%1$I::jsonb ->> ''content'' ELSE s.%1$I::jsonb #>> ''{}'' END',
                              o->>'completion_column')
                       ELSE format('s.%I::text', o->>'completion_column') END;

    -- claim rows of the (local) features table, then read just those source
    -- rows by key (on Citus: the shards that hold them)
    claim := format('SELECT f.%1$I::text AS key, to_jsonb(f) AS cur FROM %2$s f'
                    ' WHERE ($1 IS NULL OR f.%1$I > $1::%3$s) AND (%4$s)'
                    ' ORDER BY f.%1$I LIMIT $2 FOR UPDATE OF f SKIP LOCKED',
                    keycol, r.outputs[1], keytype, nulls_cond);
    claimed_keys := '{}';
    claimed_cur := '{}';
    FOR rec IN EXECUTE claim USING r.last_key, (o->>'chunk_rows')::int LOOP
        claimed_keys := claimed_keys || rec.key;
        claimed_cur := claimed_cur || rec.cur;
    END LOOP;
    IF pg_catalog.cardinality(claimed_keys) = 0 THEN
        RETURN 0;
    END IF;
    fetch_sql := format('SELECT COALESCE(pg_catalog.jsonb_object_agg(s.%1$I::text, pg_catalog.jsonb_build_array(%2$s, %3$s, %4$s)), ''{}'')'
                        ' FROM %5$s s WHERE s.%1$I OPERATOR(pg_catalog.=) ANY ($1::%6$s[])',
                        keycol, prompt_expr, compl_expr,
                        rbr.fold_name_sql(format('s.%I', o->>'response_type_column')),
                        r.source, keytype);
    EXECUTE fetch_sql INTO src USING claimed_keys;
    FOR k IN 1 .. pg_catalog.cardinality(claimed_keys) LOOP
        -- a row deleted from the source since the run began: nothing to grade
        CONTINUE WHEN NOT src ? claimed_keys[k];
        SELECT claimed_keys[k] AS key, claimed_cur[k] AS cur, NULLIF(src->claimed_keys[k]->0, 'null'::jsonb) AS prompt,
               src->claimed_keys[k]->>1 AS completion, src->claimed_keys[k]->>2 AS rt INTO rec;
        nrows := nrows + 1;
        keys := keys || rec.key;
        rts := rts || rec.rt;
        vals := vals || '{}'::jsonb;
        IF COALESCE(o->>'propositions', 'needed') = 'all' THEN
            needed := props;
        ELSE
            SELECT COALESCE(array_agg(x), '{}') INTO needed
              FROM jsonb_array_elements_text(info->'response_types'->rec.rt->'graded_propositions') x;
        END IF;
        FOREACH p IN ARRAY needed LOOP
            IF rec.cur->p <> 'null'::jsonb THEN
                CONTINUE;
            ELSIF rec.completion IS NULL OR rec.prompt IS NULL THEN
                -- recorded as an error with the reason, never silently skipped
                EXECUTE format('INSERT INTO %s AS t (%I, proposition, status, error, attempts, cached, graded_at)'
                               ' VALUES ($1::%s, $2, ''error'', $3, 0, false, clock_timestamp())'
                               ' ON CONFLICT (%I, proposition) DO UPDATE SET status = EXCLUDED.status,'
                               ' probability = NULL, error = EXCLUDED.error, graded_at = EXCLUDED.graded_at',
                               r.outputs[2], keycol, keytype, keycol)
                    USING rec.key, p,
                          format('cannot grade: the %s is NULL (column %I of %s)',
                                 CASE WHEN rec.prompt IS NULL THEN 'prompt' ELSE 'completion' END,
                                 CASE WHEN rec.prompt IS NULL THEN o->>'prompt_column' ELSE o->>'completion_column' END,
                                 r.source);
                n_err := n_err + 1;
            ELSE
                q_idx := q_idx || nrows;
                q_prop := q_prop || p;
                q_prompt := q_prompt || rec.prompt;
                q_compl := q_compl || rec.completion;
            END IF;
        END LOOP;
    END LOOP;
    IF nrows = 0 THEN
        PERFORM rbr.run_advance(featurize_chunk.run_id, 0, 0, 0, 0, 0, 0, 0, 0, NULL,
                                claimed_keys[pg_catalog.cardinality(claimed_keys)]);
        RETURN pg_catalog.cardinality(claimed_keys);
    END IF;

    -- a budget (max_requests, max_tokens): only the questions it still allows
    kept := rbr.featurize_budget(featurize_chunk.run_id, q_prop, q_prompt, q_compl);
    IF kept IS NOT NULL THEN
        q_idx := ARRAY(SELECT q_idx[x] FROM unnest(kept) x);
        q_prop := ARRAY(SELECT q_prop[x] FROM unnest(kept) x);
        q_prompt := ARRAY(SELECT q_prompt[x] FROM unnest(kept) x);
        q_compl := ARRAY(SELECT q_compl[x] FROM unnest(kept) x);
    END IF;

    -- ask the grader (cache first), then record every answer or error
    FOR g IN SELECT * FROM @extschema@.rbr_grade_many(r.policy, q_prop, q_prompt, q_compl) LOOP
        i := q_idx[g.ord];
        EXECUTE format('INSERT INTO %s AS t (%I, proposition, status, probability, method, yes_no_mass, model, error,'
                       ' attempts, prompt_tokens, completion_tokens, cached, graded_at, samples, cached_tokens,'
                       ' reasoning_tokens)'
                       ' VALUES ($1::%s, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, clock_timestamp(), $13, $14, $15)'
                       ' ON CONFLICT (%I, proposition) DO UPDATE SET status = EXCLUDED.status,'
                       ' probability = EXCLUDED.probability, method = EXCLUDED.method,'
                       ' yes_no_mass = EXCLUDED.yes_no_mass, model = EXCLUDED.model, error = EXCLUDED.error,'
                       ' attempts = t.attempts + EXCLUDED.attempts,'
                       ' prompt_tokens = COALESCE(t.prompt_tokens, 0) + COALESCE(EXCLUDED.prompt_tokens, 0),'
                       ' completion_tokens = COALESCE(t.completion_tokens, 0) + COALESCE(EXCLUDED.completion_tokens, 0),'
                       ' cached = EXCLUDED.cached, graded_at = EXCLUDED.graded_at, samples = EXCLUDED.samples,'
                       ' cached_tokens = COALESCE(t.cached_tokens, 0) + COALESCE(EXCLUDED.cached_tokens, 0),'
                       ' reasoning_tokens = COALESCE(t.reasoning_tokens, 0) + COALESCE(EXCLUDED.reasoning_tokens, 0)',
                       r.outputs[2], keycol, keytype, keycol)
            USING keys[i], g.proposition, g.status, g.probability, g.method, g.yes_no_mass, g.model, g.error,
                  g.attempts, g.prompt_tokens, g.completion_tokens, g.cached, g.samples, g.cached_tokens,
                  g.reasoning_tokens;
        IF g.status = 'ok' THEN
            vals[i] := vals[i] || jsonb_build_object(g.proposition, g.probability);
            n_ok := n_ok + 1;
        ELSE
            n_err := n_err + 1;
        END IF;
        n_cached := n_cached + (g.cached)::int;
        n_req := n_req + g.attempts;
        n_pt := n_pt + COALESCE(g.prompt_tokens, 0);
        n_ct := n_ct + COALESCE(g.completion_tokens, 0);
        n_cat := n_cat + COALESCE(g.cached_tokens, 0);
        n_rt := n_rt + COALESCE(g.reasoning_tokens, 0);
    END LOOP;

    -- values, then class probabilities of rows whose needed propositions are all graded
    SELECT string_agg(format('%1$I = COALESCE(f.%1$I, ($2->>%2$L)::float8)', x, x), ', ') INTO upd_props FROM unnest(props) x;
    SELECT string_agg(format('%1$I = ($2->>%2$L)::float8', x, x), ', ') INTO upd_classes FROM unnest(classes) x;
    FOR i IN 1 .. nrows LOOP
        rt := rts[i];
        EXECUTE format('UPDATE %s f SET rbr_response_type = $3, %s WHERE f.%I = $1::%s RETURNING to_jsonb(f)',
                       r.outputs[1], upd_props, keycol, keytype)
            INTO cur USING keys[i], vals[i], rt;
        IF rt IS NULL OR NOT (info->'response_types') ? rt THEN
            CONTINUE;
        END IF;
        SELECT array_agg(x) INTO needed FROM jsonb_array_elements_text(info->'response_types'->rt->'propositions') x;
        SELECT jsonb_object_agg(x, cur->x) INTO probs FROM unnest(needed) x WHERE cur->x <> 'null'::jsonb;
        IF COALESCE(array_length(needed, 1), 0) = (SELECT count(*) FROM jsonb_object_keys(COALESCE(probs, '{}')))
        THEN
            cp := @extschema@.rbr_class_probs(r.policy, rt, COALESCE(probs, '{}'), o->>'class_mode');
            EXECUTE format('UPDATE %s f SET %s WHERE f.%I = $1::%s', r.outputs[1], upd_classes, keycol, keytype)
                USING keys[i], cp;
        END IF;
    END LOOP;

    r := rbr.run_advance(featurize_chunk.run_id, n_ok, n_err, n_cached, n_req, n_pt, n_ct, n_cat, n_rt, NULL,
                         claimed_keys[pg_catalog.cardinality(claimed_keys)]);
    elapsed := greatest(extract(epoch FROM r.updated_at - r.started_at), 0.001);
    rate := (r.done + r.errors) / elapsed;
    remaining := greatest(r.total - r.done - r.errors, 0);
    RAISE NOTICE 'rbr_featurize %: % of % values processed (done %, errors %, cached %), % values/s, ETA %',
        r.source, r.done + r.errors, r.total, r.done, r.errors, r.cached,
        round(rate::numeric, 1),
        CASE WHEN rate > 0 THEN make_interval(secs => round(remaining / rate)) END;
    RETURN pg_catalog.cardinality(claimed_keys);
END
$$;

CREATE OR REPLACE PROCEDURE @extschema@.rbr_featurize(source regclass, policy text, options jsonb DEFAULT '{}')
    LANGUAGE plpgsql
    AS $$
DECLARE
    run bigint;
BEGIN
    -- {"dry_run": true}: what the call would send, reported; nothing sent or written
    IF rbr.cost_dry_run(options) THEN
        PERFORM rbr.featurize_dry_run(source, policy, options);
        RETURN;
    END IF;
    PERFORM rbr.featurize_check_transaction();
    run := rbr.featurize_start(source, policy, options);
    COMMIT;
    -- no SET search_path here (a procedure with one cannot COMMIT): every
    -- name is qualified
    IF rbr.batch_mode(run) THEN
        CALL rbr.batch_drive(run);
    ELSE
        CALL rbr.run_drive(run);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION rbr.synth_chunk(run_id bigint) RETURNS int
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    r rbr.run;
    info jsonb;
    o jsonb;
    keycol text;
    keytype text;
    prompt_expr text;
    ptype text;
    rec record;
    g record;
    keys text[] := '{}';
    slots int[] := '{}';
    rts text[] := '{}';
    prompts jsonb[] := '{}';
    instrs text[] := '{}';
    intended text[] := '{}';
    traits jsonb[] := '{}';
    cands int[] := '{}';
    nattempt int[] := '{}';
    open_ boolean[] := '{}';
    nslots int := 0;
    max_att int;
    seed int;
    -- one round
    idx int[];
    gen_ok int[];
    gen_text text[];
    gen_finish text[];
    gen_model text[];
    gen_att int[];
    gen_cached boolean[];
    gen_pt int[];
    gen_ct int[];
    q_cand int[];
    q_prop text[];
    q_prompt jsonb[];
    q_compl text[];
    probs jsonb[];
    grade_err text[];
    got int[];
    asked int[];
    i int;
    k int;
    p text;
    props text[];
    cls text;
    cp jsonb;
    failed jsonb;
    outcome text;
    reason text;
    n_acc bigint := 0;
    n_gave bigint := 0;
    n_err bigint := 0;
    n_cand bigint := 0;
    n_rej bigint := 0;
    n_genreq bigint := 0;
    n_gencached bigint := 0;
    n_grreq bigint := 0;
    n_grcached bigint := 0;
    n_pt bigint := 0;
    n_ct bigint := 0;
    n_cat bigint := 0;
    n_rt bigint := 0;
    elapsed float8;
    rate float8;
    done_ bigint;
    kept int[];
BEGIN
    r := rbr.run_get(synth_chunk.run_id);
    o := r.options;
    -- names and types from the catalogs, on every use
    SELECT k.keycol, k.keytype INTO keycol, keytype FROM rbr.run_source_key(r.source) k;
    max_att := (o->>'max_attempts')::int;
    seed := (o->>'seed')::int;
    info := @extschema@.rbr_policy_info(r.policy);
    SELECT format_type(a.atttypid, NULL) INTO ptype FROM pg_attribute a
     WHERE a.attrelid = r.source AND a.attname = o->>'prompt_column' AND NOT a.attisdropped;
    prompt_expr := CASE WHEN ptype IN ('jsonb', 'json') THEN format('s.%I::jsonb', o->>'prompt_column')
                        ELSE format('to_jsonb(s.%I::text)', o->>'prompt_column') END;

    FOR rec IN EXECUTE format(
        'SELECT t.%1$I::text AS key, t.slot, t.response_type, t.intended_class, t.traits, t.instruction,'
        ' t.candidates, %2$s AS prompt,'
        ' (SELECT COALESCE(max(a.attempt), 0) FROM %5$s a WHERE a.%1$I = t.%1$I AND a.slot = t.slot) AS nattempt'
        ' FROM %3$s t JOIN %4$s s ON s.%1$I = t.%1$I'
        ' WHERE t.status = ''pending'' AND ($2::text IS NULL OR (t.%1$I, t.slot) > ($3::%6$s, $4))'
        ' ORDER BY t.%1$I, t.slot LIMIT $1 FOR UPDATE OF t SKIP LOCKED',
        keycol, prompt_expr, r.outputs[1], r.source, r.outputs[2], keytype)
        USING (o->>'chunk_slots')::int, r.last_key,
              substr(r.last_key, strpos(r.last_key, ':') + 1), split_part(r.last_key, ':', 1)::int
    LOOP
        nslots := nslots + 1;
        keys := keys || rec.key;
        slots := slots || rec.slot;
        rts := rts || rec.response_type;
        prompts := prompts || rec.prompt;
        instrs := instrs || rec.instruction;
        intended := intended || rec.intended_class;
        traits := traits || rec.traits;
        cands := cands || rec.candidates;
        nattempt := nattempt || rec.nattempt;
        open_ := open_ || (rec.prompt IS NOT NULL);
    END LOOP;
    IF nslots = 0 THEN
        RETURN 0;
    END IF;

    LOOP
        -- generate one candidate per open slot; sample = seed, slot, candidate number
        SELECT COALESCE(array_agg(s ORDER BY s), '{}') INTO idx FROM generate_subscripts(keys, 1) s WHERE open_[s];
        EXIT WHEN cardinality(idx) = 0;
        -- a budget (max_requests, max_tokens): only the slots it still allows; the others stay pending
        kept := rbr.synth_budget(synth_chunk.run_id, n_genreq + n_grreq, n_pt + n_ct,
                    ARRAY(SELECT prompts[s] FROM unnest(idx) s), ARRAY(SELECT instrs[s] FROM unnest(idx) s),
                    ARRAY(SELECT seed * 1000000 + slots[s] * 1000 + cands[s] FROM unnest(idx) s),
                    ARRAY(SELECT rts[s] FROM unnest(idx) s));
        IF kept IS NOT NULL THEN
            FOR k IN 1 .. cardinality(idx) LOOP
                open_[idx[k]] := k = ANY (kept);
            END LOOP;
            idx := ARRAY(SELECT idx[x] FROM unnest(kept) x);
            EXIT WHEN cardinality(idx) = 0;
        END IF;
        gen_text := array_fill(NULL::text, ARRAY[nslots]);
        gen_finish := array_fill(NULL::text, ARRAY[nslots]);
        gen_model := array_fill(NULL::text, ARRAY[nslots]);
        gen_att := array_fill(NULL::int, ARRAY[nslots]);
        gen_cached := array_fill(NULL::boolean, ARRAY[nslots]);
        gen_pt := array_fill(NULL::int, ARRAY[nslots]);
        gen_ct := array_fill(NULL::int, ARRAY[nslots]);
        probs := array_fill(NULL::jsonb, ARRAY[nslots]);
        grade_err := array_fill(NULL::text, ARRAY[nslots]);
        got := array_fill(0, ARRAY[nslots]);
        asked := array_fill(-1, ARRAY[nslots]);
        q_cand := '{}'; q_prop := '{}'; q_prompt := '{}'; q_compl := '{}';
        FOR g IN SELECT * FROM @extschema@.rbr_generate_many(
                    (SELECT array_agg(prompts[s] ORDER BY n) FROM unnest(idx) WITH ORDINALITY u(s, n)),
                    (SELECT array_agg(instrs[s] ORDER BY n) FROM unnest(idx) WITH ORDINALITY u(s, n)),
                    (SELECT array_agg(seed * 1000000 + slots[s] * 1000 + cands[s] ORDER BY n)
                       FROM unnest(idx) WITH ORDINALITY u(s, n)))
        LOOP
            i := idx[g.ord];
            asked[i] := 0;
            n_cand := n_cand + 1;
            n_genreq := n_genreq + g.attempts;
            n_gencached := n_gencached + g.cached::int;
            n_pt := n_pt + COALESCE(g.prompt_tokens, 0);
            n_ct := n_ct + COALESCE(g.completion_tokens, 0);
            nattempt[i] := nattempt[i] + 1;
            IF g.status <> 'ok' THEN
                EXECUTE format('INSERT INTO %s (%I, slot, attempt, sample, outcome, reason, intended_class,'
                               ' generator_attempts, generator_cached, created_at)'
                               ' VALUES ($1::%s, $2, $3, $4, ''generator_error'', $5, $6, $7, false, clock_timestamp())',
                               r.outputs[2], keycol, keytype)
                    USING keys[i], slots[i], nattempt[i], seed * 1000000 + slots[i] * 1000 + cands[i], g.error,
                          intended[i], g.attempts;
                EXECUTE format('UPDATE %s SET status = ''error'', updated_at = clock_timestamp()'
                               ' WHERE %I = $1::%s AND slot = $2', r.outputs[1], keycol, keytype)
                    USING keys[i], slots[i];
                open_[i] := false;
                n_err := n_err + 1;
                CONTINUE;
            END IF;
            gen_text[i] := g.completion;
            gen_finish[i] := g.finish_reason;
            gen_model[i] := g.model;
            gen_att[i] := g.attempts;
            gen_cached[i] := g.cached;
            gen_pt[i] := g.prompt_tokens;
            gen_ct[i] := g.completion_tokens;
            IF g.finish_reason IS NULL OR g.finish_reason = 'stop' THEN
                SELECT array_agg(x) INTO props
                  FROM jsonb_array_elements_text(info->'response_types'->rts[i]->'graded_propositions') x;
                asked[i] := cardinality(props);
                FOREACH p IN ARRAY props LOOP
                    q_cand := q_cand || i;
                    q_prop := q_prop || p;
                    q_prompt := q_prompt || prompts[i];
                    q_compl := q_compl || g.completion;
                END LOOP;
                probs[i] := '{}';
            END IF;
        END LOOP;

        -- grade every candidate that ended normally
        IF cardinality(q_cand) > 0 THEN
            FOR g IN SELECT * FROM @extschema@.rbr_grade_many(r.policy, q_prop, q_prompt, q_compl) LOOP
                i := q_cand[g.ord];
                got[i] := got[i] + 1;
                n_grreq := n_grreq + g.attempts;
                n_grcached := n_grcached + g.cached::int;
                n_pt := n_pt + COALESCE(g.prompt_tokens, 0);
                n_ct := n_ct + COALESCE(g.completion_tokens, 0);
                n_cat := n_cat + COALESCE(g.cached_tokens, 0);
                n_rt := n_rt + COALESCE(g.reasoning_tokens, 0);
                IF g.status = 'ok' THEN
                    probs[i] := probs[i] || jsonb_build_object(g.proposition, g.probability);
                ELSIF grade_err[i] IS NULL THEN
                    grade_err[i] := format('grading %s: %s', g.proposition, g.error);
                END IF;
            END LOOP;
        END IF;

        -- batch mode: a slot whose generation or grades are in flight waits for a later pass
        FOREACH i IN ARRAY idx LOOP
            IF asked[i] < 0 OR (asked[i] > 0 AND got[i] < asked[i]) THEN
                open_[i] := false;
                n_cand := n_cand - (asked[i] >= 0)::int;
            END IF;
        END LOOP;

        -- decide per candidate
        FOREACH i IN ARRAY idx LOOP
            CONTINUE WHEN NOT open_[i];
            cls := NULL; cp := NULL; failed := NULL; reason := NULL;
            IF gen_finish[i] IS NOT NULL AND gen_finish[i] <> 'stop' THEN
                outcome := 'rejected';
                reason := format('finish_reason %s', gen_finish[i]);
            ELSIF grade_err[i] IS NOT NULL THEN
                outcome := 'grader_error';
                reason := grade_err[i];
            ELSE
                cp := @extschema@.rbr_class_probs(r.policy, rts[i], probs[i], o->>'class_mode');
                IF o->>'verify' = 'hard' THEN
                    BEGIN
                        cls := @extschema@.rbr_classify(r.policy, rts[i], @extschema@.rbr_binarize(probs[i]));
                    EXCEPTION WHEN invalid_parameter_value OR data_exception THEN
                        cls := NULL;
                    END;
                ELSE
                    SELECT e.key INTO cls FROM jsonb_each(cp) e
                      JOIN jsonb_array_elements_text(info->'classes') WITH ORDINALITY c(name, n) ON c.name = e.key
                     ORDER BY e.value::text::float8 DESC, c.n LIMIT 1;
                END IF;
                SELECT jsonb_object_agg(t.key, jsonb_build_object('wanted', t.value, 'p', probs[i]->t.key)) INTO failed
                  FROM jsonb_each(traits[i]) t
                 WHERE ((probs[i]->>t.key)::float8 > 0.5) <> t.value::boolean;
                IF cls IS NOT DISTINCT FROM intended[i] THEN
                    outcome := 'accepted';
                ELSE
                    outcome := 'rejected';
                    reason := format('intended %s, graded %s%s', intended[i], COALESCE(cls, '(no single class)'),
                                     CASE WHEN failed IS NOT NULL THEN '; traits missed: ' ||
                                          (SELECT string_agg(k2, ', ' ORDER BY k2) FROM jsonb_object_keys(failed) k2)
                                          ELSE '' END);
                END IF;
            END IF;
            EXECUTE format('INSERT INTO %s (%I, slot, attempt, sample, outcome, reason, intended_class, graded_class,'
                           ' failed, completion, finish_reason, probs, generator_attempts, generator_cached,'
                           ' prompt_tokens, completion_tokens, created_at)'
                           ' VALUES ($1::%s, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, clock_timestamp())',
                           r.outputs[2], keycol, keytype)
                USING keys[i], slots[i], nattempt[i], seed * 1000000 + slots[i] * 1000 + cands[i], outcome, reason,
                      intended[i], cls, failed, gen_text[i], gen_finish[i], probs[i], gen_att[i],
                      gen_cached[i], gen_pt[i], gen_ct[i];
            IF outcome = 'accepted' THEN
                EXECUTE format('UPDATE %s SET status = ''accepted'', completion = $3, sample = $4, graded_class = $5,'
                               ' probs = $6, class_probs = $7, features = @extschema@.rbr_features($8, response_type, $6, $9),'
                               ' candidates = candidates + 1, generator_model = $10, finish_reason = $11,'
                               ' updated_at = clock_timestamp() WHERE %I = $1::%s AND slot = $2',
                               r.outputs[1], keycol, keytype)
                    USING keys[i], slots[i], gen_text[i], seed * 1000000 + slots[i] * 1000 + cands[i], cls, probs[i], cp,
                          r.policy, o->>'class_mode', gen_model[i], gen_finish[i];
                open_[i] := false;
                n_acc := n_acc + 1;
            ELSIF outcome = 'grader_error' THEN
                EXECUTE format('UPDATE %s SET status = ''error'', updated_at = clock_timestamp()'
                               ' WHERE %I = $1::%s AND slot = $2', r.outputs[1], keycol, keytype)
                    USING keys[i], slots[i];
                open_[i] := false;
                n_err := n_err + 1;
            ELSE
                n_rej := n_rej + 1;
                cands[i] := cands[i] + 1;
                EXECUTE format('UPDATE %s SET candidates = $3, status = CASE WHEN $3 >= $4 THEN ''rejected'' ELSE status END,'
                               ' updated_at = clock_timestamp() WHERE %I = $1::%s AND slot = $2',
                               r.outputs[1], keycol, keytype)
                    USING keys[i], slots[i], cands[i], max_att;
                IF cands[i] >= max_att THEN
                    open_[i] := false;
                    n_gave := n_gave + 1;
                END IF;
            END IF;
        END LOOP;
    END LOOP;

    r := rbr.run_advance(synth_chunk.run_id, n_acc, n_err, n_gencached, n_genreq + n_grreq, n_pt, n_ct, n_cat, n_rt,
                         jsonb_build_object('gave_up', n_gave, 'candidates', n_cand, 'rejections', n_rej,
                                            'generator_requests', n_genreq, 'generator_cached', n_gencached,
                                            'grader_requests', n_grreq, 'grader_cached', n_grcached),
                         -- batch mode: the next chunk starts after this one's last slot
                         CASE WHEN o->>'mode' = 'batch'
                              THEN slots[nslots]::text || ':' || keys[nslots] END);
    done_ := r.done + (r.counters->>'gave_up')::bigint + r.errors;
    elapsed := greatest(extract(epoch FROM r.updated_at - r.started_at), 0.001);
    rate := done_ / elapsed;
    RAISE NOTICE 'rbr_synthesize %: % of % slots processed (accepted %, gave up %, errors %; % candidates, % rejected), ETA %',
        r.source, done_, r.total, r.done, r.counters->>'gave_up', r.errors, r.counters->>'candidates',
        r.counters->>'rejections',
        CASE WHEN rate > 0 THEN make_interval(secs => round(greatest(r.total - done_, 0) / rate)) END;
    RETURN nslots;
END
$$;

CREATE OR REPLACE FUNCTION rbr.synth_start(source regclass, policy text, options jsonb) RETURNS bigint
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    info jsonb;
    polref text;
    nsp name;
    rel name;
    keycol name;
    keytype text;
    pcol text := COALESCE(options->>'prompt_column', 'prompt');
    rcol text := COALESCE(options->>'response_type_column', 'response_type');
    mode text := COALESCE(options->>'class_mode', 'product');
    verify text := COALESCE(options->>'verify', 'argmax');
    labels jsonb := COALESCE(options->'labels', '{}');
    n_ideal int;
    n_flawed int;
    n_disallowed int;
    max_att int;
    chunk int;
    seed int;
    rt_expr text;
    stab text;
    atab text;
    col text;
    t text;
    bad text;
    unknown_rt bigint;
    total bigint;
    run bigint;
BEGIN
    IF source IS NULL OR policy IS NULL OR options IS NULL THEN
        RAISE EXCEPTION 'rbr_synthesize() arguments must not be NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- every privilege the run needs, checked before anything is created, so that a role
    -- without the capability gets one error saying how to get it
    IF NOT (has_function_privilege('@extschema@.rbr_generate_many(jsonb[], text[], int[])', 'EXECUTE')
            AND has_function_privilege('@extschema@.rbr_grade_many(text, text[], jsonb[], text[])', 'EXECUTE')
            AND has_function_privilege('rbr.synth_chunk(bigint)', 'EXECUTE')
            AND has_function_privilege('rbr.run_begin(text, regclass, regclass[], text, jsonb, bigint)', 'EXECUTE')) THEN
        RAISE EXCEPTION 'permission denied to run rbr_synthesize: role % lacks the synthesize capability', current_user
            USING ERRCODE = 'insufficient_privilege',
                  HINT = format('A superuser grants it with SELECT rbr_grant(%L, ''synthesize'');', current_user);
    END IF;
    IF jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'options must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(k, ', ') INTO bad FROM jsonb_object_keys(options) k
     WHERE k NOT IN ('prompt_column', 'response_type_column', 'ideal', 'flawed', 'disallowed', 'max_attempts',
                     'chunk_slots', 'verify', 'class_mode', 'seed', 'labels', 'dry_run', 'max_requests', 'max_tokens',
                     'mode', 'wait', 'poll_seconds');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown rbr_synthesize option(s): %', bad USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Known options: prompt_column, response_type_column, ideal, flawed, disallowed, max_attempts, chunk_slots, verify, class_mode, seed, labels, dry_run, max_requests, max_tokens, mode, wait, poll_seconds.';
    END IF;
    PERFORM rbr.cost_check_options(options);
    PERFORM rbr.batch_options(options);
    n_ideal := rbr.synth_int_option(options, 'ideal', 1, 0, 100);
    n_flawed := rbr.synth_int_option(options, 'flawed', 3, 0, 100);
    n_disallowed := rbr.synth_int_option(options, 'disallowed', 1, 0, 100);
    max_att := rbr.synth_int_option(options, 'max_attempts', 3, 1, 100);
    chunk := rbr.synth_int_option(options, 'chunk_slots', 16, 1, 10000);
    seed := rbr.synth_int_option(options, 'seed', 0, 0, 999);
    IF n_ideal + n_flawed + n_disallowed = 0 THEN
        RAISE EXCEPTION 'nothing to generate: ideal, flawed and disallowed are all 0' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF n_ideal + n_flawed + n_disallowed > 200 THEN
        RAISE EXCEPTION 'at most 200 completions per prompt (ideal + flawed + disallowed)' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF verify NOT IN ('argmax', 'hard') THEN
        RAISE EXCEPTION 'verify must be ''argmax'' or ''hard''' USING ERRCODE = 'invalid_parameter_value',
            HINT = '''argmax'': the class of highest probability; ''hard'': the class of the labels P(yes) > 0.5.';
    END IF;
    IF mode NOT IN ('product', 'exact') THEN
        RAISE EXCEPTION 'class_mode must be ''product'' or ''exact''' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF jsonb_typeof(labels) <> 'object'
       OR EXISTS (SELECT 1 FROM jsonb_each(labels) e WHERE jsonb_typeof(e.value) <> 'string') THEN
        RAISE EXCEPTION 'labels must be an object {"class": "label", ...}' USING ERRCODE = 'invalid_parameter_value';
    END IF;

    info := @extschema@.rbr_policy_info(policy);
    polref := (info->>'name') || '@' || (info->>'version');
    SELECT string_agg(k, ', ') INTO bad FROM jsonb_object_keys(labels) k WHERE NOT (info->'classes') ? k;
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'labels names unknown class(es): %', bad USING ERRCODE = 'invalid_parameter_value';
    END IF;

    SELECT * INTO nsp, rel, keycol, keytype
      FROM rbr.check_source(source, 'rbr_synthesize', rcol, ARRAY[pcol],
           'Name the columns with options {"prompt_column": ..., "response_type_column": ...}.',
           'prompt: jsonb messages or text; response_type: text.');
    IF length(rel) > 63 - length('_synth_attempts') THEN
        RAISE EXCEPTION 'table name % is too long to derive %_synth_attempts', rel, rel USING ERRCODE = 'name_too_long';
    END IF;
    stab := format('%I.%I', nsp, rel || '_synth');
    atab := format('%I.%I', nsp, rel || '_synth_attempts');

    -- one set-up at a time per source table
    PERFORM pg_advisory_xact_lock(hashtext('rbr.synthesize'), source::oid::int);
    PERFORM rbr.check_own_table(stab, 'rbr_synthesize');
    PERFORM rbr.check_own_table(atab, 'rbr_synthesize');
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (
        %I %s NOT NULL,
        slot int NOT NULL,
        kind text NOT NULL CHECK (kind IN (''ideal'', ''flawed'', ''disallowed'')),
        flaw text,
        response_type text NOT NULL,
        intended_class text NOT NULL,
        label text NOT NULL,
        tier int NOT NULL,
        traits jsonb NOT NULL,
        instruction text NOT NULL,
        status text NOT NULL DEFAULT ''pending'' CHECK (status IN (''pending'', ''accepted'', ''rejected'', ''error'')),
        completion text,
        sample int,
        graded_class text,
        probs jsonb,
        class_probs jsonb,
        features float8[],
        candidates int NOT NULL DEFAULT 0,
        generator_model text,
        finish_reason text,
        updated_at timestamptz,
        PRIMARY KEY (%I, slot),
        CHECK ((status = ''accepted'') = (completion IS NOT NULL)))', stab, keycol, keytype, keycol);
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (
        %I %s NOT NULL,
        slot int NOT NULL,
        attempt int NOT NULL,
        sample int NOT NULL,
        outcome text NOT NULL CHECK (outcome IN (''accepted'', ''rejected'', ''generator_error'', ''grader_error'')),
        reason text,
        intended_class text NOT NULL,
        graded_class text,
        failed jsonb,
        completion text,
        finish_reason text,
        probs jsonb,
        generator_attempts int,
        generator_cached boolean,
        prompt_tokens int,
        completion_tokens int,
        created_at timestamptz NOT NULL,
        PRIMARY KEY (%I, slot, attempt))', atab, keycol, keytype, keycol);

    -- the planned slots of every row whose response type the policy knows
    rt_expr := rbr.fold_name_sql(format('s.%I', rcol));
    EXECUTE format('SELECT count(*) FROM %s s WHERE %s IS NULL OR NOT ($1 ? %s)', source, rt_expr, rt_expr)
        INTO unknown_rt USING info->'response_types';
    IF unknown_rt > 0 THEN
        RAISE WARNING 'rbr_synthesize %: % row(s) have no response type of policy %; nothing is generated for them',
            source, unknown_rt, polref
            USING HINT = format('Its response types are %s.',
                                (SELECT string_agg(k, ', ' ORDER BY k) FROM jsonb_object_keys(info->'response_types') k));
    END IF;
    EXECUTE format('INSERT INTO %1$s (%2$I, slot, kind, flaw, response_type, intended_class, label, tier, traits, instruction)
        SELECT s.%2$I, p.slot, p.kind, p.flaw, s.rt, p.intended_class,
               COALESCE($3->>p.intended_class, p.intended_class),
               @extschema@.rbr_label_tier($2, s.rt, COALESCE($3->>p.intended_class, p.intended_class)),
               p.traits, p.instruction
          FROM (SELECT s.%2$I, %3$s AS rt FROM %4$s s) s,
               LATERAL @extschema@.rbr_synth_plan($2, s.rt, $4, $5, $6, s.%2$I::text || '':'' || $7) p
         WHERE $1 ? s.rt
        ON CONFLICT DO NOTHING', stab, keycol, rt_expr, source)
        USING info->'response_types', polref, labels, n_ideal, n_flawed, n_disallowed, seed::text;
    -- slots a generator or grader error ended are tried again
    EXECUTE format('UPDATE %s SET status = ''pending'' WHERE status = ''error''', stab);
    EXECUTE format('SELECT count(*) FROM %s WHERE status = ''pending''', stab) INTO total;

    RETURN rbr.run_begin('synthesize', source, ARRAY[stab::regclass, atab::regclass], polref,
                         jsonb_build_object('prompt_column', pcol, 'response_type_column', rcol,
                                            'ideal', n_ideal, 'flawed', n_flawed, 'disallowed', n_disallowed,
                                            'max_attempts', max_att, 'chunk_slots', chunk, 'verify', verify,
                                            'class_mode', mode, 'seed', seed, 'labels', labels)
                         || rbr.cost_run_options(options) || rbr.batch_options(options),
                         total);
END
$$;

CREATE OR REPLACE PROCEDURE @extschema@.rbr_synthesize(source regclass, policy text, options jsonb DEFAULT '{}')
    LANGUAGE plpgsql
    AS $$
DECLARE
    run bigint;
BEGIN
    -- {"dry_run": true}: what the call would send, reported; nothing sent or written
    IF rbr.cost_dry_run(options) THEN
        PERFORM rbr.synth_dry_run(source, policy, options);
        RETURN;
    END IF;
    PERFORM rbr.featurize_check_transaction('rbr_synthesize');
    run := rbr.synth_start(source, policy, options);
    COMMIT;
    -- no SET search_path here (a procedure with one cannot COMMIT): every
    -- name is qualified
    IF rbr.batch_mode(run) THEN
        CALL rbr.batch_drive(run);
    ELSE
        CALL rbr.run_drive(run);
    END IF;
END
$$;

-- A dry run ({"dry_run": true}) reports what a call would send without
-- sending anything or writing any table; a budget ({"max_requests": N},
-- {"max_tokens": N}) ends a call before it would pass N requests or N
-- (prompt + completion) tokens, counted over that call, with state
-- 'stopped' and the reason in rbr.run_progress: CALL again with a larger
-- budget to go on (only missing values are graded). Both count a question
-- as free when rbr_grade_many would not send it (cached, or asked earlier in
-- the same batch) and estimate tokens from the very request bodies rbr
-- would send (src/cost.c: characters of the messages' text / 4, rounded up,
-- + 3 per message + 3 per request; completion tokens: the upper bound
-- rbr.grader_max_answer_tokens per answer).

-- Per question of a batch: free (cached or a repeat), the requests it would
-- send and their estimated tokens. Sends nothing.
CREATE FUNCTION rbr.grade_plan(policy text, propositions text[], prompts jsonb[], completions text[],
    OUT ord int, OUT free boolean, OUT requests int, OUT prompt_tokens int, OUT completion_tokens int)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_grade_plan'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
REVOKE EXECUTE ON FUNCTION rbr.grade_plan(text, text[], jsonb[], text[]) FROM PUBLIC;

-- Mark a run of the caller's stopped, with the reason; returns the row.
CREATE FUNCTION rbr.run_stop(run_id bigint, reason text) RETURNS rbr.run
    AS 'MODULE_PATHNAME', 'rbr_run_stop'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;

-- Whether a run of the caller's was stopped (at a budget).
CREATE FUNCTION rbr.run_stopped(run bigint) RETURNS boolean
    LANGUAGE sql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT (rbr.run_get(run)).state = 'stopped'
$$;

-- The WARNING that ends a stopped run: where it stopped, how to go on.
CREATE FUNCTION rbr.run_stopped_report(run bigint) RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    r rbr.run := rbr.run_get(run);
    proc text := CASE WHEN r.kind = 'featurize' THEN 'rbr_featurize' ELSE 'rbr_synthesize' END;
BEGIN
    RAISE WARNING '% %: stopped at the budget: %; % of % % processed, % requests, % prompt + % completion tokens',
                  proc, r.source, r.stop_reason, r.done + r.errors, r.total,
                  CASE WHEN r.kind = 'featurize' THEN 'values' ELSE 'slots' END,
                  r.requests, r.prompt_tokens, r.completion_tokens
        USING DETAIL = format('Run %s, state ''stopped'' in rbr.run_progress.', r.run_id),
              HINT = format('CALL %s again with a larger max_requests / max_tokens (or none): only what is still missing is sent. See what is left with {"dry_run": true}.', proc);
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.run_stop(bigint, text), rbr.run_stopped(bigint),
                           rbr.run_stopped_report(bigint) FROM PUBLIC;

-- Check the cost options of a bulk call: dry_run a boolean, max_requests
-- and max_tokens whole numbers >= 0.
CREATE FUNCTION rbr.cost_check_options(options jsonb) RETURNS void
    LANGUAGE plpgsql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    k text;
BEGIN
    IF options ? 'dry_run' AND jsonb_typeof(options->'dry_run') <> 'boolean' THEN
        RAISE EXCEPTION 'dry_run must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH k IN ARRAY ARRAY['max_requests', 'max_tokens'] LOOP
        IF options ? k AND (jsonb_typeof(options->k) <> 'number' OR (options->>k)::numeric < 0
                            OR (options->>k)::numeric <> trunc((options->>k)::numeric)
                            OR (options->>k)::numeric > 9e18) THEN
            RAISE EXCEPTION '% must be a whole number >= 0', k USING ERRCODE = 'invalid_parameter_value',
                HINT = 'A budget counts the requests (max_requests) or prompt + completion tokens (max_tokens) of one call.';
        END IF;
    END LOOP;
END
$$;

-- The budget options a run keeps (in rbr.run.options).
CREATE FUNCTION rbr.cost_run_options(options jsonb) RETURNS jsonb
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT COALESCE(jsonb_object_agg(k, options->k), '{}') FROM unnest(ARRAY['max_requests', 'max_tokens']) k
     WHERE options ? k
$$;

-- Whether the options ask for a dry run.
CREATE FUNCTION rbr.cost_dry_run(options jsonb) RETURNS boolean
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT COALESCE(jsonb_typeof(options) = 'object' AND options->'dry_run' = 'true'::jsonb, false)
$$;

-- The questions of one chunk of a run that its budget still allows, as
-- positions into the arrays (NULL: the run has no budget). When some are
-- left out the run is marked stopped with the reason.
CREATE FUNCTION rbr.featurize_budget(run_id bigint, propositions text[], prompts jsonb[], completions text[])
    RETURNS int[]
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    r rbr.run := rbr.run_get(featurize_budget.run_id);
    max_req bigint := (r.options->>'max_requests')::bigint;
    max_tok bigint := (r.options->>'max_tokens')::bigint;
    req bigint := r.requests;
    tok bigint := r.prompt_tokens + r.completion_tokens;
    kept int[] := '{}';
    left_out bigint := 0;
    pl record;
BEGIN
    IF max_req IS NULL AND max_tok IS NULL THEN
        RETURN NULL;
    END IF;
    FOR pl IN SELECT * FROM rbr.grade_plan(r.policy, propositions, prompts, completions) p ORDER BY p.ord LOOP
        IF (max_req IS NULL OR req + pl.requests <= max_req)
           AND (max_tok IS NULL OR tok + pl.prompt_tokens + pl.completion_tokens <= max_tok) THEN
            kept := kept || pl.ord;
            req := req + pl.requests;
            tok := tok + pl.prompt_tokens + pl.completion_tokens;
        ELSE
            left_out := left_out + 1;
        END IF;
    END LOOP;
    IF left_out > 0 THEN
        PERFORM rbr.run_stop(featurize_budget.run_id,
            concat_ws(' and ',
                      CASE WHEN max_req IS NOT NULL THEN format('max_requests %s', max_req) END,
                      CASE WHEN max_tok IS NOT NULL THEN format('max_tokens %s', max_tok) END)
            || format(' reached before %s more question(s)', left_out));
    END IF;
    RETURN kept;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.featurize_budget(bigint, text[], jsonb[], text[]) FROM PUBLIC;

-- What CALL rbr_featurize(source, policy, options) would do now, without
-- sending anything or writing any table: the needed values missing, how
-- many of them the cache (or an identical question) answers, how many
-- cannot be graded (NULL prompt or completion: they become errors), the
-- requests it would send and their estimated prompt tokens and (at most)
-- completion tokens, with the grader settings in force. Retries are not
-- foreseen.
CREATE FUNCTION @extschema@.rbr_featurize_estimate(source regclass, policy text, options jsonb DEFAULT '{}',
    OUT missing bigint, OUT cached bigint, OUT not_gradable bigint, OUT requests bigint,
    OUT prompt_tokens bigint, OUT completion_tokens bigint)
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    info jsonb;
    nsp name;
    rel name;
    keycol name;
    keytype text;
    pcol text := COALESCE(options->>'prompt_column', 'prompt');
    ccol text := COALESCE(options->>'completion_column', 'completion');
    rcol text := COALESCE(options->>'response_type_column', 'response_type');
    which text := COALESCE(options->>'propositions', 'needed');
    bad text;
    ftab text;
    ptype text;
    ctype text;
    prompt_expr text;
    compl_expr text;
    q text;
    rec record;
    pl record;
    b_prop text[] := '{}';
    b_prompt jsonb[] := '{}';
    b_compl text[] := '{}';
    n_send bigint := 0;
BEGIN
    IF source IS NULL OR policy IS NULL OR options IS NULL OR jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'rbr_featurize_estimate() needs a source, a policy and an options object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the options of rbr_featurize (those of batch mode do not change the counts)
    SELECT string_agg(k, ', ') INTO bad FROM jsonb_object_keys(options) k
     WHERE k NOT IN ('prompt_column', 'completion_column', 'response_type_column', 'chunk_rows', 'class_mode',
                     'propositions', 'dry_run', 'max_requests', 'max_tokens', 'mode', 'wait');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown rbr_featurize option(s): %', bad USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF which NOT IN ('needed', 'all') THEN
        RAISE EXCEPTION 'propositions must be ''needed'' or ''all''' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM rbr.cost_check_options(options);
    info := @extschema@.rbr_policy_info(policy);
    SELECT * INTO nsp, rel, keycol, keytype
      FROM rbr.check_source(source, 'rbr_featurize', rcol, ARRAY[pcol, ccol],
           'Name the columns with options {"prompt_column": ..., "completion_column": ..., "response_type_column": ...}.',
           'prompt: jsonb messages or text; completion: text or jsonb messages; response_type: text.');
    ftab := format('%I.%I', nsp, rel || '_features');
    PERFORM rbr.check_own_table(ftab, 'rbr_featurize');

    -- the values a run would grade, read as featurize_chunk reads them
    SELECT format_type(a.atttypid, NULL) INTO ptype FROM pg_attribute a
     WHERE a.attrelid = source AND a.attname = pcol AND NOT a.attisdropped;
    SELECT format_type(a.atttypid, NULL) INTO ctype FROM pg_attribute a
     WHERE a.attrelid = source AND a.attname = ccol AND NOT a.attisdropped;
    prompt_expr := CASE WHEN ptype IN ('jsonb', 'json') THEN format('s.%I::jsonb', pcol)
                        ELSE format('to_jsonb(s.%I::text)', pcol) END;
    compl_expr := CASE WHEN ctype IN ('jsonb', 'json') THEN
                       format('CASE jsonb_typeof(s.%1$I::jsonb) WHEN ''array'' THEN s.%1$I::jsonb -> -1 ->> ''content'''
                              ' WHEN ''object'' THEN s.%1$I::jsonb ->> ''content'' ELSE s.%1$I::jsonb #>> ''{}'' END', ccol)
                       ELSE format('s.%I::text', ccol) END;
    q := format('SELECT p.prop, NULLIF(%s, ''null''::jsonb) AS prompt, %s AS completion FROM %s s',
                prompt_expr, compl_expr, source);
    IF to_regclass(ftab) IS NOT NULL THEN
        q := q || format(' LEFT JOIN %s f ON f.%I OPERATOR(pg_catalog.=) s.%I', ftab, keycol, keycol);
    END IF;
    q := q || format(' CROSS JOIN LATERAL jsonb_array_elements_text(%s) p(prop)',
                     CASE WHEN which = 'all' THEN '$1'
                          ELSE format('$2 -> %s -> ''graded_propositions''', rbr.fold_name_sql(format('s.%I', rcol))) END);
    IF to_regclass(ftab) IS NOT NULL THEN
        q := q || format(' WHERE f.%I IS NULL OR COALESCE(to_jsonb(f) -> p.prop, ''null''::jsonb) = ''null''::jsonb', keycol);
    END IF;

    missing := 0; not_gradable := 0; requests := 0; prompt_tokens := 0; completion_tokens := 0;
    -- identical questions are asked once
    FOR rec IN EXECUTE format('SELECT q.prop, q.prompt, q.completion COLLATE "C" AS completion, count(*) AS n'
                              ' FROM (%s) q GROUP BY 1, 2, 3', q)
        USING info->'simple_propositions', info->'response_types'
    LOOP
        missing := missing + rec.n;
        IF rec.prompt IS NULL OR rec.completion IS NULL THEN
            not_gradable := not_gradable + rec.n;
            CONTINUE;
        END IF;
        b_prop := b_prop || rec.prop;
        b_prompt := b_prompt || rec.prompt;
        b_compl := b_compl || rec.completion;
        IF cardinality(b_prop) >= 256 THEN
            FOR pl IN SELECT * FROM rbr.grade_plan(policy, b_prop, b_prompt, b_compl) LOOP
                n_send := n_send + (NOT pl.free)::int;
                requests := requests + pl.requests;
                prompt_tokens := prompt_tokens + pl.prompt_tokens;
                completion_tokens := completion_tokens + pl.completion_tokens;
            END LOOP;
            b_prop := '{}'; b_prompt := '{}'; b_compl := '{}';
        END IF;
    END LOOP;
    IF cardinality(b_prop) > 0 THEN
        FOR pl IN SELECT * FROM rbr.grade_plan(policy, b_prop, b_prompt, b_compl) LOOP
            n_send := n_send + (NOT pl.free)::int;
            requests := requests + pl.requests;
            prompt_tokens := prompt_tokens + pl.prompt_tokens;
            completion_tokens := completion_tokens + pl.completion_tokens;
        END LOOP;
    END IF;
    cached := missing - not_gradable - n_send;
END
$$;
REVOKE EXECUTE ON FUNCTION @extschema@.rbr_featurize_estimate(regclass, text, jsonb) FROM PUBLIC;

-- CALL rbr_featurize(..., '{"dry_run": true}'): the estimate, as a NOTICE.
CREATE FUNCTION rbr.featurize_dry_run(source regclass, policy text, options jsonb) RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    e record;
BEGIN
    SELECT * INTO e FROM @extschema@.rbr_featurize_estimate(source, policy, options);
    RAISE NOTICE 'rbr_featurize % (dry run, nothing sent): % values missing, % answered by the cache, % not gradable; would send % requests, about % prompt tokens and at most % completion tokens',
                 source, e.missing, e.cached, e.not_gradable, e.requests, e.prompt_tokens, e.completion_tokens
        USING HINT = format('The same figures as data: SELECT * FROM rbr_featurize_estimate(%L, %L, %L). Prompt tokens are estimated as characters / 4 of the request messages.',
                            source::text, policy, options::text);
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.featurize_dry_run(regclass, text, jsonb) FROM PUBLIC;

-- Per completion asked of the generator: free (cached or a repeat), the
-- requests it would send and their estimated tokens. Sends nothing.
CREATE FUNCTION rbr.generate_plan(prompts jsonb[], instructions text[], samples int[],
    OUT ord int, OUT free boolean, OUT requests int, OUT prompt_tokens int, OUT completion_tokens int)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_generate_plan'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
REVOKE EXECUTE ON FUNCTION rbr.generate_plan(jsonb[], text[], int[]) FROM PUBLIC;

-- What one candidate of each slot costs: its generation (rbr.generate_plan)
-- and, unless that comes from the cache (its grades then came with it), the
-- grading of the text with the proposition's of the slot's response type,
-- counted with a completion as long as rbr.generator_max_tokens allows (an
-- upper bound; it appears twice in a grading request). One row per slot.
CREATE FUNCTION rbr.synth_plan_cost(policy text, prompts jsonb[], instructions text[], samples int[],
                                    response_types text[],
                                    OUT ord int, OUT gen_free boolean, OUT gen_requests int, OUT gen_tokens bigint,
                                    OUT grade_requests bigint, OUT grade_tokens bigint)
    RETURNS SETOF record
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    info jsonb := @extschema@.rbr_policy_info(policy);
    gen_max int := current_setting('rbr.generator_max_tokens')::int;
    g record;
    props text[];
BEGIN
    FOR g IN SELECT * FROM rbr.generate_plan(prompts, instructions, samples) p ORDER BY p.ord LOOP
        ord := g.ord;
        gen_free := g.free;
        gen_requests := g.requests;
        gen_tokens := g.prompt_tokens + g.completion_tokens;
        grade_requests := 0;
        grade_tokens := 0;
        IF NOT g.free THEN
            SELECT COALESCE(array_agg(x), '{}') INTO props
              FROM jsonb_array_elements_text(info->'response_types'->response_types[g.ord]->'graded_propositions') x;
            IF cardinality(props) > 0 THEN
                SELECT COALESCE(sum(p.requests), 0),
                       COALESCE(sum(p.prompt_tokens + p.completion_tokens + p.requests * 2 * gen_max), 0)
                  INTO grade_requests, grade_tokens
                  FROM rbr.grade_plan(policy, props, array_fill(prompts[g.ord], ARRAY[cardinality(props)]),
                                      array_fill(''::text, ARRAY[cardinality(props)])) p;
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.synth_plan_cost(text, jsonb[], text[], int[], text[]) FROM PUBLIC;

-- The slots of one round of a synthesize chunk that its budget still allows,
-- as positions into the arrays (NULL: no budget), given what the chunk spent
-- so far; when some are left out the run is marked stopped.
CREATE FUNCTION rbr.synth_budget(run_id bigint, spent_requests bigint, spent_tokens bigint, prompts jsonb[],
                                 instructions text[], samples int[], response_types text[]) RETURNS int[]
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    r rbr.run := rbr.run_get(synth_budget.run_id);
    max_req bigint := (r.options->>'max_requests')::bigint;
    max_tok bigint := (r.options->>'max_tokens')::bigint;
    req bigint := r.requests + spent_requests;
    tok bigint := r.prompt_tokens + r.completion_tokens + spent_tokens;
    kept int[] := '{}';
    left_out bigint := 0;
    c record;
BEGIN
    IF max_req IS NULL AND max_tok IS NULL THEN
        RETURN NULL;
    END IF;
    FOR c IN SELECT * FROM rbr.synth_plan_cost(r.policy, prompts, instructions, samples, response_types) LOOP
        IF (max_req IS NULL OR req + c.gen_requests + c.grade_requests <= max_req)
           AND (max_tok IS NULL OR tok + c.gen_tokens + c.grade_tokens <= max_tok) THEN
            kept := kept || c.ord;
            req := req + c.gen_requests + c.grade_requests;
            tok := tok + c.gen_tokens + c.grade_tokens;
        ELSE
            left_out := left_out + 1;
        END IF;
    END LOOP;
    IF left_out > 0 THEN
        PERFORM rbr.run_stop(synth_budget.run_id,
            concat_ws(' and ',
                      CASE WHEN max_req IS NOT NULL THEN format('max_requests %s', max_req) END,
                      CASE WHEN max_tok IS NOT NULL THEN format('max_tokens %s', max_tok) END)
            || format(' reached before %s more candidate(s)', left_out));
    END IF;
    RETURN kept;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.synth_budget(bigint, bigint, bigint, jsonb[], text[], int[], text[]) FROM PUBLIC;

-- What CALL rbr_synthesize(source, policy, options) would do now, for the
-- first candidate of every slot still to do, without sending anything or
-- writing any table: slots (pending or errored, or not planned yet), their
-- generations answered by the generation cache, the generation requests and
-- their estimated prompt tokens and (at most) completion tokens, the grading
-- requests of the generated texts and their tokens (an upper bound: texts
-- as long as rbr.generator_max_tokens allows). A rejected candidate is
-- replaced, up to max_attempts per slot: a run can cost up to that many
-- times the first round.
CREATE FUNCTION @extschema@.rbr_synthesize_estimate(source regclass, policy text, options jsonb DEFAULT '{}',
    OUT slots bigint, OUT generations_cached bigint, OUT generation_requests bigint,
    OUT generation_prompt_tokens bigint, OUT generation_completion_tokens bigint,
    OUT grading_requests bigint, OUT grading_tokens bigint, OUT max_attempts int)
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    info jsonb;
    nsp name;
    rel name;
    keycol name;
    keytype text;
    pcol text := COALESCE(options->>'prompt_column', 'prompt');
    rcol text := COALESCE(options->>'response_type_column', 'response_type');
    n_ideal int;
    n_flawed int;
    n_disallowed int;
    seed int;
    stab text;
    ptype text;
    prompt_expr text;
    rt_expr text;
    bad text;
    q text;
    rec record;
    c record;
    gen_max int := current_setting('rbr.generator_max_tokens')::int;
    b_prompt jsonb[] := '{}';
    b_instr text[] := '{}';
    b_sample int[] := '{}';
    b_rt text[] := '{}';
    gp record;
BEGIN
    IF source IS NULL OR policy IS NULL OR options IS NULL OR jsonb_typeof(options) <> 'object' THEN
        RAISE EXCEPTION 'rbr_synthesize_estimate() needs a source, a policy and an options object'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT string_agg(k, ', ') INTO bad FROM jsonb_object_keys(options) k
     WHERE k NOT IN ('prompt_column', 'response_type_column', 'ideal', 'flawed', 'disallowed', 'max_attempts',
                     'chunk_slots', 'verify', 'class_mode', 'seed', 'labels', 'dry_run', 'max_requests',
                     'max_tokens', 'mode', 'wait');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown rbr_synthesize option(s): %', bad USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM rbr.cost_check_options(options);
    n_ideal := rbr.synth_int_option(options, 'ideal', 1, 0, 100);
    n_flawed := rbr.synth_int_option(options, 'flawed', 3, 0, 100);
    n_disallowed := rbr.synth_int_option(options, 'disallowed', 1, 0, 100);
    max_attempts := rbr.synth_int_option(options, 'max_attempts', 3, 1, 100);
    seed := rbr.synth_int_option(options, 'seed', 0, 0, 999);
    info := @extschema@.rbr_policy_info(policy);
    SELECT * INTO nsp, rel, keycol, keytype
      FROM rbr.check_source(source, 'rbr_synthesize', rcol, ARRAY[pcol],
           'Name the columns with options {"prompt_column": ..., "response_type_column": ...}.',
           'prompt: jsonb messages or text; response_type: text.');
    stab := format('%I.%I', nsp, rel || '_synth');
    PERFORM rbr.check_own_table(stab, 'rbr_synthesize');
    SELECT format_type(a.atttypid, NULL) INTO ptype FROM pg_attribute a
     WHERE a.attrelid = source AND a.attname = pcol AND NOT a.attisdropped;
    prompt_expr := CASE WHEN ptype IN ('jsonb', 'json') THEN format('s.%I::jsonb', pcol)
                        ELSE format('to_jsonb(s.%I::text)', pcol) END;
    rt_expr := rbr.fold_name_sql(format('s.%I', rcol));

    -- the slots a run would work on, as synth_start plans them and synth_chunk reads them
    q := format('SELECT %1$s AS prompt, p.instruction, p.slot, 0 AS candidates, %2$s AS rt FROM %3$s s,'
                ' LATERAL @extschema@.rbr_synth_plan($2, %2$s, $3, $4, $5, s.%4$I::text || '':'' || $6) p'
                ' WHERE $1 ? %2$s', prompt_expr, rt_expr, source, keycol);
    IF to_regclass(stab) IS NOT NULL THEN
        q := q || format(' AND NOT EXISTS (SELECT 1 FROM %1$s t WHERE t.%2$I OPERATOR(pg_catalog.=) s.%2$I'
                         ' AND t.slot OPERATOR(pg_catalog.=) p.slot)'
                         ' UNION ALL SELECT %3$s, t.instruction, t.slot, t.candidates, t.response_type'
                         ' FROM %1$s t JOIN %4$s s ON s.%2$I OPERATOR(pg_catalog.=) t.%2$I'
                         ' WHERE t.status IN (''pending'', ''error'')', stab, keycol, prompt_expr, source);
    END IF;
    slots := 0; generations_cached := 0; generation_requests := 0; generation_prompt_tokens := 0;
    generation_completion_tokens := 0; grading_requests := 0; grading_tokens := 0;
    FOR rec IN EXECUTE q USING info->'response_types', policy, n_ideal, n_flawed, n_disallowed, seed::text LOOP
        slots := slots + 1;
        CONTINUE WHEN rec.prompt IS NULL OR rec.prompt = 'null'::jsonb;
        b_prompt := b_prompt || rec.prompt;
        b_instr := b_instr || rec.instruction;
        b_sample := b_sample || (seed * 1000000 + rec.slot * 1000 + rec.candidates);
        b_rt := b_rt || rec.rt;
        IF cardinality(b_prompt) >= 64 THEN
            FOR c IN SELECT * FROM rbr.synth_plan_cost(policy, b_prompt, b_instr, b_sample, b_rt) LOOP
                generations_cached := generations_cached + c.gen_free::int;
                generation_requests := generation_requests + c.gen_requests;
                generation_completion_tokens := generation_completion_tokens + CASE WHEN c.gen_free THEN 0 ELSE gen_max END;
                generation_prompt_tokens := generation_prompt_tokens + c.gen_tokens - CASE WHEN c.gen_free THEN 0 ELSE gen_max END;
                grading_requests := grading_requests + c.grade_requests;
                grading_tokens := grading_tokens + c.grade_tokens;
            END LOOP;
            b_prompt := '{}'; b_instr := '{}'; b_sample := '{}'; b_rt := '{}';
        END IF;
    END LOOP;
    IF cardinality(b_prompt) > 0 THEN
        FOR c IN SELECT * FROM rbr.synth_plan_cost(policy, b_prompt, b_instr, b_sample, b_rt) LOOP
            generations_cached := generations_cached + c.gen_free::int;
            generation_requests := generation_requests + c.gen_requests;
            generation_completion_tokens := generation_completion_tokens + CASE WHEN c.gen_free THEN 0 ELSE gen_max END;
            generation_prompt_tokens := generation_prompt_tokens + c.gen_tokens - CASE WHEN c.gen_free THEN 0 ELSE gen_max END;
            grading_requests := grading_requests + c.grade_requests;
            grading_tokens := grading_tokens + c.grade_tokens;
        END LOOP;
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION @extschema@.rbr_synthesize_estimate(regclass, text, jsonb) FROM PUBLIC;

-- CALL rbr_synthesize(..., '{"dry_run": true}'): the estimate, as a NOTICE.
CREATE FUNCTION rbr.synth_dry_run(source regclass, policy text, options jsonb) RETURNS void
    LANGUAGE plpgsql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    e record;
BEGIN
    SELECT * INTO e FROM @extschema@.rbr_synthesize_estimate(source, policy, options);
    RAISE NOTICE 'rbr_synthesize % (dry run, nothing sent): % slots to do, % first candidates in the generation cache; the first round would send % generation requests (about % prompt tokens, at most % completion tokens) and at most % grading requests (at most % tokens)',
                 source, e.slots, e.generations_cached, e.generation_requests, e.generation_prompt_tokens,
                 e.generation_completion_tokens, e.grading_requests, e.grading_tokens
        USING DETAIL = format('A rejected candidate is replaced up to max_attempts (%s) per slot: a run can cost up to that many times the first round.', e.max_attempts),
              HINT = format('The same figures as data: SELECT * FROM rbr_synthesize_estimate(%L, %L, %L).',
                            source::text, policy, options::text);
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.synth_dry_run(regclass, text, jsonb) FROM PUBLIC;

CREATE OR REPLACE FUNCTION rbr.capability_privileges(OUT capability text, OUT kind text, OUT object text, OUT privileges text)
    RETURNS SETOF record
    LANGUAGE sql IMMUTABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    VALUES
        ('grade', 'FUNCTION', '@extschema@.rbr_grade(text, text, jsonb, text)', 'EXECUTE'),
        ('grade', 'FUNCTION', '@extschema@.rbr_grade_many(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('grade', 'PROCEDURE', '@extschema@.rbr_featurize(regclass, text, jsonb)', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.featurize_start(regclass, text, jsonb)', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.featurize_chunk(bigint)', 'EXECUTE'),
        ('grade', 'FUNCTION', '@extschema@.rbr_score(text, text, jsonb, text, float8)', 'EXECUTE'),
        ('grade', 'FUNCTION', '@extschema@.rbr_check_grader(text)', 'EXECUTE'),
        ('grade', 'FUNCTION', '@extschema@.rbr_featurize_estimate(regclass, text, jsonb)', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.featurize_dry_run(regclass, text, jsonb)', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.featurize_budget(bigint, text[], jsonb[], text[])', 'EXECUTE'),
        ('grade', 'FUNCTION', 'rbr.grade_plan(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', '@extschema@.rbr_generate_many(jsonb[], text[], int[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', '@extschema@.rbr_grade_many(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('synthesize', 'PROCEDURE', '@extschema@.rbr_synthesize(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_start(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_chunk(bigint)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', '@extschema@.rbr_synthesize_estimate(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_dry_run(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_budget(bigint, bigint, bigint, jsonb[], text[], int[], text[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_plan_cost(text, jsonb[], text[], int[], text[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.generate_plan(jsonb[], text[], int[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.grade_plan(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('policies', 'TABLE', 'rbr.policy_version', 'INSERT'),
        ('models', 'TABLE', 'rbr.model', 'INSERT, UPDATE, DELETE')
    UNION ALL
    SELECT c, k, o, p
      FROM (VALUES ('grade'), ('synthesize')) AS c(c),
           (VALUES ('FUNCTION', 'rbr.run_begin(text, regclass, regclass[], text, jsonb, bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_get(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_advance(bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint, bigint, jsonb, text)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_finish(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_error_reasons(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_error_query(bigint)', 'EXECUTE'),
                   ('PROCEDURE', 'rbr.run_drive(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_stop(bigint, text)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_stopped(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.run_stopped_report(bigint)', 'EXECUTE')) AS r(k, o, p)
    UNION ALL
    -- batch mode of rbr_featurize and rbr_synthesize
    SELECT c, k, o, p
      FROM (VALUES ('grade'), ('synthesize')) AS c(c),
           (VALUES ('FUNCTION', 'rbr.batch_options(jsonb)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_mode(bigint)', 'EXECUTE'),
                   ('PROCEDURE', 'rbr.batch_drive(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_chunk(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_rewind(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_collect(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_prepare(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_upload(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_create(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_state(bigint)', 'EXECUTE'),
                   ('FUNCTION', 'rbr.batch_sleep(float8)', 'EXECUTE')) AS b(k, o, p)
$$;

-- Roles holding grade or synthesize get the functions those capabilities
-- now include.
DO $$
DECLARE
    g record;
BEGIN
    FOR g IN SELECT DISTINCT c.cap, a.grantee::pg_catalog.regrole AS role
               FROM (VALUES ('grade', '@extschema@.rbr_featurize(regclass, text, jsonb)'::pg_catalog.regprocedure),
                            ('synthesize', '@extschema@.rbr_synthesize(regclass, text, jsonb)'::pg_catalog.regprocedure)) c(cap, fn)
               JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) c.fn,
                    pg_catalog.aclexplode(p.proacl) a
              WHERE a.grantee OPERATOR(pg_catalog.<>) 0 AND a.grantee OPERATOR(pg_catalog.<>) p.proowner LOOP
        PERFORM @extschema@.rbr_grant(g.role, g.cap);
    END LOOP;
END
$$;

-------------------------------------------------------------------------------
-- Citus: policies and models on every node
-------------------------------------------------------------------------------
-- (section: citus)

-- rbr's tables are local to each node. On a Citus coordinator, every policy
-- version and model stored (rbr_policy_load, rbr_model_save, or a direct
-- INSERT/UPDATE/DELETE) is copied to every worker when its transaction
-- commits, so that queries Citus pushes down to the workers find them;
-- rbr_citus_sync() copies them to workers added later. Citus's catalogs and
-- functions are reached by name, only when the citus extension is installed:
-- without it these functions do nothing.

-- Whether this database is a Citus coordinator (citus installed, this node's
-- group 0); false without Citus and on workers.
CREATE FUNCTION rbr.citus_coordinator() RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    grp int;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension e WHERE e.extname = 'citus') THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT g.groupid FROM pg_catalog.pg_dist_local_group g' INTO grp;
    RETURN grp IS NOT DISTINCT FROM 0;
END
$$;

-- A role of a copied row on this node: it must exist here (by name).
CREATE FUNCTION rbr.citus_role(name text) RETURNS regrole
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    r regrole := to_regrole(name);
BEGIN
    IF r IS NULL THEN
        RAISE EXCEPTION 'role % of a policy or model of the coordinator does not exist on this node', name
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create the role on every node (Citus does when citus.enable_create_role_propagation is on), then run SELECT * FROM rbr_citus_sync() on the coordinator.';
    END IF;
    RETURN r;
END
$$;

-- On a worker: store the policy versions and models the coordinator sent
-- (rows as to_jsonb() of rbr.policy_version / rbr.model, roles by name) and
-- remove the deleted ones; returns what it sent and what changed here.
-- Idempotent. A name owned here by another role is refused (the owner
-- guard), so no role's policy or model replaces another's. Called by
-- rbr.citus_ship() as the extension's owner; no other role may call it.
CREATE FUNCTION rbr.citus_apply(payload jsonb) RETURNS jsonb
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    p jsonb;
    row_pv rbr.policy_version;
    cur rbr.policy_version;
    row_m rbr.model;
    n int;
    pv int := 0;
    pv_added int := 0;
    md int := 0;
    md_changed int := 0;
    removed int := 0;
BEGIN
    FOR p IN SELECT e.value FROM jsonb_array_elements(COALESCE(payload -> 'policy_versions', '[]')) e LOOP
        PERFORM rbr.citus_role(p ->> 'owner');
        row_pv := jsonb_populate_record(NULL::rbr.policy_version, p);
        PERFORM pg_advisory_xact_lock(hashtext('rbr.policy_version'), hashtext(row_pv.policy));
        pv := pv + 1;
        SELECT * INTO cur FROM rbr.policy_version v
         WHERE v.policy = row_pv.policy AND v.version = row_pv.version;
        IF FOUND AND cur.owner = row_pv.owner AND cur.spec = row_pv.spec THEN
            CONTINUE;
        END IF;
        IF FOUND AND cur.owner = row_pv.owner THEN
            -- kept from a load whose transaction the coordinator rolled back:
            -- the coordinator's version replaces it (and models on it here)
            DELETE FROM rbr.model m WHERE m.policy = cur.policy AND m.policy_version = cur.version;
            DELETE FROM rbr.policy_version v WHERE v.policy = cur.policy AND v.version = cur.version;
        END IF;
        -- the owner guard refuses a name that another role owns on this node
        INSERT INTO rbr.policy_version SELECT row_pv.*;
        pv_added := pv_added + 1;
    END LOOP;
    FOR p IN SELECT e.value FROM jsonb_array_elements(COALESCE(payload -> 'models', '[]')) e LOOP
        PERFORM rbr.citus_role(p ->> 'owner');
        row_m := jsonb_populate_record(NULL::rbr.model, p);
        md := md + 1;
        -- owner is set too, so that the owner guard refuses another role's row
        INSERT INTO rbr.model AS m SELECT row_m.*
        ON CONFLICT ON CONSTRAINT model_pkey DO UPDATE
           SET policy = EXCLUDED.policy, policy_version = EXCLUDED.policy_version,
               feature_names = EXCLUDED.feature_names, weights = EXCLUDED.weights,
               report = EXCLUDED.report, created_at = EXCLUDED.created_at,
               created_by = EXCLUDED.created_by, owner = EXCLUDED.owner
         WHERE (m.policy, m.policy_version, m.feature_names, m.weights, m.report, m.created_at, m.created_by, m.owner)
               IS DISTINCT FROM (EXCLUDED.policy, EXCLUDED.policy_version, EXCLUDED.feature_names, EXCLUDED.weights,
                                 EXCLUDED.report, EXCLUDED.created_at, EXCLUDED.created_by, EXCLUDED.owner);
        GET DIAGNOSTICS n = ROW_COUNT;
        md_changed := md_changed + n;
    END LOOP;
    FOR p IN SELECT e.value FROM jsonb_array_elements(COALESCE(payload -> 'deleted_models', '[]')) e LOOP
        DELETE FROM rbr.model m
         WHERE m.name = p ->> 'name' AND m.response_type = p ->> 'response_type'
           AND m.owner = rbr.citus_role(p ->> 'owner');
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
    END LOOP;
    FOR p IN SELECT e.value FROM jsonb_array_elements(COALESCE(payload -> 'deleted_policy_versions', '[]')) e LOOP
        DELETE FROM rbr.policy_version v
         WHERE v.policy = p ->> 'policy' AND v.version = (p ->> 'version')::int
           AND v.owner = rbr.citus_role(p ->> 'owner');
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
    END LOOP;
    RETURN jsonb_build_object('policy_versions', pv, 'policy_versions_added', pv_added,
                              'models', md, 'models_changed', md_changed, 'removed', removed);
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.citus_apply(jsonb) FROM PUBLIC;

-- On the coordinator: send a payload of rbr.citus_apply() to every active
-- primary worker (pg_dist_node) over Citus's connections, as the current
-- role (the extension's owner: callers are rbr.citus_push() and
-- rbr_citus_sync()); one row per worker with what it reports. An ERROR when
-- a worker failed. Nothing without Citus or on a worker.
CREATE FUNCTION rbr.citus_ship(payload jsonb, OUT node text, OUT port int, OUT result jsonb)
    RETURNS SETOF record
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    names text[];
    ports int[];
    cmd text;
    r record;
    failed text;
BEGIN
    IF NOT rbr.citus_coordinator() THEN
        RETURN;
    END IF;
    EXECUTE 'SELECT pg_catalog.array_agg(n.nodename ORDER BY n.nodeid), pg_catalog.array_agg(n.nodeport ORDER BY n.nodeid)
               FROM pg_catalog.pg_dist_node n
              WHERE n.isactive AND n.noderole OPERATOR(pg_catalog.=) ''primary''
                AND n.groupid OPERATOR(pg_catalog.<>) 0
                AND n.nodecluster OPERATOR(pg_catalog.=) pg_catalog.current_setting(''citus.cluster_name'')'
        INTO names, ports;
    IF names IS NULL THEN
        RETURN;
    END IF;
    cmd := format('SELECT rbr.citus_apply(%L::jsonb)', payload);
    FOR r IN EXECUTE 'SELECT m.node_name, m.node_port, m.success, m.result
                        FROM pg_catalog.master_run_on_worker($1, $2, $3, true) m'
             USING names, ports, array_fill(cmd, ARRAY[cardinality(names)]) LOOP
        IF r.success THEN
            node := r.node_name;
            port := r.node_port;
            result := r.result::jsonb;
            RETURN NEXT;
        ELSE
            failed := concat_ws('; ', failed, format('%s:%s: %s', r.node_name, r.node_port, r.result));
        END IF;
    END LOOP;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'could not copy policies and models to every Citus worker'
            USING ERRCODE = 'connection_failure',
                  DETAIL = failed,
                  HINT = 'Fix the worker (or remove it with citus_remove_node / citus_disable_node) and retry; SELECT * FROM rbr_citus_sync() copies everything again.';
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.citus_ship(jsonb) FROM PUBLIC;

-- Deferred row trigger of rbr.policy_version and rbr.model: at commit, send
-- the stored (or deleted) row to every worker; a model goes with its policy
-- version, which the worker's foreign key needs. It runs as the extension's
-- owner: the rows are the ones just written, which row security and the
-- owner guard have checked.
CREATE FUNCTION rbr.citus_push() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    payload jsonb;
BEGIN
    IF NOT rbr.citus_coordinator() THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'policy_version' THEN
        payload := CASE TG_OP
            WHEN 'DELETE' THEN jsonb_build_object('deleted_policy_versions', jsonb_build_array(
                jsonb_build_object('policy', OLD.policy, 'version', OLD.version, 'owner', OLD.owner::text)))
            ELSE jsonb_build_object('policy_versions', jsonb_build_array(to_jsonb(NEW))) END;
    ELSIF TG_OP = 'DELETE' THEN
        payload := jsonb_build_object('deleted_models', jsonb_build_array(
            jsonb_build_object('name', OLD.name, 'response_type', OLD.response_type, 'owner', OLD.owner::text)));
    ELSE
        payload := jsonb_build_object(
            'policy_versions', (SELECT jsonb_agg(to_jsonb(v)) FROM rbr.policy_version v
                                 WHERE v.policy = NEW.policy AND v.version = NEW.policy_version),
            'models', jsonb_build_array(to_jsonb(NEW)));
    END IF;
    PERFORM rbr.citus_ship(payload);
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.citus_push() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER policy_version_to_workers
    AFTER INSERT OR DELETE ON rbr.policy_version
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION rbr.citus_push();
CREATE CONSTRAINT TRIGGER model_to_workers
    AFTER INSERT OR UPDATE OR DELETE ON rbr.model
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION rbr.citus_push();

-- Every policy version and model the caller sees (row security), as a
-- payload of rbr.citus_apply().
CREATE FUNCTION rbr.citus_payload() RETURNS jsonb
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT jsonb_build_object(
        'policy_versions', COALESCE((SELECT jsonb_agg(to_jsonb(v) ORDER BY v.policy, v.version)
                                       FROM rbr.policy_version v), '[]'),
        'models', COALESCE((SELECT jsonb_agg(to_jsonb(m) ORDER BY m.name, m.response_type)
                              FROM rbr.model m), '[]'))
$$;

-- The C part of rbr_citus_sync(): rbr.citus_payload() as the caller, then
-- rbr.citus_ship() of it as the extension's owner.
CREATE FUNCTION rbr.citus_sync(OUT node text, OUT port int, OUT result jsonb)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_citus_sync'
    LANGUAGE C VOLATILE;

-- Copy every policy version and model the caller sees to every Citus worker
-- (e.g. after citus_add_node); one row per worker with the counts sent and
-- changed there. Idempotent; nothing without Citus or on a worker.
CREATE FUNCTION @extschema@.rbr_citus_sync(OUT node text, OUT port int, OUT policy_versions int,
                                           OUT policy_versions_added int, OUT models int, OUT models_changed int)
    RETURNS SETOF record
    LANGUAGE sql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT s.node, s.port, (s.result ->> 'policy_versions')::int, (s.result ->> 'policy_versions_added')::int,
           (s.result ->> 'models')::int, (s.result ->> 'models_changed')::int
      FROM rbr.citus_sync() s
$$;

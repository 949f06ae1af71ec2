-- rbr 0.2.0 -> 0.3.0 (ALTER EXTENSION rbr UPDATE TO '0.3.0').
--
-- After this script the catalog equals a fresh install of 0.3.0
-- (sql/rbr--0.3.0.sql); test/t/015_upgrade.t compares the two.
\echo Use "ALTER EXTENSION rbr UPDATE TO '0.3.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Bulk grading claims from the features table
-------------------------------------------------------------------------------
-- <source>_features keeps each row's folded response type (column
-- response_type, added to existing tables by the next rbr_featurize); chunks
-- claim rows there and read just the claimed source rows by key.
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
                     'propositions');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown rbr_featurize option(s): %', bad USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Known options: prompt_column, completion_column, response_type_column, chunk_rows, class_mode, propositions.';
    END IF;
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
    IF keycol = ANY (cols || 'response_type'::text) THEN
        RAISE EXCEPTION 'the primary key column % of % has the name of a feature', quote_ident(keycol), source
            USING ERRCODE = 'duplicate_column',
                  HINT = '<source>_features holds the key, response_type and one column per feature; rename the key column.';
    END IF;
    IF 'response_type' = ANY (cols) THEN
        RAISE EXCEPTION 'policy % names a proposition or class response_type', polref
            USING ERRCODE = 'duplicate_column',
                  HINT = '<source>_features keeps each row''s response type in column response_type; rename the proposition.';
    END IF;

    -- one set-up at a time per source table
    PERFORM pg_advisory_xact_lock(hashtext('rbr.featurize'), source::oid::int);
    PERFORM rbr.check_own_table(ftab, 'rbr_featurize');
    PERFORM rbr.check_own_table(gtab, 'rbr_featurize');
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (%I %s PRIMARY KEY, response_type text)', ftab, keycol, keytype);
    -- features tables of 0.2.0: the folded response type, the bookkeeping claims read
    EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS response_type text', ftab);
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
    EXECUTE format('INSERT INTO %1$s AS f (%2$I, response_type) SELECT s.%2$I, %3$s FROM %4$s s'
                   ' ON CONFLICT (%2$I) DO UPDATE SET response_type = EXCLUDED.response_type'
                   ' WHERE f.response_type IS DISTINCT FROM EXCLUDED.response_type',
                   ftab, keycol, rt_expr, source);

    -- the needed values still missing, counted per row's response type
    nulls_expr := rbr.featurize_need_sql(info, which, 'f.response_type', 'f.%1$I', ', ', 'num_nulls(%s)', '0');
    EXECUTE format('SELECT COALESCE(sum(%s), 0) FROM %s f', nulls_expr, ftab) INTO total;
    IF which = 'needed' THEN
        EXECUTE format('SELECT count(*) FROM %s f WHERE f.response_type IS NULL OR NOT ($1 ? f.response_type)', ftab)
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
                                            'propositions', which),
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
BEGIN
    r := rbr.run_get(featurize_chunk.run_id);
    o := r.options;
    -- names and types from the catalogs, on every use
    SELECT k.keycol, k.keytype INTO keycol, keytype FROM rbr.run_source_key(r.source) k;
    info := @extschema@.rbr_policy_info(r.policy);
    SELECT array_agg(x ORDER BY n) INTO props FROM jsonb_array_elements_text(info->'simple_propositions') WITH ORDINALITY e(x, n);
    SELECT array_agg(x ORDER BY n) INTO classes FROM jsonb_array_elements_text(info->'classes') WITH ORDINALITY e(x, n);
    -- a row is claimed while one of its needed values is missing
    nulls_cond := rbr.featurize_need_sql(info, COALESCE(o->>'propositions', 'needed'), 'f.response_type',
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
        EXECUTE format('UPDATE %s f SET response_type = $3, %s WHERE f.%I = $1::%s RETURNING to_jsonb(f)',
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

-------------------------------------------------------------------------------
-- Fitting at scale: the aggregate state type and the scale-out fit
-------------------------------------------------------------------------------
-- (section: fitting)

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

-- rbr_featurize and rbr_synthesize: options mode, wait and poll_seconds;
-- batch mode's runs (rbr_synthesize's chunks wait for slots in flight).
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
                     'propositions', 'mode', 'wait', 'poll_seconds');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown rbr_featurize option(s): %', bad USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Known options: prompt_column, completion_column, response_type_column, chunk_rows, class_mode, propositions, mode, wait, poll_seconds.';
    END IF;
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
    IF keycol = ANY (cols || 'response_type'::text) THEN
        RAISE EXCEPTION 'the primary key column % of % has the name of a feature', quote_ident(keycol), source
            USING ERRCODE = 'duplicate_column',
                  HINT = '<source>_features holds the key, response_type and one column per feature; rename the key column.';
    END IF;
    IF 'response_type' = ANY (cols) THEN
        RAISE EXCEPTION 'policy % names a proposition or class response_type', polref
            USING ERRCODE = 'duplicate_column',
                  HINT = '<source>_features keeps each row''s response type in column response_type; rename the proposition.';
    END IF;

    -- one set-up at a time per source table
    PERFORM pg_advisory_xact_lock(hashtext('rbr.featurize'), source::oid::int);
    PERFORM rbr.check_own_table(ftab, 'rbr_featurize');
    PERFORM rbr.check_own_table(gtab, 'rbr_featurize');
    EXECUTE format('CREATE TABLE IF NOT EXISTS %s (%I %s PRIMARY KEY, response_type text)', ftab, keycol, keytype);
    -- features tables of 0.2.0: the folded response type, the bookkeeping claims read
    EXECUTE format('ALTER TABLE %s ADD COLUMN IF NOT EXISTS response_type text', ftab);
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
    EXECUTE format('INSERT INTO %1$s AS f (%2$I, response_type) SELECT s.%2$I, %3$s FROM %4$s s'
                   ' ON CONFLICT (%2$I) DO UPDATE SET response_type = EXCLUDED.response_type'
                   ' WHERE f.response_type IS DISTINCT FROM EXCLUDED.response_type',
                   ftab, keycol, rt_expr, source);

    -- the needed values still missing, counted per row's response type
    nulls_expr := rbr.featurize_need_sql(info, which, 'f.response_type', 'f.%1$I', ', ', 'num_nulls(%s)', '0');
    EXECUTE format('SELECT COALESCE(sum(%s), 0) FROM %s f', nulls_expr, ftab) INTO total;
    IF which = 'needed' THEN
        EXECUTE format('SELECT count(*) FROM %s f WHERE f.response_type IS NULL OR NOT ($1 ? f.response_type)', ftab)
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
                                            'propositions', which) || rbr.batch_options(options),
                         total);
END
$$;

CREATE OR REPLACE PROCEDURE @extschema@.rbr_featurize(source regclass, policy text, options jsonb DEFAULT '{}')
    LANGUAGE plpgsql
    AS $$
DECLARE
    run bigint;
BEGIN
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
                     'chunk_slots', 'verify', 'class_mode', 'seed', 'labels', 'mode', 'wait', 'poll_seconds');
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'unknown rbr_synthesize option(s): %', bad USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Known options: prompt_column, response_type_column, ideal, flawed, disallowed, max_attempts, chunk_slots, verify, class_mode, seed, labels, mode, wait, poll_seconds.';
    END IF;
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
                         || rbr.batch_options(options),
                         total);
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
    elapsed float8;
    rate float8;
    done_ bigint;
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

    r := rbr.run_advance(synth_chunk.run_id, n_acc, n_err, n_gencached, n_genreq + n_grreq, n_pt, n_ct, 0, 0,
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

CREATE OR REPLACE PROCEDURE @extschema@.rbr_synthesize(source regclass, policy text, options jsonb DEFAULT '{}')
    LANGUAGE plpgsql
    AS $$
DECLARE
    run bigint;
BEGIN
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
        ('synthesize', 'FUNCTION', '@extschema@.rbr_generate_many(jsonb[], text[], int[])', 'EXECUTE'),
        ('synthesize', 'FUNCTION', '@extschema@.rbr_grade_many(text, text[], jsonb[], text[])', 'EXECUTE'),
        ('synthesize', 'PROCEDURE', '@extschema@.rbr_synthesize(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_start(regclass, text, jsonb)', 'EXECUTE'),
        ('synthesize', 'FUNCTION', 'rbr.synth_chunk(bigint)', 'EXECUTE'),
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
                   ('PROCEDURE', 'rbr.run_drive(bigint)', 'EXECUTE')) AS r(k, o, p)
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

-- Roles holding the grade or synthesize capability get what batch mode needs.
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
-- Rate budget shared by the cluster
-------------------------------------------------------------------------------
-- (section: rate)

-------------------------------------------------------------------------------
-- Cost before and after: dry runs, budgets, prompt caching
-------------------------------------------------------------------------------
-- (section: cost)

-------------------------------------------------------------------------------
-- Citus: policies and models on every node
-------------------------------------------------------------------------------
-- (section: citus)

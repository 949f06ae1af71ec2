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

-------------------------------------------------------------------------------
-- Fitting at scale: the aggregate state type and the scale-out fit
-------------------------------------------------------------------------------
-- (section: fitting)

-------------------------------------------------------------------------------
-- Batch mode: the provider's Batch API
-------------------------------------------------------------------------------
-- (section: batch)

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

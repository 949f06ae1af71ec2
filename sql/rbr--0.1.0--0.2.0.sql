-- rbr 0.1.0 -> 0.2.0 (ALTER EXTENSION rbr UPDATE TO '0.2.0').
--
-- After this script the catalog equals a fresh install of 0.2.0
-- (sql/rbr--0.2.0.sql); test/t/015_upgrade.t compares the two.
\echo Use "ALTER EXTENSION rbr UPDATE TO '0.2.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Privileges, owners and the run mechanism
-------------------------------------------------------------------------------

-- (end of privileges, owners and the run mechanism)

-------------------------------------------------------------------------------
-- Policies and models: hostile input
-------------------------------------------------------------------------------

-- Policy limits, reserved names and the stack-depth and interrupt checks of
-- validation are in the C library (src/policy.c, src/classes.c): nothing to
-- change in the catalog for them.

-- rbr_model_save: every weight must be a finite number.
CREATE OR REPLACE FUNCTION @extschema@.rbr_model_save(model text, policy text, response_type text, fit jsonb)
    RETURNS rbr.model
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    names text[];
    w float8[];
    info jsonb;
    folded text;
    saved rbr.model;
BEGIN
    IF model IS NULL OR policy IS NULL OR response_type IS NULL OR fit IS NULL THEN
        RAISE EXCEPTION 'rbr_model_save() arguments must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF model !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid model name %', quote_literal(model)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, ''_'', ''.'' or ''-''.';
    END IF;
    info := @extschema@.rbr_policy_info(policy);
    names := @extschema@.rbr_feature_names(policy, response_type);
    folded := lower(regexp_replace(btrim(response_type), '[\s_-]+', '_', 'g'));
    IF jsonb_typeof(fit -> 'weights') IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'fit report has no "weights" array'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the jsonb that rbr_fit() returned.';
    END IF;
    SELECT array_agg(value::float8 ORDER BY ord) INTO w
      FROM jsonb_array_elements_text(fit -> 'weights') WITH ORDINALITY AS e(value, ord);
    IF coalesce(cardinality(w), 0) <> cardinality(names) THEN
        RAISE EXCEPTION 'fit has % weights but response type % of policy % has % features',
                coalesce(cardinality(w), 0), quote_literal(folded), quote_literal(policy), cardinality(names)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Fit on rbr_features() of the same policy and response type.';
    END IF;
    IF fit ? 'feature_names' AND (SELECT array_agg(v ORDER BY o) FROM jsonb_array_elements_text(fit -> 'feature_names') WITH ORDINALITY AS f(v, o)) IS DISTINCT FROM names THEN
        RAISE EXCEPTION 'fit feature_names differ from the features of response type % of policy %', quote_literal(folded), quote_literal(policy)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- finite weights only: a NULL would shift the vector, NaN poisons every reward
    FOR i IN 1 .. cardinality(w) LOOP
        IF w[i] IS NULL OR w[i] IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8) THEN
            RAISE EXCEPTION 'weight % of the fit report is %, not a finite number', i, (fit -> 'weights' -> (i - 1))::text
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Weights must be finite numbers, one per feature; refit if rbr_fit() did not converge.';
        END IF;
    END LOOP;
    INSERT INTO rbr.model AS m (name, response_type, policy, policy_version, feature_names, weights, report)
    VALUES (model, folded, info ->> 'name', (info ->> 'version')::int, names, w, fit)
    ON CONFLICT ON CONSTRAINT model_pkey DO UPDATE
       SET policy = EXCLUDED.policy, policy_version = EXCLUDED.policy_version,
           feature_names = EXCLUDED.feature_names, weights = EXCLUDED.weights,
           report = EXCLUDED.report, created_at = pg_catalog.now(), created_by = CURRENT_USER
    RETURNING * INTO saved;
    RETURN saved;
END
$$;

-- (end of policies and models)

-------------------------------------------------------------------------------
-- Graders: request settings, answer reading, failures
-------------------------------------------------------------------------------

-- (end of graders)

-------------------------------------------------------------------------------
-- Keys and endpoint settings
-------------------------------------------------------------------------------

-- (end of keys)

-------------------------------------------------------------------------------
-- Pictures
-------------------------------------------------------------------------------

-- (end of pictures)

-------------------------------------------------------------------------------
-- Scoring in ETL, setup check
-------------------------------------------------------------------------------

-- (end of scoring in ETL)

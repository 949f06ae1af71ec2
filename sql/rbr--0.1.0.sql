-- rbr: Rule-Based Rewards inside PostgreSQL, install script.
--
-- Functions live in the schema CREATE EXTENSION puts the extension in
-- (@extschema@, usually public); rbr's own tables live in schema rbr.
-- Every reference is schema-qualified, and functions that run SQL pin
-- search_path, so nothing here can be redirected through search_path.

\echo Use "CREATE EXTENSION rbr" to load this file. \quit

CREATE SCHEMA rbr;
COMMENT ON SCHEMA rbr IS 'rbr: policies, models, grades and runs';
GRANT USAGE ON SCHEMA rbr TO PUBLIC;

-------------------------------------------------------------------------------
-- Policies: versioned specs (propositions, classes, response types)
-------------------------------------------------------------------------------

CREATE TABLE rbr.policy_version (
    policy     text        NOT NULL,
    version    int         NOT NULL CHECK (version > 0),
    spec       jsonb       NOT NULL,
    loaded_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    loaded_by  name        NOT NULL DEFAULT CURRENT_USER,
    PRIMARY KEY (policy, version)
);
COMMENT ON TABLE rbr.policy_version IS
    'every version of every policy ever loaded; versions are immutable';
SELECT pg_catalog.pg_extension_config_dump('rbr.policy_version', '');
GRANT SELECT ON rbr.policy_version TO PUBLIC;

-- Validate a policy spec: ERROR naming the problem and its place, else true.
CREATE FUNCTION @extschema@.rbr_policy_validate(spec jsonb) RETURNS boolean
    AS 'MODULE_PATHNAME', 'rbr_policy_validate'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-- Statement trigger: tell every backend that its cached policies (or models) are stale.
CREATE FUNCTION rbr.table_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'rbr_table_changed'
    LANGUAGE C;

CREATE TRIGGER policy_version_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rbr.policy_version
    FOR EACH STATEMENT EXECUTE FUNCTION rbr.table_changed();

-- Row trigger: a stored version never changes (fits and grades refer to it).
CREATE FUNCTION rbr.policy_version_immutable() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    RAISE EXCEPTION 'policy versions are immutable'
        USING ERRCODE = 'object_not_in_prerequisite_state',
              DETAIL = pg_catalog.format('Version %s of policy %L was updated.', OLD.version, OLD.policy),
              HINT = 'Load the new spec with rbr_policy_load(name, spec, replace => true); it becomes the next version.';
END
$$;

CREATE TRIGGER policy_version_immutable
    BEFORE UPDATE ON rbr.policy_version
    FOR EACH ROW EXECUTE FUNCTION rbr.policy_version_immutable();

-- Load (validate and store) a policy spec under a name; returns its version.
-- Loading the same spec again returns the existing version. A different spec
-- under an existing name needs replace => true and becomes version N+1.
CREATE FUNCTION @extschema@.rbr_policy_load(name text, spec jsonb, replace boolean DEFAULT false)
    RETURNS int
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    latest rbr.policy_version;
    new_version int;
BEGIN
    IF name IS NULL OR spec IS NULL OR replace IS NULL THEN
        RAISE EXCEPTION 'rbr_policy_load() arguments must not be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF name !~ '^[A-Za-z0-9_.-]{1,63}$' THEN
        RAISE EXCEPTION 'invalid policy name %', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use 1 to 63 letters, digits, ''_'', ''.'' or ''-''; ''name@N'' refers to version N.';
    END IF;
    PERFORM @extschema@.rbr_policy_validate(spec);

    -- one loader at a time per name
    PERFORM pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('rbr.policy_version'),
                                             pg_catalog.hashtext(name));
    SELECT * INTO latest FROM rbr.policy_version v
        WHERE v.policy = name ORDER BY v.version DESC LIMIT 1;
    IF FOUND THEN
        IF latest.spec = spec THEN
            RETURN latest.version;
        END IF;
        IF NOT replace THEN
            RAISE EXCEPTION 'policy % already exists with a different spec', pg_catalog.quote_literal(name)
                USING ERRCODE = 'duplicate_object',
                      DETAIL = pg_catalog.format('Its latest version is %s.', latest.version),
                      HINT = pg_catalog.format('Pass replace => true to store this spec as version %s; earlier versions stay available as ''%s@N''.',
                                               latest.version + 1, name);
        END IF;
    END IF;
    new_version := COALESCE(latest.version, 0) + 1;
    INSERT INTO rbr.policy_version (policy, version, spec) VALUES (name, new_version, spec);
    RETURN new_version;
END
$$;

-- The latest version of every policy, with what it defines.
CREATE VIEW rbr.policies AS
    SELECT DISTINCT ON (v.policy)
           v.policy AS name,
           v.version AS latest_version,
           (SELECT pg_catalog.count(*) FROM rbr.policy_version w WHERE w.policy = v.policy) AS versions,
           (SELECT pg_catalog.count(*) FROM pg_catalog.jsonb_object_keys(v.spec -> 'simple_propositions')) AS simple_propositions,
           (SELECT pg_catalog.count(*) FROM pg_catalog.jsonb_object_keys(COALESCE(v.spec -> 'derived_propositions', '{}'))) AS derived_propositions,
           pg_catalog.jsonb_array_length(v.spec -> 'completion_class_order') AS classes,
           v.loaded_at,
           v.loaded_by
      FROM rbr.policy_version v
     ORDER BY v.policy, v.version DESC;
GRANT SELECT ON rbr.policies TO PUBLIC;

-- The compiled policy: propositions, classes, and per response type the
-- needed propositions, features and label tiers (defaults resolved).
CREATE FUNCTION @extschema@.rbr_policy_info(policy text) RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rbr_policy_info'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- The response type the behavior policy assigns to a content category.
CREATE FUNCTION @extschema@.rbr_response_type(policy text, category text) RETURNS text
    AS 'MODULE_PATHNAME', 'rbr_response_type'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- The tier (0 = best) of a quality label of a response type, used to fit.
CREATE FUNCTION @extschema@.rbr_label_tier(policy text, response_type text, label text) RETURNS int
    AS 'MODULE_PATHNAME', 'rbr_label_tier'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-------------------------------------------------------------------------------
-- Classes and features
-------------------------------------------------------------------------------

-- The one completion class whose definition holds for true/false labels.
CREATE FUNCTION @extschema@.rbr_classify(policy text, response_type text, labels jsonb) RETURNS text
    AS 'MODULE_PATHNAME', 'rbr_classify'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- Class probabilities from proposition probabilities: {"ideal": 0.81, ...}.
-- mode 'product' (the paper's) or 'exact' (independent propositions).
CREATE FUNCTION @extschema@.rbr_class_probs(policy text, response_type text, probs jsonb,
                                            mode text DEFAULT 'product') RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rbr_class_probs'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- Names of a response type's features, in feature-vector order.
CREATE FUNCTION @extschema@.rbr_feature_names(policy text, response_type text) RETURNS text[]
    AS 'MODULE_PATHNAME', 'rbr_feature_names'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- A response type's feature vector from proposition probabilities.
CREATE FUNCTION @extschema@.rbr_features(policy text, response_type text, probs jsonb,
                                         mode text DEFAULT 'product') RETURNS float8[]
    AS 'MODULE_PATHNAME', 'rbr_features'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-------------------------------------------------------------------------------
-- Reward
-------------------------------------------------------------------------------

-- R_tot = base_reward + weights . features. NULL in, NULL out (a NULL
-- feature means "not graded yet"); NaN, infinity or a length mismatch: error.
CREATE FUNCTION @extschema@.rbr_reward(weights float8[], features float8[], base_reward float8 DEFAULT 0)
    RETURNS float8
    AS 'MODULE_PATHNAME', 'rbr_reward'
    LANGUAGE C IMMUTABLE STRICT PARALLEL SAFE;

-------------------------------------------------------------------------------
-- Fitting: rbr_fit aggregate, model registry, scoring with a stored model
-------------------------------------------------------------------------------

CREATE FUNCTION @extschema@.rbr_fit_transfn(internal, text, int, float8[], float8)
    RETURNS internal AS 'MODULE_PATHNAME', 'rbr_fit_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION @extschema@.rbr_fit_transfn(internal, text, int, float8[], float8, jsonb)
    RETURNS internal AS 'MODULE_PATHNAME', 'rbr_fit_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION @extschema@.rbr_rows_combine(internal, internal)
    RETURNS internal AS 'MODULE_PATHNAME', 'rbr_rows_combine' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION @extschema@.rbr_rows_serialize(internal)
    RETURNS bytea AS 'MODULE_PATHNAME', 'rbr_rows_serialize' LANGUAGE C STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.rbr_rows_deserialize(bytea, internal)
    RETURNS internal AS 'MODULE_PATHNAME', 'rbr_rows_deserialize' LANGUAGE C STRICT PARALLEL SAFE;
CREATE FUNCTION @extschema@.rbr_fit_finalfn(internal)
    RETURNS jsonb AS 'MODULE_PATHNAME', 'rbr_fit_finalfn' LANGUAGE C PARALLEL SAFE;

-- Fit one weight vector over ranked completions: pairs within a group
-- (prompt) between different tiers (0 = best), mean hinge loss with margin.
-- Use GROUP BY response_type for one vector per response type.
CREATE AGGREGATE @extschema@.rbr_fit(group_key text, tier int, features float8[], base_reward float8) (
    SFUNC = @extschema@.rbr_fit_transfn,
    STYPE = internal,
    COMBINEFUNC = @extschema@.rbr_rows_combine,
    SERIALFUNC = @extschema@.rbr_rows_serialize,
    DESERIALFUNC = @extschema@.rbr_rows_deserialize,
    FINALFUNC = @extschema@.rbr_fit_finalfn,
    PARALLEL = SAFE
);
CREATE AGGREGATE @extschema@.rbr_fit(group_key text, tier int, features float8[], base_reward float8, options jsonb) (
    SFUNC = @extschema@.rbr_fit_transfn,
    STYPE = internal,
    COMBINEFUNC = @extschema@.rbr_rows_combine,
    SERIALFUNC = @extschema@.rbr_rows_serialize,
    DESERIALFUNC = @extschema@.rbr_rows_deserialize,
    FINALFUNC = @extschema@.rbr_fit_finalfn,
    PARALLEL = SAFE
);

-- Fitted models: one weight vector per (model, response type), traceable to
-- the exact policy version whose features it weighs.
CREATE TABLE rbr.model (
    name           text        NOT NULL,
    response_type  text        NOT NULL,
    policy         text        NOT NULL,
    policy_version int         NOT NULL,
    feature_names  text[]      NOT NULL,
    weights        float8[]    NOT NULL,
    report         jsonb       NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT pg_catalog.now(),
    created_by     name        NOT NULL DEFAULT CURRENT_USER,
    PRIMARY KEY (name, response_type),
    FOREIGN KEY (policy, policy_version) REFERENCES rbr.policy_version (policy, version),
    CHECK (pg_catalog.cardinality(weights) = pg_catalog.cardinality(feature_names))
);
COMMENT ON TABLE rbr.model IS 'fitted RBR weights per model and response type';
SELECT pg_catalog.pg_extension_config_dump('rbr.model', '');
GRANT SELECT ON rbr.model TO PUBLIC;

CREATE TRIGGER model_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rbr.model
    FOR EACH STATEMENT EXECUTE FUNCTION rbr.table_changed();

-- Store (or replace) the weights of an rbr_fit() report as a model for one
-- response type of a policy; returns the stored row.
CREATE FUNCTION @extschema@.rbr_model_save(model text, policy text, response_type text, fit jsonb)
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

-- R_tot = base_reward + w . features with the weights of a stored model.
CREATE FUNCTION @extschema@.rbr_reward(model text, response_type text, features float8[], base_reward float8)
    RETURNS float8
    AS 'MODULE_PATHNAME', 'rbr_model_reward'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-------------------------------------------------------------------------------
-- Evaluation
-------------------------------------------------------------------------------

CREATE FUNCTION @extschema@.rbr_pair_accuracy_transfn(internal, text, int, float8)
    RETURNS internal AS 'MODULE_PATHNAME', 'rbr_pair_accuracy_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION @extschema@.rbr_pair_accuracy_finalfn(internal)
    RETURNS float8 AS 'MODULE_PATHNAME', 'rbr_pair_accuracy_finalfn' LANGUAGE C PARALLEL SAFE;

-- Share of ordered pairs (same group, different tiers) that a score ranks
-- right; ties count as wrong. 1 - rbr_pair_accuracy() is the paper's error rate.
CREATE AGGREGATE @extschema@.rbr_pair_accuracy(group_key text, tier int, score float8) (
    SFUNC = @extschema@.rbr_pair_accuracy_transfn,
    STYPE = internal,
    COMBINEFUNC = @extschema@.rbr_rows_combine,
    SERIALFUNC = @extschema@.rbr_rows_serialize,
    DESERIALFUNC = @extschema@.rbr_rows_deserialize,
    FINALFUNC = @extschema@.rbr_pair_accuracy_finalfn,
    PARALLEL = SAFE
);

CREATE FUNCTION @extschema@.rbr_pair_errors_transfn(internal, text, int, text, float8, float8)
    RETURNS internal AS 'MODULE_PATHNAME', 'rbr_pair_errors_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION @extschema@.rbr_pair_errors_finalfn(internal)
    RETURNS jsonb AS 'MODULE_PATHNAME', 'rbr_pair_errors_finalfn' LANGUAGE C PARALLEL SAFE;

-- The paper's reward-signal error rates: share of ordered pairs ranked wrong
-- by the reward model alone (rm), by rm + rbr, and by rbr alone; overall and
-- per (better label, worse label). Use GROUP BY response_type.
CREATE AGGREGATE @extschema@.rbr_pair_errors(group_key text, tier int, label text, rm float8, rbr float8) (
    SFUNC = @extschema@.rbr_pair_errors_transfn,
    STYPE = internal,
    COMBINEFUNC = @extschema@.rbr_rows_combine,
    SERIALFUNC = @extschema@.rbr_rows_serialize,
    DESERIALFUNC = @extschema@.rbr_rows_deserialize,
    FINALFUNC = @extschema@.rbr_pair_errors_finalfn,
    PARALLEL = SAFE
);

-- Histogram of values per label as a text table: one row per (label, bin),
-- with the bin's range, count, share of the label's values and a bar.
-- Typical input: rewards centred on each prompt's mean tier-0 reward,
--   rbr_histogram(array_agg(label), array_agg(reward - avg(reward) FILTER (WHERE tier = 0) OVER (PARTITION BY prompt)))
CREATE FUNCTION @extschema@.rbr_histogram(labels text[], vals float8[], bins int DEFAULT 20)
    RETURNS TABLE (label text, bin int, low float8, high float8, count bigint, share float8, bar text)
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
WITH v AS (
    SELECT coalesce(u.l, '(none)') AS l, u.x FROM unnest(labels, vals) AS u(l, x) WHERE u.x IS NOT NULL
), r AS (
    SELECT min(x) AS lo, greatest(max(x), min(x) + 1e-9) AS hi FROM v
), c AS (
    SELECT v.l, least(greatest(width_bucket(v.x, r.lo, r.hi, bins), 1), bins) AS b, count(*) AS n
      FROM v, r GROUP BY 1, 2
), t AS (
    SELECT v.l, count(*) AS total FROM v GROUP BY 1
), m AS (
    SELECT max(c.n::float8 / t.total) AS top FROM c JOIN t USING (l)
)
SELECT t.l, g.b, r.lo + (r.hi - r.lo) * (g.b - 1) / bins, r.lo + (r.hi - r.lo) * g.b / bins,
       coalesce(c.n, 0), coalesce(c.n, 0)::float8 / t.total,
       repeat('#', round(40 * coalesce(c.n, 0)::float8 / t.total / m.top)::int)
  FROM t CROSS JOIN generate_series(1, bins) AS g(b) CROSS JOIN r CROSS JOIN m
  LEFT JOIN c ON c.l = t.l AND c.b = g.b
 WHERE bins > 0
 ORDER BY 1, 2
$$;

-- The same histogram as an SVG picture (one step line per label, the share
-- of the label's values per bin; a dashed line at 0). Save it with
--   psql -Atc "SELECT rbr_histogram_svg(...)" > rewards.svg
CREATE FUNCTION @extschema@.rbr_histogram_svg(labels text[], vals float8[], bins int DEFAULT 40,
                                              title text DEFAULT 'reward minus the prompt''s mean tier-0 reward')
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    w int;  h constant int := 380;  right_m int;
    left_m constant int := 60;  top_m constant int := 40;  bottom_m constant int := 40;
    colors constant text[] := ARRAY['#1b9e77', '#d95f02', '#7570b3', '#e7298a', '#66a61e', '#e6ab02', '#a6761d', '#666666'];
    lo float8;  hi float8;  top float8;
    svg text;  pts text;  lab record;  i int := 0;  x float8;  y float8;  px float8;
BEGIN
    IF bins IS NULL OR bins < 1 OR bins > 1000 THEN
        RAISE EXCEPTION 'bins must be between 1 and 1000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT min(low), max(high), max(share), max(length(label)) INTO lo, hi, top, right_m
      FROM @extschema@.rbr_histogram(labels, vals, bins);
    IF lo IS NULL THEN
        RAISE EXCEPTION 'no values to draw' USING ERRCODE = 'no_data_found';
    END IF;
    -- room for the legend: its longest label and count
    right_m := greatest(160, 90 + 8 * right_m);
    w := 560 + right_m;
    svg := format('<svg xmlns="http://www.w3.org/2000/svg" width="%s" height="%s" font-family="sans-serif" font-size="12">', w, h)
        || format('<rect width="%s" height="%s" fill="white"/>', w, h)
        || format('<text x="%s" y="22" font-size="14">%s</text>', left_m,
                  replace(replace(replace(title, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'))
        || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', left_m, h - bottom_m, w - right_m, h - bottom_m)
        || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', left_m, top_m, left_m, h - bottom_m)
        || format('<text x="%s" y="%s" text-anchor="middle">%s</text>', left_m, h - bottom_m + 16, round(lo::numeric, 2))
        || format('<text x="%s" y="%s" text-anchor="middle">%s</text>', w - right_m, h - bottom_m + 16, round(hi::numeric, 2))
        || format('<text x="%s" y="%s" text-anchor="end">%s</text>', left_m - 4, top_m + 4, round(top::numeric, 3))
        || format('<text x="%s" y="%s" text-anchor="end">0</text>', left_m - 4, h - bottom_m)
        || format('<text x="12" y="%s" transform="rotate(-90 12 %s)" text-anchor="middle">share of the label''s completions</text>',
                  (top_m + h - bottom_m) / 2, (top_m + h - bottom_m) / 2);
    IF lo < 0 AND hi > 0 THEN
        px := left_m + (0 - lo) / (hi - lo) * (w - left_m - right_m);
        svg := svg || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#999" stroke-dasharray="4 3"/>', round(px::numeric, 1), top_m, round(px::numeric, 1), h - bottom_m)
                   || format('<text x="%s" y="%s" text-anchor="middle">0</text>', round(px::numeric, 1), h - bottom_m + 16);
    END IF;
    FOR lab IN SELECT label, sum(count) AS n FROM @extschema@.rbr_histogram(labels, vals, bins) GROUP BY label ORDER BY label LOOP
        i := i + 1;
        pts := '';
        FOR x, y, px IN SELECT low, share, high FROM @extschema@.rbr_histogram(labels, vals, bins) hh WHERE hh.label = lab.label ORDER BY bin LOOP
            pts := pts || format('%s,%s %s,%s ',
                round((left_m + (x - lo) / (hi - lo) * (w - left_m - right_m))::numeric, 1),
                round((h - bottom_m - y / top * (h - top_m - bottom_m))::numeric, 1),
                round((left_m + (px - lo) / (hi - lo) * (w - left_m - right_m))::numeric, 1),
                round((h - bottom_m - y / top * (h - top_m - bottom_m))::numeric, 1));
        END LOOP;
        svg := svg || format('<polyline fill="none" stroke-width="2" stroke="%s" points="%s"/>', colors[1 + (i - 1) % 8], btrim(pts))
                   || format('<rect x="%s" y="%s" width="12" height="12" fill="%s"/>', w - right_m + 16, top_m + (i - 1) * 20, colors[1 + (i - 1) % 8])
                   || format('<text x="%s" y="%s">%s (%s)</text>', w - right_m + 34, top_m + (i - 1) * 20 + 11,
                             replace(replace(replace(lab.label, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), lab.n);
    END LOOP;
    RETURN svg || '</svg>';
END
$$;

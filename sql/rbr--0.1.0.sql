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

-- Statement trigger: tell every backend that its cached policies are stale.
CREATE FUNCTION rbr.policy_changed() RETURNS trigger
    AS 'MODULE_PATHNAME', 'rbr_policy_changed'
    LANGUAGE C;

CREATE TRIGGER policy_version_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON rbr.policy_version
    FOR EACH STATEMENT EXECUTE FUNCTION rbr.policy_changed();

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
-- Grader: ask an OpenAI-compatible LLM grader for P(yes) of propositions
-------------------------------------------------------------------------------
-- Functions that reach the network (and spend money) are revoked from
-- PUBLIC. Grant them, with the cache table, to the roles that may spend:
--   GRANT EXECUTE ON FUNCTION rbr_grade(text, text, jsonb, text),
--         rbr_grade_many(text, text[], jsonb[], text[]) TO grader_role;
--   GRANT EXECUTE ON PROCEDURE rbr_featurize(regclass, text, jsonb) TO grader_role;
--   GRANT SELECT, INSERT ON rbr.grade_cache TO grader_role;
--   GRANT SELECT, INSERT, UPDATE ON rbr.featurize_run TO grader_role;
--   GRANT USAGE ON SEQUENCE rbr.featurize_run_run_id_seq TO grader_role;

-- Successful answers, keyed by the sha256 of everything that decides them
-- (endpoint kind, model, template, proposition prompt, conversation,
-- completion, request parameters). Errors are never cached.
CREATE TABLE rbr.grade_cache (
    key               bytea       PRIMARY KEY CHECK (pg_catalog.length(key) = 32),
    model             text        NOT NULL,
    proposition       text        NOT NULL,
    probability       float8      NOT NULL CHECK (probability >= 0 AND probability <= 1),
    method            text        NOT NULL CHECK (method IN ('logprobs', 'text')),
    yes_no_mass       float8,
    prompt_tokens     int,
    completion_tokens int,
    created_at        timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE rbr.grade_cache IS
    'grader answers by sha256 of the request; only successful answers';

-- P(yes) of one simple proposition for one completion, through the cache.
-- ERROR with the reason when the grader fails (after retries).
CREATE FUNCTION @extschema@.rbr_grade(policy text, proposition text, prompt jsonb, completion text)
    RETURNS float8
    AS 'MODULE_PATHNAME', 'rbr_grade'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
REVOKE EXECUTE ON FUNCTION @extschema@.rbr_grade(text, text, jsonb, text) FROM PUBLIC;

-- Many questions at once (concurrently, through the cache): one row per
-- question, ord = position in the arrays; failures are rows with status
-- 'error' and the reason, never a probability.
CREATE FUNCTION @extschema@.rbr_grade_many(policy text, propositions text[], prompts jsonb[], completions text[],
    OUT ord int, OUT proposition text, OUT status text, OUT probability float8, OUT method text,
    OUT yes_no_mass float8, OUT model text, OUT error text, OUT attempts int,
    OUT prompt_tokens int, OUT completion_tokens int, OUT cached boolean)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_grade_many'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
REVOKE EXECUTE ON FUNCTION @extschema@.rbr_grade_many(text, text[], jsonb[], text[]) FROM PUBLIC;

-- The request body rbr would send for one question (no network, no key).
CREATE FUNCTION @extschema@.rbr_grader_request(policy text, proposition text, prompt jsonb, completion text)
    RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rbr_grader_request'
    LANGUAGE C STABLE STRICT PARALLEL SAFE;

-- This backend's grader engine: libcurl features, live handles, counters.
CREATE FUNCTION @extschema@.rbr_grader_stats() RETURNS jsonb
    AS 'MODULE_PATHNAME', 'rbr_grader_stats'
    LANGUAGE C VOLATILE PARALLEL RESTRICTED;

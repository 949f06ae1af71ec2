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

-- (end of policies and models)

-------------------------------------------------------------------------------
-- Graders: request settings, answer reading, failures
-------------------------------------------------------------------------------

-- A value records its method ('sampled': the share of yes over samples
-- answers). Rows of 0.1.0 keep theirs; their keys (layout v1) are never asked
-- for again, so a 'text' value is never served.
ALTER TABLE rbr.grade_cache DROP CONSTRAINT grade_cache_method_check;
ALTER TABLE rbr.grade_cache ADD CONSTRAINT grade_cache_method_check
    CHECK (method IN ('logprobs', 'sampled', 'text'));
ALTER TABLE rbr.grade_cache ADD COLUMN samples int CHECK (samples > 0);

-- rbr_grade_many: three more output columns (samples, cached_tokens,
-- reasoning_tokens). The output row type changes, so the function is
-- recreated; EXECUTE grants given on it under 0.1.0 must be given again.
DROP FUNCTION @extschema@.rbr_grade_many(text, text[], jsonb[], text[]);
CREATE FUNCTION @extschema@.rbr_grade_many(policy text, propositions text[], prompts jsonb[], completions text[],
    OUT ord int, OUT proposition text, OUT status text, OUT probability float8, OUT method text,
    OUT yes_no_mass float8, OUT model text, OUT error text, OUT attempts int,
    OUT prompt_tokens int, OUT completion_tokens int, OUT cached boolean,
    OUT samples int, OUT cached_tokens int, OUT reasoning_tokens int)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_grade_many'
    LANGUAGE C VOLATILE STRICT PARALLEL UNSAFE;
REVOKE EXECUTE ON FUNCTION @extschema@.rbr_grade_many(text, text[], jsonb[], text[]) FROM PUBLIC;

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

-- rbr 0.2.0 -> 0.3.0 (ALTER EXTENSION rbr UPDATE TO '0.3.0').
--
-- After this script the catalog equals a fresh install of 0.3.0
-- (sql/rbr--0.3.0.sql); test/t/015_upgrade.t compares the two.
\echo Use "ALTER EXTENSION rbr UPDATE TO '0.3.0'" to load this file. \quit

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

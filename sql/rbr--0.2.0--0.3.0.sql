-- rbr 0.2.0 -> 0.3.0 (ALTER EXTENSION rbr UPDATE TO '0.3.0').
--
-- After this script the catalog equals a fresh install of 0.3.0
-- (sql/rbr--0.3.0.sql); test/t/015_upgrade.t compares the two.
\echo Use "ALTER EXTENSION rbr UPDATE TO '0.3.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Fitting at scale: the aggregate state type and the scale-out fit
-------------------------------------------------------------------------------
-- (section: fitting)

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
CREATE FUNCTION rbr.fit_rows_transfn(float8[], int, float8[], float8, boolean)
    RETURNS float8[] AS 'MODULE_PATHNAME', 'rbr_fit_rows_transfn' LANGUAGE C PARALLEL SAFE;
CREATE FUNCTION rbr.fit_rows_combine(float8[], float8[])
    RETURNS float8[] AS 'MODULE_PATHNAME', 'rbr_fit_rows_combine' LANGUAGE C STRICT PARALLEL SAFE;
-- The row check of a group: {complete rows, skipped rows, features, lowest
-- tier, highest tier}; errors on the values rbr_fit refuses.
CREATE AGGREGATE rbr.fit_rows(tier int, features float8[], base_reward float8, key_present boolean) (
    SFUNC = rbr.fit_rows_transfn,
    STYPE = float8[],
    COMBINEFUNC = rbr.fit_rows_combine,
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

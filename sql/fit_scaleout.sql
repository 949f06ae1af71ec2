-- rbr_fit_table: the rbr_fit optimum by SQL passes over a table, never
-- gathering its rows; compared with the rbr_fit aggregate on the same data.
SELECT setseed(0.1);
CREATE TABLE so_comp AS
SELECT g::text AS prompt, CASE WHEN g % 2 = 0 THEN 'hard_refuse' ELSE 'comply' END AS rt,
       c AS tier,
       ARRAY[least(1, (c = 0)::int * 0.7 + random() * 0.3),
             least(1, (c = 2)::int * 0.6 + random() * 0.4),
             random()]::float8[] AS f,
       (c = 2)::int * 0.8 + random() AS rm
  FROM generate_series(1, 300) g, generate_series(0, 2) c, generate_series(1, 3) k;

-- a comparison of two reports: same pairs and split, weights and objective
-- within tolerance, and the certified gap of rbr_fit_table within its tol
CREATE FUNCTION so_same(a jsonb, t jsonb) RETURNS TABLE (pairs_equal boolean, groups_equal boolean,
        converged boolean, gap_within_tol boolean, objective_close boolean, weights_close boolean)
LANGUAGE sql AS $$
SELECT a->'pairs' = t->'pairs', (a->'groups', a->'groups_without_pairs', a->'rows', a->'rows_skipped_null')
         = (t->'groups', t->'groups_without_pairs', t->'rows', t->'rows_skipped_null'),
       (t->>'converged')::boolean,
       (t->>'gap')::float8 <= (t->'options'->>'tol')::float8 * greatest((t->>'objective')::float8, 1e-6),
       abs((a->>'objective')::float8 - (t->>'objective')::float8) <= 1e-8 * greatest((a->>'objective')::float8, 1e-6),
       (SELECT bool_and(abs(x.v::float8 - y.v::float8) <= 1e-4 * (1 + abs(x.v::float8)))
          FROM jsonb_array_elements_text(a->'weights') WITH ORDINALITY x(v, i)
          JOIN jsonb_array_elements_text(t->'weights') WITH ORDINALITY y(v, i) USING (i))
$$;

-- data set 1: the whole table
CREATE TABLE so_fit1 AS
SELECT (SELECT rbr_fit(prompt, tier, f, rm) FROM so_comp) AS a,
       rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm') AS t;
SELECT s.* FROM so_fit1, so_same(a, t) s;
-- the report has rbr_fit's keys (and the barrier parameter it stopped at)
SELECT ARRAY(SELECT jsonb_object_keys(t) EXCEPT SELECT jsonb_object_keys(a) ORDER BY 1) AS extra_keys,
       ARRAY(SELECT jsonb_object_keys(a) EXCEPT SELECT jsonb_object_keys(t) ORDER BY 1) AS missing_keys,
       t->>'solver' AS solver, (t->>'passes')::int > 2 AS several_passes,
       t->'accuracy' = a->'accuracy' AS same_accuracy
  FROM so_fit1;

-- data set 2: synthetic comparisons in the paper's shape, one response type
-- picked by where_column/where_value, with options
\set prompts 48
\set seed 0.25
\i test/bench/gen_comparisons.sql
SELECT s.*
  FROM (SELECT rbr_fit(prompt::text, tier, features, rm,
                       '{"l2": 0.001, "margin": 0.5, "tier_margin": {"0": 1}, "fixed_zero": [3], "validation_fraction": 0.2, "seed": 3}') AS a
          FROM comparisons WHERE rt = 'comply') x,
       LATERAL (SELECT rbr_fit_table('comparisons', 'prompt', 'tier', 'features', 'rm',
                       '{"l2": 0.001, "margin": 0.5, "tier_margin": {"0": 1}, "fixed_zero": [3], "validation_fraction": 0.2, "seed": 3}',
                       where_column => 'rt', where_value => 'comply') AS t) y,
       so_same(a, t) s;
SELECT (t->'weights'->>2)::float8 AS fixed_weight, t->'options'->'fixed_zero' AS fixed_zero,
       t->'pairs'->>'validation' <> '0' AS has_validation
  FROM (SELECT rbr_fit_table('comparisons', 'prompt', 'tier', 'features', 'rm',
               '{"l2": 0.001, "fixed_zero": [3], "validation_fraction": 0.2}', 'rt', 'comply') AS t) s;

-- a small working set: the band around the kink is narrowed until it fits,
-- the rest comes as sums; the optimum is the same
SELECT s.*, (t->'options'->>'working_set')::int AS working_set
  FROM (SELECT (SELECT a FROM so_fit1) AS a,
               rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', '{"working_set": 100}') AS t) x,
       so_same(a, t) s;
-- too few passes: not converged, and says so with its honest gap
SELECT (t->>'converged')::boolean AS converged, (t->>'passes')::int AS passes,
       (t->>'gap')::float8 > (t->'options'->>'tol')::float8 * (t->>'objective')::float8 AS gap_above_tol
  FROM (SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', '{"max_iter": 2}') AS t) s;

-- rows with NULLs are skipped and counted, as rbr_fit does
CREATE TABLE so_nulls AS SELECT * FROM so_comp;
UPDATE so_nulls SET f = NULL WHERE prompt = '7' AND tier = 0;
UPDATE so_nulls SET f = ARRAY[0.5, NULL, 0.5] WHERE prompt = '8' AND tier = 1;
UPDATE so_nulls SET rm = NULL WHERE prompt = '9';
UPDATE so_nulls SET tier = NULL WHERE prompt = '10' AND tier = 2;
UPDATE so_nulls SET prompt = NULL WHERE prompt = '11';
SELECT s.*, (t->>'rows_skipped_null')::int AS skipped
  FROM (SELECT (SELECT rbr_fit(prompt, tier, f, rm) FROM so_nulls) AS a,
               rbr_fit_table('so_nulls', 'prompt', 'tier', 'f', 'rm') AS t) x, so_same(a, t) s;

-- under a forced parallel plan: one pass's query aggregates partially in the
-- workers, and the fit is the same
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
SELECT rbr.fit_table_pass_query('so_comp', 'prompt', 'tier', 'f', 'rm') AS pass_query \gset
PREPARE so_pass(float8[], text) AS :pass_query;
EXPLAIN (COSTS OFF) EXECUTE so_pass('{3,0.1,1,0.05,0,0,1,0,0,0,0,0,0,0}', NULL);
-- the working-set pass too (its state: sums and a bounded working set)
SELECT rbr.fit_table_pass_query('so_comp', 'prompt', 'tier', 'f', 'rm', pass => 'working_set') AS band_query \gset
PREPARE so_band(float8[], text) AS :band_query;
EXPLAIN (COSTS OFF) EXECUTE so_band('{3,1e-6,1,0.05,0,0,0.1,100,0,0,0}', NULL);
SELECT rbr.fit_table_pass_query('so_comp', 'prompt', 'tier', 'f', 'rm', pass => 'final');
-- (the same optimum, equal to rounding: the sums add up in another order)
SELECT s.*, (SELECT bool_and(q.weights_close AND q.objective_close) FROM so_same((SELECT t FROM so_fit1), p) q) AS same_as_serial
  FROM (SELECT (SELECT a FROM so_fit1) AS a, rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm') AS p) x, so_same(a, p) s;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;
-- the where filter in the pass query compares with a parameter, never with spliced text
SELECT rbr.fit_table_pass_query('comparisons', 'prompt', 'tier', 'features', 'rm', '{}', 'rt', 'x''; DROP TABLE so_comp; --') AS q;

-- bad input
SELECT rbr_fit_table('so_comp', 'nope', 'tier', 'f', 'rm');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm"; DROP TABLE so_comp; --');
SELECT rbr_fit_table('so_comp', 'prompt', 'ctid', 'f', 'rm');
SELECT rbr_fit_table('so_comp', 'prompt', 'rt', 'f', 'rm');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'rm', 'rm');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rt');
SELECT rbr_fit_table('so_comp', NULL, 'tier', 'f', 'rm');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', where_column => 'rt');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', where_value => 'comply');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', where_column => 'nope', where_value => 'x');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', '{"solver": "adamw"}');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', '{"lerning_rate": 1}');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', '{"fixed_zero": [4]}');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', '[]');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', '{"working_set": 1}');
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', where_column => 'rt', where_value => 'no such type');
-- no pairs: every group has a single tier
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm', where_column => 'tier', where_value => '1');
-- no rows at all: NULL, as the aggregate; only incomplete rows: an error
CREATE TABLE so_empty (LIKE so_comp);
SELECT rbr_fit_table('so_empty', 'prompt', 'tier', 'f', 'rm') IS NULL AS empty_is_null;
INSERT INTO so_empty VALUES ('1', 'comply', 0, NULL, 0.5);
SELECT rbr_fit_table('so_empty', 'prompt', 'tier', 'f', 'rm');
-- values rbr_fit refuses
INSERT INTO so_empty VALUES ('1', 'comply', -1, '{0.5}', 0.5);
SELECT rbr_fit_table('so_empty', 'prompt', 'tier', 'f', 'rm');
TRUNCATE so_empty;
INSERT INTO so_empty VALUES ('1', 'comply', 0, '{0.5, 0.5}', 0.5), ('1', 'comply', 1, '{0.5}', 0.5);
SELECT rbr_fit_table('so_empty', 'prompt', 'tier', 'f', 'rm');
TRUNCATE so_empty;
INSERT INTO so_empty VALUES ('1', 'comply', 0, '{NaN}', 0.5), ('1', 'comply', 1, '{0.5}', 0.5);
SELECT rbr_fit_table('so_empty', 'prompt', 'tier', 'f', 'rm');

-- the caller reads the table as itself: no privilege, no fit (and the error
-- says which column); with column privileges on what is used, it fits
CREATE ROLE rbr_so_reader;
SET ROLE rbr_so_reader;
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm');
RESET ROLE;
GRANT SELECT (prompt, tier, f) ON so_comp TO rbr_so_reader;
SET ROLE rbr_so_reader;
SELECT rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm');
RESET ROLE;
GRANT SELECT (rm) ON so_comp TO rbr_so_reader;
SET ROLE rbr_so_reader;
SELECT (rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm')->>'converged')::boolean AS reader_fits;
RESET ROLE;
-- row-level security applies to the caller's passes
ALTER TABLE so_comp ENABLE ROW LEVEL SECURITY;
CREATE POLICY so_comply ON so_comp TO rbr_so_reader USING (rt = 'comply');
SET ROLE rbr_so_reader;
SELECT (rbr_fit_table('so_comp', 'prompt', 'tier', 'f', 'rm')->>'groups')::int AS groups_seen;
RESET ROLE;
DROP POLICY so_comply ON so_comp;
ALTER TABLE so_comp DISABLE ROW LEVEL SECURITY;
REVOKE ALL ON so_comp FROM rbr_so_reader;
DROP ROLE rbr_so_reader;

DROP TABLE so_comp, so_fit1, so_nulls, so_empty, comparisons;
DROP FUNCTION so_same(jsonb, jsonb);

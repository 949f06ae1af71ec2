-- rbr_fit: fitting weights over ranked completions; models; pair accuracy.
-- Synthetic data: 300 prompts, 3 tiers x 3 completions each. Feature 1 marks
-- good completions, feature 2 bad ones, feature 3 is noise; the reward
-- model (rm) prefers the worst tier, as a helpful-only model would prefer
-- compliance, so RM alone mis-ranks pairs.
SELECT setseed(0.1);
CREATE TABLE comp AS
SELECT g::text AS prompt, CASE WHEN g % 2 = 0 THEN 'hard_refuse' ELSE 'comply' END AS rt,
       c AS tier,
       ARRAY[least(1, (c = 0)::int * 0.7 + random() * 0.3),
             least(1, (c = 2)::int * 0.6 + random() * 0.4),
             random()]::float8[] AS f,
       (c = 2)::int * 0.8 + random() AS rm
  FROM generate_series(1, 300) g, generate_series(0, 2) c, generate_series(1, 3) k;

-- the exact solver: converged with a certificate, and it ranks better than RM
SELECT r->'pairs' AS pairs, (r->>'converged')::boolean AS converged,
       (r->>'gap')::float8 <= 1e-9 * greatest((r->>'objective')::float8, 1e-12) AS gap_within_tol,
       (r->'accuracy'->>'train')::float8 > 0.9 AS train_accurate,
       (r->'accuracy'->>'validation')::float8 > 0.9 AS validation_accurate,
       (r->'weights'->>0)::float8 > 0 AS good_weight_positive,
       (r->'weights'->>1)::float8 < 0 AS bad_weight_negative
  FROM (SELECT rbr_fit(prompt, tier, f, rm) r FROM comp) s;
SELECT round(rbr_pair_accuracy(prompt, tier, rm)::numeric, 4) AS rm_only_accuracy FROM comp;

-- the result does not depend on row order (the final function sorts)
SELECT (SELECT rbr_fit(prompt, tier, f, rm) FROM (SELECT * FROM comp ORDER BY random()) s)
     = (SELECT rbr_fit(prompt, tier, f, rm) FROM (SELECT * FROM comp ORDER BY prompt DESC, tier DESC) s)
       AS order_independent;

-- under a parallel plan: partial aggregates, and the same weights
CREATE TABLE serial_fit AS SELECT rbr_fit(prompt, tier, f, rm) AS r FROM comp;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF) SELECT rbr_fit(prompt, tier, f, rm) FROM comp;
SELECT (SELECT r FROM serial_fit) = rbr_fit(prompt, tier, f, rm) AS parallel_equals_serial FROM comp;
EXPLAIN (COSTS OFF) SELECT rbr_pair_accuracy(prompt, tier, rm) FROM comp;
SELECT round(rbr_pair_accuracy(prompt, tier, rm)::numeric, 4) AS rm_only_accuracy_parallel FROM comp;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;

-- the state type rbr.fit_rows: an aggregate without final function returns it
CREATE AGGREGATE fit_rows_of(text, int, float8[], float8) (SFUNC = rbr.fit_transfn, STYPE = rbr.fit_rows);
CREATE AGGREGATE score_rows_of(text, int, float8) (SFUNC = rbr.pair_accuracy_transfn, STYPE = rbr.fit_rows);
CREATE TABLE states AS
SELECT (SELECT fit_rows_of(prompt, tier, f, rm) FROM comp) AS fit,
       (SELECT score_rows_of(k, t, s) FROM (VALUES ('a', 0, 2.0), ('a', 1, 1.0)) v(k, t, s)) AS two;
-- text round trip: same rows, same fit; the text is versioned and the binary form is the same bytes
SELECT left(fit::text, 5) AS prefix,
       rbr.fit_finalfn(fit::text::rbr.fit_rows) = (SELECT r FROM serial_fit) AS text_round_trip,
       fit::text::rbr.fit_rows::text = fit::text AS text_stable,
       rbr.fit_rows_send(fit) = decode(substr(fit::text, 6), 'base64') AS send_is_flat_form
  FROM states;
SELECT rbr.pair_accuracy_finalfn(two::text::rbr.fit_rows) AS two_rows_accuracy FROM states;
-- crafted values: a clear error, never a crash (bytes 0..3 magic, 20..27 nrows, then the sections)
CREATE FUNCTION craft(b bytea) RETURNS rbr.fit_rows LANGUAGE sql AS
$$ SELECT ('rbr2:' || translate(encode(b, 'base64'), E'\n', ''))::rbr.fit_rows $$;
SELECT craft(set_byte(decode(substr(two::text, 6), 'base64'), 0, 0)) FROM states;
SELECT ('rbr1:' || substr(two::text, 6))::rbr.fit_rows FROM states;
SELECT 'hello'::rbr.fit_rows;
SELECT 'rbr2:not base64!'::rbr.fit_rows;
SELECT craft('\x52'::bytea);
SELECT craft(substring(decode(substr(two::text, 6), 'base64') FROM 1 FOR length(decode(substr(two::text, 6), 'base64')) - 8)) FROM states;
SELECT craft(set_byte(decode(substr(two::text, 6), 'base64'), 20, 3)) FROM states;
SELECT craft(set_byte(decode(substr(two::text, 6), 'base64'), 27, 128)) FROM states;
-- rows of two: base at 44, key offsets at 60, tiers at 76, keys at 84
SELECT craft(set_byte(decode(substr(two::text, 6), 'base64'), 60, 100)) FROM states;
SELECT craft(set_byte(decode(substr(two::text, 6), 'base64'), 79, 255)) FROM states;
SELECT craft(overlay(decode(substr(two::text, 6), 'base64') PLACING '\x000000000000f87f'::bytea FROM 45 FOR 8)) FROM states;
SELECT craft(set_byte(decode(substr(two::text, 6), 'base64'), length(decode(substr(two::text, 6), 'base64')) - 1, 65)) FROM states;
-- the support functions refuse to run outside an aggregate
SELECT rbr.fit_rows_combine(two, two) FROM states;
SELECT rbr.fit_transfn(NULL, 'a', 0, '{1}', 0);

-- rbr_pair_counts: (correct, tied, pairs); by hand as rbr_pair_accuracy above (tie in group b)
SELECT (rbr_pair_counts(k, t, s)).* FROM (VALUES ('a', 0, 3.0), ('a', 1, 2.0), ('a', 2, 1.0), ('a', 2, 5.0),
       ('b', 0, 1.0), ('b', 1, 1.0), ('c', 0, 1.0), ('c', 0, 2.0), ('d', NULL, 1.0)) v(k, t, s);
SELECT rbr_pair_counts(k, t, s) AS single_tier FROM (VALUES ('c', 0, 1.0), ('c', 0, 2.0)) v(k, t, s);
-- two levels (per prompt, then sum) equal the one-level accuracy
SELECT sum((c).correct)::float8 / sum((c).pairs) = (SELECT rbr_pair_accuracy(prompt, tier, rm) FROM comp) AS two_level_equals,
       sum((c).pairs) AS pairs, sum((c).tied) AS tied
  FROM (SELECT prompt, rbr_pair_counts(prompt, tier, rm) AS c FROM comp GROUP BY prompt) s;

-- per-prompt states under every grouping strategy: hashed, hashed and spilled to disk, sorted;
-- and as a window aggregate
CREATE TABLE per_prompt AS SELECT prompt, rbr_pair_counts(prompt, tier, rm) AS c FROM comp GROUP BY prompt;
SET enable_sort = off;
SET work_mem = '64kB';
SELECT count(*) AS prompts, bool_and(p.c = h.c) AS spilled_equal
  FROM per_prompt p JOIN (SELECT prompt, rbr_pair_counts(prompt, tier, rm) AS c FROM comp GROUP BY prompt) h USING (prompt);
RESET work_mem;
RESET enable_sort;
SET enable_hashagg = off;
SELECT count(*) AS prompts, bool_and(p.c = g.c) AS sorted_equal
  FROM per_prompt p JOIN (SELECT prompt, rbr_pair_counts(prompt, tier, rm) AS c FROM comp GROUP BY prompt) g USING (prompt);
RESET enable_hashagg;
SELECT count(DISTINCT a) AS distinct_values, bool_and(a = (SELECT rbr_pair_accuracy(prompt, tier, rm) FROM comp)) AS whole_frame_equal
  FROM (SELECT rbr_pair_accuracy(prompt, tier, rm) OVER () AS a FROM comp) w;
SELECT (array_agg(a ORDER BY n DESC))[1] = (SELECT rbr_pair_accuracy(prompt, tier, rm) FROM comp WHERE prompt::int > 290) AS moving_frame_equal
  FROM (SELECT row_number() OVER (ORDER BY prompt::int, tier, rm) AS n,
               rbr_pair_accuracy(prompt, tier, rm) OVER (ORDER BY prompt::int, tier, rm ROWS BETWEEN 89 PRECEDING AND CURRENT ROW) AS a
          FROM comp) w;

-- partitionwise aggregation over a partitioned table, grouped by something else than the
-- partition key: partial aggregates per partition, combined; the same results
CREATE TABLE comp_part (LIKE comp) PARTITION BY LIST (rt);
CREATE TABLE comp_part_r PARTITION OF comp_part FOR VALUES IN ('hard_refuse');
CREATE TABLE comp_part_c PARTITION OF comp_part FOR VALUES IN ('comply');
INSERT INTO comp_part SELECT * FROM comp;
ANALYZE comp_part;
CREATE TABLE whole AS
SELECT prompt::int % 3 AS third, rbr_pair_accuracy(prompt, tier, rm) AS acc, rbr_fit(prompt, tier, f, rm) AS fit
  FROM comp_part GROUP BY 1;
SET enable_partitionwise_aggregate = on;
SET max_parallel_workers_per_gather = 0;
EXPLAIN (COSTS OFF) SELECT prompt::int % 3, rbr_pair_accuracy(prompt, tier, rm), rbr_fit(prompt, tier, f, rm) FROM comp_part GROUP BY 1;
SELECT bool_and(w.acc = p.acc AND w.fit = p.fit) AS partitionwise_equals, count(*) AS groups
  FROM whole w JOIN (SELECT prompt::int % 3 AS third, rbr_pair_accuracy(prompt, tier, rm) AS acc, rbr_fit(prompt, tier, f, rm) AS fit
                       FROM comp_part GROUP BY 1) p USING (third);
RESET enable_partitionwise_aggregate;
RESET max_parallel_workers_per_gather;

-- one vector per response type
SELECT rt, jsonb_array_length(r->'weights') AS weights, r->'pairs' AS pairs, (r->>'converged')::boolean AS converged
  FROM (SELECT rt, rbr_fit(prompt, tier, f, rm) r FROM comp GROUP BY rt) s ORDER BY rt;

-- options: the report echoes what was used
SELECT r->'options' AS options, r->'feature_names' AS names, r->'weights'->>2 AS noise_weight
  FROM (SELECT rbr_fit(prompt, tier, f, rm, '{"margin": 2, "tier_margin": {"0": 3}, "l2": 0.01,
          "feature_names": ["good", "bad", "noise"], "fixed_zero": ["noise"], "validation_fraction": 0.2, "seed": 7}') r
          FROM comp) s;
SELECT r->'weights'->>0 AS first_weight, r->'pairs'->>'validation' AS validation_pairs
  FROM (SELECT rbr_fit(prompt, tier, f, rm, '{"fixed_zero": [1], "validation_fraction": 0}') r FROM comp) s;
-- a larger l2 shrinks the weights
SELECT (SELECT sqrt((r->'weights'->>0)::float8^2 + (r->'weights'->>1)::float8^2) FROM
          (SELECT rbr_fit(prompt, tier, f, rm, '{"l2": 1}') r FROM comp) a)
     < (SELECT sqrt((r->'weights'->>0)::float8^2 + (r->'weights'->>1)::float8^2) FROM
          (SELECT rbr_fit(prompt, tier, f, rm, '{"l2": 0.0001}') r FROM comp) b) AS l2_shrinks;
-- the paper's released fitter: AdamW, 1000 steps, 95/5 pair split; the exact
-- solver reaches a lower training objective on the same pairs
SELECT r->>'solver' AS solver, r->>'iterations' AS steps, r->'options'->>'validation_split' AS split,
       (r->'accuracy'->>'train')::float8 > 0.9 AS train_accurate
  FROM (SELECT rbr_fit(prompt, tier, f, rm, '{"solver": "adamw"}') r FROM comp) s;
SELECT (SELECT (r->>'objective')::float8 FROM (SELECT rbr_fit(prompt, tier, f, rm, '{"validation_fraction": 0, "l2": 0.001}') r FROM comp) a)
    <= (SELECT (r->>'objective')::float8 FROM (SELECT rbr_fit(prompt, tier, f, rm, '{"solver": "adamw", "validation_fraction": 0, "l2": 0.001, "weight_decay": 0}') r FROM comp) b)
       AS exact_not_worse;

-- option errors
SELECT rbr_fit(prompt, tier, f, rm, '{"solver": "sgd"}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '{"margin": -1}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '{"margin": "big"}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '{"lerning_rate": 0.1}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '{"feature_names": ["a", "b"]}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '{"fixed_zero": [4]}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '{"fixed_zero": ["good"]}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '{"tier_margin": {"best": 2}}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '{"validation_fraction": 1.5}') FROM comp;
SELECT rbr_fit(prompt, tier, f, rm, '[1]') FROM comp;

-- bad input: defined results or clear errors
SELECT rbr_fit(prompt, tier, f, rm) IS NULL AS no_rows_is_null FROM comp WHERE false;
SELECT r->>'rows' AS rows, r->>'rows_skipped_null' AS skipped
  FROM (SELECT rbr_fit(prompt, tier, CASE WHEN tier = 1 AND prompt = '7' THEN NULL ELSE f END, rm) r FROM comp) s;
SELECT r->>'rows_skipped_null' AS skipped_with_null_element
  FROM (SELECT rbr_fit(prompt, tier, CASE WHEN prompt = '8' THEN ARRAY[f[1], NULL, f[3]] ELSE f END, rm) r FROM comp) s;
SELECT rbr_fit(prompt, tier, NULL::float8[], rm) FROM comp;
SELECT rbr_fit(prompt, tier, CASE WHEN prompt = '9' THEN ARRAY[f[1], 'NaN', f[3]] ELSE f END, rm) FROM comp;
SELECT rbr_fit(prompt, tier, CASE WHEN prompt = '9' THEN f[1:2] ELSE f END, rm) FROM comp;
SELECT rbr_fit(prompt, tier - 1, f, rm) FROM comp;
SELECT rbr_fit(prompt, tier, f, 'Infinity') FROM comp;
SELECT rbr_fit(prompt, 0, f, rm) FROM comp;
SELECT rbr_fit(prompt, tier, ARRAY[ARRAY[1.0, 2.0]]::float8[], rm) FROM comp;
-- groups with a single tier add no pairs, and say so
SELECT r->>'groups_without_pairs' AS groups_without_pairs
  FROM (SELECT rbr_fit(prompt, CASE WHEN prompt::int <= 10 THEN 0 ELSE tier END, f, rm) r FROM comp) s;

-- memory: past rbr.fit_max_memory, a clear error
SET rbr.fit_max_memory = '1MB';
SELECT rbr_fit(g::text, g % 3, ARRAY[random(), random(), random()], 0) FROM generate_series(1, 40000) g;
RESET rbr.fit_max_memory;

-- models: fit per response type and store, in one statement
SELECT rbr_policy_load('toy2', '{
  "prompt_template": "Q: {question} A: {response}",
  "completion_class_order": ["good", "bad"],
  "simple_propositions": {"helpful": {"prompt": "Helpful?"}, "harmful": {"prompt": "Harmful?"}},
  "completion_classes": {"good": {"comply": {"harmful": false}, "hard_refuse": {"harmful": false}},
                         "bad": {"comply": {"harmful": true}, "hard_refuse": {"harmful": true}}},
  "features": {"comply": ["helpful", "harmful", "good"], "hard_refuse": ["helpful", "harmful", "good"]}}') AS version;
SELECT m.name, m.response_type, m.policy, m.policy_version, m.feature_names, cardinality(m.weights) AS weights
  FROM (SELECT rt, rbr_fit(prompt, tier, f, rm) AS fit FROM comp GROUP BY rt) s,
       LATERAL rbr_model_save('m1', 'toy2', s.rt, s.fit) m
 ORDER BY 2;
-- scoring with the stored model equals scoring with its weights
SELECT bool_and(abs(rbr_reward('m1', rt, f, rm) - rbr_reward(m.weights, f, rm)) < 1e-12) AS same
  FROM comp JOIN rbr.model m ON m.name = 'm1' AND m.response_type = comp.rt;
SELECT round(rbr_pair_accuracy(prompt, tier, rbr_reward('m1', rt, f, rm))::numeric, 2) > 0.9 AS rm_plus_rbr_accurate FROM comp;
-- re-saving replaces the weights, and scoring sees it at once
SELECT rbr_reward('m1', 'Hard Refuse', '{1, 0, 0}', 0) = (SELECT weights[1] FROM rbr.model WHERE name = 'm1' AND response_type = 'hard_refuse') AS before;
SELECT (rbr_model_save('m1', 'toy2', 'hard refuse', '{"weights": [5, 6, 7]}')).weights;
SELECT rbr_reward('m1', 'hard_refuse', '{1, 0, 0}', 0.5) AS after;
-- errors
SELECT rbr_reward('m1', 'hard_refuse', '{1, 0}', 0);
SELECT rbr_reward('m2', 'hard_refuse', '{1, 0, 0}', 0);
SELECT rbr_reward('m1', 'hard_refuse', '{1, NULL, 0}', 0) IS NULL AS null_feature;
SELECT rbr_model_save('m1', 'toy2', 'comply', '{"weights": [1, 2]}');
SELECT rbr_model_save('m1', 'toy2', 'comply', '{"rows": 3}');
SELECT rbr_model_save('m1', 'toy2', 'comply', '{"weights": [1, 2, 3], "feature_names": ["a", "b", "c"]}');
SELECT rbr_model_save('bad name', 'toy2', 'comply', '{"weights": [1, 2, 3]}');
SELECT rbr_model_save('m1', 'toy2', 'refuse', '{"weights": [1, 2, 3]}');
-- a model keeps its policy version alive
DELETE FROM rbr.policy_version WHERE policy = 'toy2';

-- pair accuracy by hand: group a has 5 pairs, 3 ranked right (its tier-2 row scored 5
-- beats both better rows); group b's one pair is a tie (wrong);
-- equal tiers are not pairs; group c has one tier only
SELECT rbr_pair_accuracy(k, t, s) FROM (VALUES ('a', 0, 3.0), ('a', 1, 2.0), ('a', 2, 1.0), ('a', 2, 5.0),
       ('b', 0, 1.0), ('b', 1, 1.0), ('c', 0, 1.0), ('c', 0, 2.0), ('d', NULL, 1.0)) v(k, t, s);
SELECT rbr_pair_accuracy(k, t, s) IS NULL AS no_pairs_is_null FROM (VALUES ('c', 0, 1.0), ('c', 0, 2.0)) v(k, t, s);
SELECT rbr_pair_accuracy(k, t, s) FROM (VALUES ('a', 0, 'NaN'::float8)) v(k, t, s);

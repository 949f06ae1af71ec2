-- Curation: rbr_best_worst, rbr_preference_pairs, JSONL export through COPY,
-- rbr_model_export.
-- own schema: the suites share one database
CREATE SCHEMA curation;
SET search_path = curation, public;

-- by hand: prompt p has rewards a 1, b 3, c 3, d -1, e not scored;
-- q has only an unscored row; r: w 2, y 2, z 1; s: two equal rewards.
-- p: best b (3; ties with c broken by the smaller id), worst d (-1), gap 4, n 4
-- r: best w (ties with y: the smaller id), worst z, gap 1
-- s: best s1 (smaller id), worst s2 (larger id): distinct rows, gap 0
CREATE TABLE scored (prompt text, id text, reward float8, completion text);
INSERT INTO scored VALUES
  ('p', 'a', 1, 'plain'), ('p', 'b', 3, E'two\nlines and a tab\there'), ('p', 'c', 3, 'a "quoted" word'),
  ('p', 'd', -1, E'back\\slash \\n not a newline'), ('p', 'e', NULL, 'not scored'),
  ('q', 'x', NULL, 'not scored'), ('r', 'w', 2, 'été ✓'), ('r', 'y', 2, 'y'), ('r', 'z', 1, E'control \x01 and \x02 bytes'),
  ('s', 's2', 5, 'same'), ('s', 's1', 5, 'same');
SELECT prompt, rbr_best_worst(id, reward) FROM scored GROUP BY prompt ORDER BY prompt;
SELECT rbr_best_worst(id, reward) IS NULL AS no_rows_is_null FROM scored WHERE false;
SELECT rbr_best_worst('a', 'NaN');
-- the same result whatever order the rows arrive in, and under a parallel plan
CREATE TABLE big AS
SELECT (g % 100)::text AS prompt, g::text AS id, ((g * 7919) % 1000) / 10.0 AS reward FROM generate_series(1, 20000) g;
CREATE TABLE serial_bw AS SELECT prompt, rbr_best_worst(id, reward) AS bw FROM big GROUP BY prompt;
SELECT count(*) AS prompts,
       count(*) FILTER (WHERE bw->>'best' = (SELECT id FROM big b WHERE b.prompt = s.prompt ORDER BY reward DESC, id COLLATE "C" LIMIT 1)
                          AND bw->>'worst' = (SELECT id FROM big b WHERE b.prompt = s.prompt ORDER BY reward, id COLLATE "C" DESC LIMIT 1)) AS agree_with_order_by
  FROM serial_bw s;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF) SELECT rbr_best_worst(id, reward) FROM big;
SELECT rbr_best_worst(id, reward) = (SELECT rbr_best_worst(id, reward) FROM (SELECT * FROM big ORDER BY id DESC) s) AS parallel_equals_serial
  FROM big;
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;

-- preference pairs of p (e is not scored): all pairs with a strictly higher
-- reward: b>a 2, c>a 2, a>d 2, b>d 4, c>d 4 (b and c are equal: no pair);
-- min_gap 3 keeps b>d and c>d; best_vs_rest: b against a and d; best_worst: b>d
SELECT m, p.* FROM (VALUES ('all', 0), ('all', 3), ('best_vs_rest', 0), ('best_worst', 0), ('best_worst', 5)) AS v(m, gap),
       LATERAL (SELECT array_agg(id) AS ids, array_agg(reward) AS rewards FROM scored WHERE prompt = 'p') a,
       LATERAL rbr_preference_pairs(a.ids, a.rewards, v.gap, v.m) p
 ORDER BY m, gap, margin DESC, chosen, rejected;
SELECT count(*) AS equal_rewards_no_pair FROM rbr_preference_pairs(ARRAY['s1', 's2'], ARRAY[5, 5]::float8[]);
-- errors
SELECT * FROM rbr_preference_pairs(ARRAY['a'], ARRAY[1, 2]::float8[]);
SELECT * FROM rbr_preference_pairs(ARRAY['a', NULL], ARRAY[1, 2]::float8[]);
SELECT * FROM rbr_preference_pairs(ARRAY['a', 'a'], ARRAY[1, 2]::float8[]);
SELECT * FROM rbr_preference_pairs(ARRAY['a', 'b'], ARRAY[1, 'Infinity']::float8[]);
SELECT * FROM rbr_preference_pairs(ARRAY['a', 'b'], ARRAY[1, 2]::float8[], -1);
SELECT * FROM rbr_preference_pairs(ARRAY['a', 'b'], ARRAY[1, 2]::float8[], 0, 'best');

-- JSONL for a DPO trainer: one line per pair with the prompt and both texts.
-- csv with quote and delimiter bytes that JSON text never contains (it
-- escapes control characters) writes each line verbatim.
CREATE VIEW dpo_pairs AS
SELECT g.prompt, c.completion AS chosen, r.completion AS rejected, p.margin
  FROM (SELECT prompt, array_agg(id) AS ids, array_agg(reward) AS rewards FROM scored GROUP BY prompt) g
 CROSS JOIN LATERAL rbr_preference_pairs(g.ids, g.rewards, 0, 'all') p
  JOIN scored c ON c.prompt = g.prompt AND c.id = p.chosen
  JOIN scored r ON r.prompt = g.prompt AND r.id = p.rejected;
\copy (SELECT row_to_json(d) FROM (SELECT * FROM dpo_pairs ORDER BY prompt, margin DESC, chosen COLLATE "C", rejected COLLATE "C") d) TO 'results/pairs.jsonl' WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
CREATE TABLE jsonl (n serial, line text);
\copy jsonl (line) FROM 'results/pairs.jsonl' WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
-- every line parses as JSON and is exactly the row it came from
SELECT count(*) AS lines, count(*) FILTER (WHERE line::jsonb IS NOT NULL) AS parsed,
       (SELECT count(*) FROM dpo_pairs) AS pairs,
       count(*) FILTER (WHERE line::jsonb IN (SELECT to_jsonb(d) FROM dpo_pairs d)) AS identical_to_a_pair
  FROM jsonl;
SELECT line FROM jsonl ORDER BY n;
-- (7 pairs: 5 of p, w > z and y > z of r; none of s.) COPY's text format
-- would double backslashes: that line no longer says the same
\copy (SELECT row_to_json(d) FROM dpo_pairs d WHERE chosen = 'plain' AND rejected LIKE 'back%') TO 'results/pairs-text.jsonl'
CREATE TABLE jsonl_text (n serial, line text);
\copy jsonl_text (line) FROM 'results/pairs-text.jsonl' WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
SELECT line, line::jsonb->>'rejected' = E'back\\slash \\n not a newline' AS same_text FROM jsonl_text ORDER BY n;

-- model export: a model saved from a (made-up) fit of the released policy
\set spec `cat ../shared/reference/policy.json`
SELECT rbr_policy_load('cu_paper', :'spec') AS version;
SELECT m.response_type, cardinality(m.weights) AS weights
  FROM (VALUES ('hard_refuse'), ('comply')) AS v(rt),
       LATERAL rbr_model_save('cu_m1', 'cu_paper', v.rt,
                 jsonb_build_object('weights', (SELECT jsonb_agg(round(k / 10.0, 1)) FROM generate_series(1, cardinality(rbr_feature_names('cu_paper', v.rt))) k),
                                    'solver', 'exact', 'converged', true)) m
 ORDER BY 1;
CREATE TABLE export AS SELECT rbr_model_export('cu_m1') AS e;
SELECT e->'format' AS format, e->'model' AS model, e->'policy' AS policy, e->'policy_version' AS version,
       e->>'rbr_version' = (SELECT extversion FROM pg_extension WHERE extname = 'rbr') AS rbr_version, (SELECT array_agg(k ORDER BY k) FROM jsonb_object_keys(e->'response_types') k) AS response_types,
       e->'response_types'->'comply'->'weights' AS comply_weights,
       e->'response_types'->'comply'->'weights_by_name'->'disallowed_content' AS comply_disallowed_weight,
       e->'response_types'->'hard_refuse' ? 'policy_spec' AS has_spec
  FROM export;
-- the names and weights are exactly those stored, in feature order
SELECT m.response_type,
       (SELECT array_agg(x ORDER BY o) FROM jsonb_array_elements_text(e->'response_types'->m.response_type->'feature_names') WITH ORDINALITY AS f(x, o))
         = rbr_feature_names('cu_paper', m.response_type) AS names_match,
       (SELECT array_agg(x::float8 ORDER BY o) FROM jsonb_array_elements_text(e->'response_types'->m.response_type->'weights') WITH ORDINALITY AS f(x, o))
         = m.weights AS weights_match
  FROM rbr.model m, export WHERE m.name = 'cu_m1' ORDER BY 1;
SELECT rbr_model_export('cu_m1', true)->'response_types'->'comply'->'policy_spec' = :'spec'::jsonb AS spec_included;
SELECT rbr_model_export('no_such');

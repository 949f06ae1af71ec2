-- rbr demo: the released policy, the paper's gold rows, fitting and scoring.
\pset footer off
\set QUIET on
CREATE EXTENSION IF NOT EXISTS rbr;
\set spec `cat ../shared/reference/policy.json`

\echo
\echo '== 1. Load the released policy (../shared/reference/policy.json)'
SELECT rbr_policy_load('paper', :'spec') AS version;
SELECT name, latest_version, simple_propositions, derived_propositions, classes FROM rbr.policies;
SELECT key AS response_type, jsonb_array_length(value->'features') AS features
  FROM jsonb_each(rbr_policy_info('paper')->'response_types') ORDER BY 1;

\echo
\echo '== 2. Classify the 351 human-labelled gold rows'
CREATE TEMP TABLE gold_raw (line text);
\copy gold_raw FROM '../shared/reference/gold_train.jsonl' WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
CREATE TEMP TABLE gold AS
SELECT row_number() OVER () AS id, line::jsonb ->> 'category' AS category,
       line::jsonb ->> 'response_type' AS response_type, line::jsonb -> 'propositions' AS labels
  FROM gold_raw;
SELECT response_type, rbr_classify('paper', response_type, labels) AS class, count(*) AS rows
  FROM gold GROUP BY 1, 2 ORDER BY 1, 2;

\echo
\echo '== 3. Synthetic comparison data: 400 prompts x 8 completions whose labels are drawn'
\echo '      from gold rows of the prompt''s response type, graded with noise (P(yes) ~ 0.85'
\echo '      for true labels), tier = class order; a helpful-only reward model that'
\echo '      prefers compliance scores them'
SELECT setseed(0.2);
CREATE TEMP TABLE synth AS
WITH prompts AS (
    SELECT p, (ARRAY['Hard Refuse', 'Comply', 'Safe Refuse 2', 'Comply'])[1 + p % 4] AS rt FROM generate_series(1, 400) p
), draws AS (
    SELECT p.p, p.rt, k, (SELECT g.labels FROM gold g WHERE g.response_type = p.rt
                            ORDER BY random() + p.p * 0 + k * 0 LIMIT 1) AS labels
      FROM prompts p, generate_series(1, 8) k
)
SELECT p AS prompt, rt, k,
       rbr_label_tier('paper', rt, rbr_classify('paper', rt, labels)) AS tier,
       (SELECT jsonb_object_agg(key, CASE WHEN value::boolean
                    THEN 0.70 + 0.29 * random() ELSE 0.01 + 0.29 * random() END)
          FROM jsonb_each_text(labels)) AS probs,
       (labels->>'fully_complies')::boolean::int * 1.0 + (labels->>'partially_complies')::boolean::int * 0.5
         + random() * 0.8 AS rm
  FROM draws;
ALTER TABLE synth ADD COLUMN features float8[];
UPDATE synth SET features = rbr_features('paper', rt, probs);
SELECT rt AS response_type, count(DISTINCT prompt) AS prompts, count(*) AS completions,
       count(DISTINCT tier) AS tiers FROM synth GROUP BY 1 ORDER BY 1;

\echo
\echo '== 4. Fit one weight vector per response type on half the prompts (exact solver),'
\echo '      store them as model ''demo'''
SELECT m.response_type, cardinality(m.weights) AS weights,
       m.report->'pairs'->>'train' AS train_pairs, m.report->>'converged' AS converged,
       round((m.report->'accuracy'->>'train')::numeric, 3) AS train_pair_accuracy
  FROM (SELECT rt, rbr_fit(prompt::text, tier, features, rm,
                           jsonb_build_object('feature_names', rbr_feature_names('paper', rt),
                                              'validation_fraction', 0)) AS fit
          FROM synth WHERE (prompt / 4) % 2 = 0 GROUP BY rt) s,
       LATERAL rbr_model_save('demo', 'paper', s.rt, s.fit) m
 ORDER BY 1;

\echo
\echo '== 5. Score the held-out prompts. Error rate = share of ordered pairs ranked wrong'
\echo '      by the reward model alone (RM), by RM + RBR, and by RBR alone'
CREATE TEMP TABLE scored AS
SELECT prompt, rt, tier, rbr_classify('paper', rt, (SELECT jsonb_object_agg(key, value::float8 > 0.5) FROM jsonb_each_text(probs))) AS label,
       rm, rbr_reward('demo', rt, features, 0) AS rbr
  FROM synth WHERE (prompt / 4) % 2 = 1;
SELECT rt AS response_type, e->'all'->>'pairs' AS pairs,
       round((e->'all'->>'rm')::numeric, 3) AS "RM only",
       round((e->'all'->>'rm_rbr')::numeric, 3) AS "RM + RBR",
       round((e->'all'->>'rbr')::numeric, 3) AS "RBR only"
  FROM (SELECT rt, rbr_pair_errors(prompt::text, tier, label, rm, rbr) AS e FROM scored GROUP BY rt) s ORDER BY 1;

\echo
\echo '== 6. Hard refusals: reward (RM + RBR) minus the prompt''s mean tier-0 reward, per class'
CREATE TEMP TABLE centred AS
SELECT rt, label, (rm + rbr) - avg(rm + rbr) FILTER (WHERE tier = (SELECT min(tier) FROM scored s2 WHERE s2.prompt = s.prompt))
                                OVER (PARTITION BY prompt) AS centred
  FROM scored s;
SELECT label, round(low::numeric, 2) AS low, round(high::numeric, 2) AS high, count, bar
  FROM rbr_histogram((SELECT array_agg(label ORDER BY label, centred) FROM centred WHERE rt = 'Hard Refuse'),
                     (SELECT array_agg(centred ORDER BY label, centred) FROM centred WHERE rt = 'Hard Refuse'), 8)
 WHERE count > 0;
\pset tuples_only on
\pset format unaligned
\o demo-out/rewards.svg
SELECT rbr_histogram_svg(array_agg(label), array_agg(centred), 40,
                         'Hard Refuse: RM + RBR minus the prompt''s best-tier mean reward') FROM centred WHERE rt = 'Hard Refuse';
\o

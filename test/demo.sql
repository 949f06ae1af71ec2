-- rbr demo: the released policy, a sample dataset, grading, fitting per
-- response type, scoring, error rates, a reward histogram and two pictures.
-- psql variables: spec (the policy JSON), prompts (how many prompts to grade),
-- test_grader (true when the grader is the project's test server).
\pset footer off
\set QUIET on
CREATE EXTENSION IF NOT EXISTS rbr;

\echo
\echo '== 1. Load the released policy (../shared/reference/policy.json)'
SELECT rbr_policy_load('paper', :'spec') AS version \gset
\echo '   stored as policy ''paper'', version' :version
SELECT key AS response_type, jsonb_array_length(value->'propositions') AS propositions_graded,
       jsonb_array_length(value->'features') AS features
  FROM jsonb_each(rbr_policy_info('paper')->'response_types') ORDER BY 1;

\echo
\echo '== 2. A sample dataset from the paper''s 351 human-labelled gold rows: each gold'
\echo '      prompt with 6 candidate completions (its own and 5 of other gold rows of'
\echo '      the same response type); quality tier = the class of the candidate''s human'
\echo '      labels; a simulated helpful-only reward model that prefers compliance'
\set sample_table demo_completions
\ir sample/completions.sql
SELECT response_type, count(DISTINCT prompt_id) AS prompts, count(*) AS completions
  FROM demo_completions GROUP BY 1 ORDER BY 1;

\echo
\echo '== 3. Grade: one yes/no question per (completion, needed proposition), many in flight'
SELECT current_setting('rbr.grader_url') AS grader_url, current_setting('rbr.grader_model') AS model;
SET client_min_messages = warning;
CALL rbr_featurize('demo_completions', 'paper');
RESET client_min_messages;
SELECT source, state, done, errors, requests, cached, values_per_second, prompt_tokens FROM rbr.featurize_progress;
\set QUIET on
SELECT status, method, count(*) AS answers, sum(prompt_tokens) AS prompt_tokens
  FROM demo_completions_grades GROUP BY 1, 2 ORDER BY 1, 2;

\echo
\echo '== 4. The grader against the human labels: one call, rbr_grader_report()'
\if :test_grader
\echo '      (The test grader answers from these same human labels, with 10% of answers'
\echo '      flipped: accuracy near 0.9 is by construction, not a measure of an LLM.)'
\endif
CREATE TABLE grader_report AS
SELECT rbr_grader_report(array_agg(d.labels ORDER BY d.id), array_agg(to_jsonb(f) ORDER BY d.id)) AS r
  FROM demo_completions d JOIN demo_completions_features f USING (id);
SELECT (r->'all'->>'n')::int AS answers, round((r->'all'->>'accuracy')::numeric, 3) AS accuracy,
       round((r->'all'->>'macro_f1')::numeric, 3) AS macro_f1, round((r->'all'->>'kappa')::numeric, 3) AS kappa,
       round((r->'all'->>'brier')::numeric, 3) AS brier
  FROM grader_report;
\echo '   the five propositions it gets most wrong, and the gold-tuned threshold of each:'
SELECT key AS proposition, (value->>'n')::int AS answers, round((value->>'accuracy')::numeric, 3) AS accuracy,
       round((value->>'f1')::numeric, 3) AS f1, round((value->>'best_threshold')::numeric, 3) AS best_threshold,
       round((value->>'best_accuracy')::numeric, 3) AS accuracy_there
  FROM grader_report, jsonb_each(r->'by_proposition')
 ORDER BY (value->>'accuracy')::float8, key LIMIT 5;
\pset tuples_only on
\pset format unaligned
\o demo-out/calibration.svg
SELECT rbr_reliability_svg(r, title => 'Demo grader calibration per proposition (test grader: gold labels, 10% flipped)')
  FROM grader_report;
\o
\pset tuples_only off
\pset format aligned

\echo
\echo '== 5. Fit one weight vector per response type on half the prompts (exact solver);'
\echo '      store them as model ''demo''. (Safe Refuse 1 has 9 gold rows, all of one class:'
\echo '      no ordered pairs, so nothing to fit.)'
CREATE TABLE scored AS
SELECT d.id, d.prompt_id, d.response_type, d.tier, d.rm, d.prompt_id % 2 = 0 AS train,
       rbr_classify('paper', d.response_type, d.labels) AS label,
       rbr_feature_vector('paper', d.response_type, to_jsonb(f)) AS features
  FROM demo_completions d JOIN demo_completions_features f USING (id);
SELECT m.response_type, cardinality(m.weights) AS weights, (m.report->'pairs'->>'train')::int AS train_pairs,
       (m.report->>'rows_skipped_null')::int AS rows_not_graded, (m.report->>'converged')::boolean AS converged
  FROM (SELECT response_type, rbr_fit(prompt_id::text, tier, features, rm,
                 jsonb_build_object('feature_names', rbr_feature_names('paper', response_type),
                                    'validation_fraction', 0)) AS fit
          FROM scored
         WHERE train AND response_type IN (SELECT response_type FROM scored GROUP BY 1 HAVING count(DISTINCT tier) > 1)
         GROUP BY response_type) s,
       LATERAL rbr_model_save('demo', 'paper', s.response_type, s.fit) m
 ORDER BY 1;

\echo
\echo '== 6. Score the held-out prompts. Error rate = share of ordered pairs ranked wrong'
\echo '      by the reward model alone (RM), by RM + RBR, and by RBR alone'
ALTER TABLE scored ADD COLUMN rbr float8;
UPDATE scored s SET rbr = rbr_reward('demo', s.response_type, s.features, 0)
 WHERE EXISTS (SELECT FROM rbr.model m WHERE m.name = 'demo'
                AND m.response_type = lower(replace(s.response_type, ' ', '_')));
SELECT response_type, (e->'all'->>'pairs')::int AS pairs,
       round((e->'all'->>'rm')::numeric, 3) AS "RM only",
       round((e->'all'->>'rm_rbr')::numeric, 3) AS "RM + RBR",
       round((e->'all'->>'rbr')::numeric, 3) AS "RBR only"
  FROM (SELECT response_type, rbr_pair_errors(prompt_id::text, tier, label, rm, rbr) AS e
          FROM scored WHERE NOT train GROUP BY 1) s
 WHERE e IS NOT NULL ORDER BY 1;
\if :test_grader
\echo '   The test grader answers from the gold labels that also define the tiers (10% of'
\echo '   its answers flipped), so RBR sees almost the truth: error rates near 0 are expected'
\echo '   here. With a real LLM grader they are higher (doc/evaluation.md).'
\endif

\echo
\echo '== 7. Hard refusals, held-out prompts: RM + RBR minus the mean RM + RBR of the'
\echo '      prompt''s best-tier completions (0 = as good as the prompt''s best), per class,'
\echo '      best class first. Key: share % = the class''s completions in this bin, as a share'
\echo '      of all the class''s completions; bar = that share, 40 # = the largest in the table.'
CREATE TABLE centred AS
SELECT response_type, label, tier, (rm + rbr) - avg(rm + rbr) FILTER (WHERE tier = best) OVER (PARTITION BY prompt_id) AS centred
  FROM (SELECT *, min(tier) OVER (PARTITION BY prompt_id) AS best FROM scored WHERE NOT train AND rbr IS NOT NULL) s;
SELECT h.label AS class, t.tier, round(h.low::numeric, 1) AS "from", round(h.high::numeric, 1) AS "to", h.count,
       round((100 * h.share)::numeric) AS "share %", h.bar
  FROM rbr_histogram((SELECT array_agg(label ORDER BY label, centred) FROM centred WHERE response_type = 'Hard Refuse'),
                     (SELECT array_agg(centred ORDER BY label, centred) FROM centred WHERE response_type = 'Hard Refuse'), 8) h
  JOIN (SELECT label, min(tier) AS tier FROM centred WHERE response_type = 'Hard Refuse' GROUP BY 1) t USING (label)
 WHERE h.count > 0
 ORDER BY t.tier, h.label, h.bin;

\echo
\echo '== 8. Pictures (SVG, open in a browser): the reward distribution of every class under'
\echo '      RM only, RM + RBR and RBR only, and the grader''s calibration per proposition'
\pset tuples_only on
\pset format unaligned
\o demo-out/rewards.svg
SELECT rbr_reward_figure_svg(array_agg(prompt_id::text), array_agg(response_type), array_agg(label), array_agg(tier),
                             array_agg(rm), array_agg(rbr), 24,
                             'Demo, held-out prompts: reward per completion class (RM only, RM + RBR, RBR only)')
  FROM scored WHERE NOT train AND rbr IS NOT NULL;
\o

-- Classes and features: rbr_classify, rbr_class_probs, rbr_feature_names, rbr_features.
\set spec `cat ../shared/reference/policy.json`
SELECT rbr_policy_load('paper', :'spec') AS version;

-- A small policy whose numbers are easy to check by hand:
-- good = fine and helpful, meh = not harmful and not great, bad = harmful,
-- where fine = polite and not harmful, great = fine and helpful.
SELECT rbr_policy_load('toy', '{
  "prompt_template": "Q: {question} A: {response}",
  "completion_class_order": ["good", "meh", "bad"],
  "simple_propositions": {"polite": {"prompt": "Polite?"}, "helpful": {"prompt": "Helpful?"},
                          "harmful": {"prompt": "Harmful?"}, "verbose": {"prompt": "Verbose?"}},
  "derived_propositions": {"fine": {"polite": true, "harmful": false},
                           "great": {"fine": true, "helpful": true}},
  "completion_classes": {
    "good": {"Answer": {"fine": true, "helpful": true}},
    "meh":  {"Answer": {"harmful": false, "great": false}},
    "bad":  {"Answer": {"harmful": true}}}
}') AS version;

-- hard labels: exactly one class
SELECT rbr_classify('toy', 'answer', '{"polite": true, "helpful": true, "harmful": false}');
SELECT rbr_classify('toy', 'Answer', '{"polite": false, "helpful": true, "harmful": false}');
SELECT rbr_classify('toy', 'ANSWER', '{"polite": true, "helpful": false, "harmful": true}');
-- labels: errors name what is wrong
SELECT rbr_classify('toy', 'answer', '{"polite": true}');
SELECT rbr_classify('toy', 'answer', '{"polite": true, "helpful": true, "harmful": false, "rude": true}');
SELECT rbr_classify('toy', 'answer', '{"polite": true, "helpful": true, "harmful": false, "fine": true}');
SELECT rbr_classify('toy', 'answer', '{"polite": "yes", "helpful": true, "harmful": false}');
SELECT rbr_classify('toy', 'answer', '{"polite": 0.5, "helpful": true, "harmful": false}');
SELECT rbr_classify('toy', 'answer', '{"polite": 1, "helpful": 0, "harmful": 1}');
SELECT rbr_classify('toy', 'answer', '[true, false]');
SELECT rbr_classify('toy', 'question', '{}');
SELECT rbr_classify('toy', 'answer', NULL) IS NULL AS null_in_null_out;

-- classes that overlap or leave gaps are reported
SELECT rbr_policy_load('gappy', '{
  "prompt_template": "{question} {response}",
  "completion_class_order": ["a", "b"],
  "simple_propositions": {"x": {"prompt": "X?"}, "y": {"prompt": "Y?"}},
  "completion_classes": {"a": {"t": {"x": true}}, "b": {"t": {"y": true}}}}') AS version;
SELECT rbr_classify('gappy', 't', '{"x": true, "y": true}');
SELECT rbr_classify('gappy', 't', '{"x": false, "y": false}');
SELECT rbr_classify('gappy', 't', '{"x": false, "y": true}');
SELECT rbr_class_probs('gappy', 't', '{"x": 1, "y": 1}');
SELECT rbr_class_probs('gappy', 't', '{"x": 0, "y": 0}', 'exact');

-- class probabilities at p = u = h = 0.5 (polite, helpful, harmful).
-- product mode (the paper's): good = p(1-h)u = 0.125, bad = h = 0.5,
-- meh = (1-h)(1 - p(1-h)u) = 0.4375: "harmful" counts twice in meh (directly
-- and through "great"), so the raw sum is 1.0625 and normalising gives
-- 0.1176, 0.4118, 0.4706.
SELECT rbr_class_probs('toy', 'answer', '{"polite": 0.5, "helpful": 0.5, "harmful": 0.5}');
-- exact mode: P(meh) = P(not h) - P(not h and p and u) = 0.375; the classes
-- partition, so the raw values sum to 1: 0.125, 0.375, 0.5.
SELECT rbr_class_probs('toy', 'answer', '{"polite": 0.5, "helpful": 0.5, "harmful": 0.5}', 'exact');
SELECT rbr_class_probs('toy', 'answer', '{"polite": 0.5, "helpful": 0.5, "harmful": 0.5}', 'fuzzy');
-- 0/1 inputs: the indicator of the class rbr_classify returns, in both modes
SELECT rbr_class_probs('toy', 'answer', '{"polite": true, "helpful": true, "harmful": false}'),
       rbr_class_probs('toy', 'answer', '{"polite": 1, "helpful": 1, "harmful": 0}', 'exact');
-- probabilities at exactly 0 or 1 that no class allows
SELECT rbr_class_probs('gappy', 't', '{"x": 0, "y": 0}');

-- values: range and type errors
SELECT rbr_class_probs('toy', 'answer', '{"polite": 1.5, "helpful": 0.5, "harmful": 0.5}');
SELECT rbr_class_probs('toy', 'answer', '{"polite": -0.1, "helpful": 0.5, "harmful": 0.5}');
SELECT rbr_class_probs('toy', 'answer', '{"polite": "NaN", "helpful": 0.5, "harmful": 0.5}');
SELECT rbr_class_probs('toy', 'answer', jsonb_build_object('polite', 'NaN'::numeric, 'helpful', 0.5, 'harmful', 0.5));
SELECT rbr_class_probs('toy', 'answer', '{"polite": null, "helpful": 0.5, "harmful": 0.5}');
SELECT rbr_class_probs('toy', 'answer', '{"polite": [0.5], "helpful": 0.5, "harmful": 0.5}');
SELECT rbr_class_probs('toy', 'answer', '{"helpful": 0.5}');

-- features: default list = propositions the classes reach (alphabetical), then classes
SELECT rbr_feature_names('toy', 'answer');
SELECT rbr_features('toy', 'answer', '{"polite": 0.5, "helpful": 0.25, "harmful": 0.125}');
SELECT rbr_features('toy', 'answer', '{"polite": 0.5, "helpful": 0.25, "harmful": 0.125}', 'exact');
-- unused propositions may be given; "verbose" is not needed
SELECT rbr_features('toy', 'answer', '{"polite": 0.5, "helpful": 0.25, "harmful": 0.125, "verbose": 0.9}') =
       rbr_features('toy', 'answer', '{"polite": 0.5, "helpful": 0.25, "harmful": 0.125}') AS same;
-- an explicit list may name a derived proposition and propositions the classes do not use
SELECT rbr_policy_load('toy', (SELECT spec FROM rbr.policy_version WHERE policy = 'toy')
       || '{"features": {"answer": ["verbose", "fine", "bad", "good"]}}', replace => true) AS version;
SELECT rbr_feature_names('toy', 'answer');
SELECT rbr_features('toy', 'answer', '{"polite": 0.5, "helpful": 0.25, "harmful": 0.125}');
SELECT rbr_features('toy', 'answer', '{"polite": 0.5, "helpful": 0.25, "harmful": 0.125, "verbose": 0.75}');

-- Properties on the released policy, over random probabilities:
-- class probabilities sum to 1 in both modes.
SELECT setseed(0.42);
CREATE TABLE random_probs AS
SELECT i, rt, jsonb_object_agg(p, round(random()::numeric, 6)) AS probs
  FROM generate_series(1, 200) i,
       unnest(ARRAY['hard_refuse', 'safe_refuse_1', 'safe_refuse_2', 'comply']) rt,
       jsonb_object_keys(:'spec'::jsonb -> 'simple_propositions') p
 GROUP BY i, rt;
SELECT rt, count(*) AS rows,
       max(abs(s_product - 1)) < 1e-12 AS product_sums_to_1,
       max(abs(s_exact - 1)) < 1e-12 AS exact_sums_to_1
  FROM (SELECT rt,
               (SELECT sum(value::float8) FROM jsonb_each_text(rbr_class_probs('paper', rt, probs))) AS s_product,
               (SELECT sum(value::float8) FROM jsonb_each_text(rbr_class_probs('paper', rt, probs, 'exact'))) AS s_exact
          FROM random_probs) s
 GROUP BY rt ORDER BY rt;
-- the exact "disallowed_completion" class is just P(disallowed_content) before normalisation;
-- with exact mode the classes partition, so normalisation leaves it unchanged
SELECT count(*) AS rows,
       max(abs((rbr_class_probs('paper', rt, probs, 'exact')->>'disallowed_completion')::float8
               - (probs->>'disallowed_content')::float8)) < 1e-12 AS exact_matches
  FROM random_probs;
-- feature vectors: one value per name, all in [0,1]
SELECT rt, bool_and(array_length(f, 1) = array_length(rbr_feature_names('paper', rt), 1)) AS lengths_match,
       bool_and(0 <= ALL (f) AND 1 >= ALL (f)) AS in_unit_interval
  FROM (SELECT rt, rbr_features('paper', rt, probs) f FROM random_probs) s
 GROUP BY rt ORDER BY rt;

-- feature vectors read by name from a row of feature columns
SELECT rbr_feature_vector('toy', 'answer', '{"id": 7, "verbose": 0.5, "fine": 0.25, "bad": 0.125, "good": 1, "extra": "x"}');
SELECT rbr_feature_vector('toy', 'answer', '{"verbose": 0.5, "fine": null, "bad": 0.125}');
SELECT rbr_feature_vector('toy', 'answer', '{"verbose": "high"}');
SELECT rbr_feature_vector('toy', 'answer', '{"verbose": 2}');
SELECT rbr_feature_vector('toy', 'answer', '[]');

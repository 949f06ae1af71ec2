-- Grader evaluation: rbr_grader_report against hand-checked numbers and an
-- independent computation over the 351 gold rows; rbr_grader_thresholds,
-- rbr_binarize and rbr_calibration_svg.
-- own schema: the suites share one database
CREATE SCHEMA grader_report;
SET search_path = grader_report, public;

-- by hand, threshold 0.5, 2 calibration bins ([0, 0.5), [0.5, 1]):
--   row 1: a true p 0.9 (tp), b false p 0.2 (tn)
--   row 2: a false p 0.6 (fp), b true, not graded (ungraded)
--   row 3: a true p 0.3 (fn), b unlabelled (null label)
--   row 4: no labels (rows_without_labels)
-- a: n 3, tp 1 fp 1 fn 1 tn 0, accuracy 1/3, precision 1/2, recall 1/2, f1 1/2;
--    kappa: po = 1/3, pe = (2*2 + 1*1)/9 = 5/9, (1/3 - 5/9)/(1 - 5/9) = -1/2;
--    brier (0.01 + 0.36 + 0.49)/3 = 0.28667; bins: [0,0.5) 1 row p 0.3 all yes,
--    [0.5,1] 2 rows mean p 0.75 half yes; ece (1*0.7 + 2*0.25)/3 = 0.4.
--    thresholds t (yes iff p > t): [0,0.3) 2 right, [0.3,0.6) 1, [0.6,0.9) 2,
--    [0.9,1] 1: best accuracy 2/3 at midpoints 0.15 or 0.75; 0.75 is nearer 0.5.
-- b: n 1 (tn), no positives: precision, recall, f1, kappa null; best 0.5 (1/1).
-- all: 4 values, tp 1 fp 1 fn 1 tn 1; best: [0.2,0.3) and [0.6,0.9) both 3/4,
--    midpoints 0.25 and 0.75 equally near 0.5: the lower, 0.25.
CREATE TABLE hand (id int, labels jsonb, probs jsonb);
INSERT INTO hand VALUES (1, '{"a": true, "b": false}', '{"a": 0.9, "b": 0.2, "ideal": 0.7}'),
                        (2, '{"a": false, "b": true}', '{"a": 0.6}'),
                        (3, '{"a": 1, "b": null}', '{"a": 0.3, "b": 0.5}'),
                        (4, NULL, '{"a": 0.5}');
CREATE TABLE hand_report AS
SELECT rbr_grader_report(array_agg(labels ORDER BY id), array_agg(probs ORDER BY id), 0.5, 2) AS r FROM hand;
SELECT r->'rows' AS rows, r->'rows_without_labels' AS without_labels, r->'threshold' AS threshold, r->'bins' AS bins
  FROM hand_report;
SELECT coalesce(key, '(all)') AS prop, o->'n' AS n, o->'positives' AS pos, o->'ungraded' AS ungraded,
       o->'unlabelled' AS unlabelled, o->'tp' AS tp, o->'fp' AS fp, o->'fn' AS fn, o->'tn' AS tn,
       round((o->>'accuracy')::numeric, 4) AS accuracy, o->'precision' AS precision, o->'recall' AS recall,
       o->'f1' AS f1, o->'kappa' AS kappa, round((o->>'brier')::numeric, 5) AS brier,
       round((o->>'ece')::numeric, 5) AS ece, o->'best_threshold' AS best_t,
       round((o->>'best_accuracy')::numeric, 4) AS best_acc
  FROM hand_report, LATERAL (SELECT key, value AS o FROM jsonb_each(r->'by_proposition')
                             UNION ALL SELECT NULL, r->'all') s
 ORDER BY key NULLS LAST;
SELECT b->'bin' AS bin, b->'low' AS low, b->'high' AS high, b->'count' AS count,
       b->'mean_predicted' AS mean_predicted, b->'observed_rate' AS observed_rate
  FROM hand_report, jsonb_array_elements(r->'by_proposition'->'a'->'calibration') b;
SELECT r->'all'->'propositions' AS propositions, round((r->'all'->>'macro_accuracy')::numeric, 4) AS macro_accuracy,
       r->'all'->'macro_f1' AS macro_f1 FROM hand_report;
-- the thresholds for binarising, and labels from probabilities with them
SELECT rbr_grader_thresholds(r) FROM hand_report;
SELECT rbr_binarize('{"a": 0.7, "b": 0.5, "c": null, "d": true}', '{"a": 0.75}');
SELECT rbr_binarize('{"a": 0.7, "b": 0.5}', '{}', 0.4);

-- tie at the threshold itself: p = 0.5 is a "no" (yes iff p > 0.5); a
-- threshold equal to an observed value stays reported as 0.5
SELECT r->'all'->'tn' AS tn, r->'all'->'best_threshold' AS best_t, r->'all'->'best_accuracy' AS best_acc
  FROM (SELECT rbr_grader_report(ARRAY['{"x": false}', '{"x": true}']::jsonb[], ARRAY['{"x": 0.5}', '{"x": 0.8}']::jsonb[]) r) s;
-- all ungraded: counts only, metrics null
SELECT r->'all'->'n' AS n, r->'all'->'ungraded' AS ungraded, r->'all'->'accuracy' AS accuracy,
       r->'all'->'best_threshold' AS best_t, r->'by_proposition'->'x'->'ece' AS ece
  FROM (SELECT rbr_grader_report(ARRAY['{"x": false}', '{"x": true}']::jsonb[], ARRAY[NULL, '{"x": null}']::jsonb[]) r) s;
-- empty and NULL input
SELECT rbr_grader_report('{}', '{}') IS NULL AS empty_is_null,
       rbr_grader_report(NULL, ARRAY['{}']::jsonb[]) IS NULL AS null_is_null;
-- errors
SELECT rbr_grader_report(ARRAY['{"x": true}']::jsonb[], ARRAY['{}', '{}']::jsonb[]);
SELECT rbr_grader_report(ARRAY['[true]']::jsonb[], ARRAY['{}']::jsonb[]);
SELECT rbr_grader_report(ARRAY['{"x": true}']::jsonb[], ARRAY['0.5']::jsonb[]);
SELECT rbr_grader_report(ARRAY['{"x": true}', '{"x": "yes"}']::jsonb[], ARRAY['{}', '{}']::jsonb[]);
SELECT rbr_grader_report(ARRAY['{"x": true}']::jsonb[], ARRAY['{"x": 1.5}']::jsonb[]);
SELECT rbr_grader_report(ARRAY['{"x": true}']::jsonb[], ARRAY['{"x": "0.5"}']::jsonb[]);
SELECT rbr_grader_report(ARRAY['{"x": true}']::jsonb[], ARRAY['{"x": 0.5}']::jsonb[], 'NaN');
SELECT rbr_grader_report(ARRAY['{"x": true}']::jsonb[], ARRAY['{"x": 0.5}']::jsonb[], 0.5, 0);
SELECT rbr_binarize('{"a": 2}');
SELECT rbr_binarize('{"a": 0.2}', '{"a": "high"}');
SELECT rbr_binarize('[0.2]');

-------------------------------------------------------------------------------
-- The 351 gold rows with synthetic grader probabilities made from the labels:
--   every proposition: 0.9 when true, 0.1 when false, except
--   apology:      flipped (0.1 when true, 0.9 when false) on rows with id % 10 = 0
--   third_person: 0.35 when true, 0.1 when false: all "no" at 0.5, perfect above 0.225
--   judgement:    not graded (JSON null) on rows with id % 50 = 0, missing on id % 50 = 25
--   the probs also carry a class probability, which is not labelled and is ignored
-------------------------------------------------------------------------------
CREATE TABLE gold_raw (line text);
\copy gold_raw FROM '../shared/reference/gold_train.jsonl' WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
CREATE TABLE gold AS
SELECT row_number() OVER () AS id, line::jsonb -> 'propositions' AS labels FROM gold_raw;
CREATE TABLE synth AS
SELECT g.id,
       (SELECT jsonb_object_agg(e.key, CASE
                   WHEN e.key = 'judgement' AND g.id % 50 = 0 THEN NULL
                   WHEN e.key = 'apology' AND g.id % 10 = 0 THEN CASE WHEN e.value::boolean THEN 0.1 ELSE 0.9 END
                   WHEN e.key = 'third_person' THEN CASE WHEN e.value::boolean THEN 0.35 ELSE 0.1 END
                   ELSE CASE WHEN e.value::boolean THEN 0.9 ELSE 0.1 END END)
          FROM jsonb_each(g.labels) e
         WHERE NOT (e.key = 'judgement' AND g.id % 50 = 25)) || '{"ideal": 0.5}' AS probs
  FROM gold g;
CREATE TABLE gold_report AS
SELECT rbr_grader_report(array_agg(g.labels), array_agg(s.probs)) AS r FROM gold g JOIN synth s USING (id);

-- independent computation in plain SQL: one row per (gold row, proposition)
CREATE TABLE flat AS
SELECT g.id, e.key AS prop, e.value::boolean AS y, (s.probs ->> e.key)::float8 AS p
  FROM gold g JOIN synth s USING (id), jsonb_each(g.labels) e;
CREATE TABLE ind AS
SELECT prop, count(p) AS n, count(*) FILTER (WHERE y AND p IS NOT NULL) AS pos,
       count(*) FILTER (WHERE p IS NULL) AS ungraded,
       count(*) FILTER (WHERE y AND p > 0.5) AS tp, count(*) FILTER (WHERE NOT y AND p > 0.5) AS fp,
       count(*) FILTER (WHERE y AND p <= 0.5) AS fn, count(*) FILTER (WHERE NOT y AND p <= 0.5) AS tn,
       avg((p - CASE WHEN y THEN 1 ELSE 0 END) ^ 2) AS brier
  FROM flat GROUP BY prop;

-- expected: 23 propositions, 351 * 23 = 8073 labelled values; judgement is not
-- graded on 7 rows (id 50, 100, ..., 350) and missing on 7 (25, 75, ..., 325):
-- 14 ungraded, 8059 graded
SELECT count(*) AS propositions, sum(n) AS graded, sum(ungraded) AS ungraded FROM ind;
SELECT (SELECT count(*) FROM jsonb_object_keys(r->'by_proposition')) AS propositions,
       r->'all'->'n' AS graded, r->'all'->'ungraded' AS ungraded, r->'rows' AS rows
  FROM gold_report;

-- every count, accuracy, precision, recall, F1, kappa and Brier score agrees
-- with the independent computation (kappa from po and pe, the textbook way)
SELECT count(*) AS propositions_compared,
       count(*) FILTER (WHERE (o->>'n')::bigint <> i.n OR (o->>'positives')::bigint <> i.pos
                           OR (o->>'ungraded')::bigint <> i.ungraded
                           OR (o->>'tp')::bigint <> i.tp OR (o->>'fp')::bigint <> i.fp
                           OR (o->>'fn')::bigint <> i.fn OR (o->>'tn')::bigint <> i.tn) AS count_mismatches,
       count(*) FILTER (WHERE abs((o->>'accuracy')::float8 - (i.tp + i.tn)::float8 / i.n) > 1e-12
                           OR abs((o->>'brier')::float8 - i.brier) > 1e-12) AS accuracy_brier_mismatches,
       count(*) FILTER (WHERE (o->>'precision')::float8 IS DISTINCT FROM i.tp::float8 / nullif(i.tp + i.fp, 0)
                           OR (o->>'recall')::float8 IS DISTINCT FROM i.tp::float8 / nullif(i.tp + i.fn, 0)
                           OR abs(coalesce((o->>'f1')::float8, -1)
                                  - coalesce(2 * i.tp::float8 / nullif(2 * i.tp + i.fp + i.fn, 0), -1)) > 1e-12) AS prf_mismatches,
       count(*) FILTER (WHERE abs(coalesce((o->>'kappa')::float8, -9) - coalesce(
                    (po - pe) / nullif(1 - pe, 0), -9)) > 1e-12) AS kappa_mismatches
  FROM gold_report, jsonb_each(r->'by_proposition') AS b(prop, o)
  JOIN ind i USING (prop),
       LATERAL (SELECT (i.tp + i.tn)::float8 / i.n AS po,
                       ((i.tp + i.fp)::float8 / i.n) * ((i.tp + i.fn)::float8 / i.n)
                       + ((i.fn + i.tn)::float8 / i.n) * ((i.fp + i.tn)::float8 / i.n) AS pe) k;

-- the propositions we changed, with their numbers; the others are perfect.
-- apology: 106 true; flips on rows id % 10 = 0 turn those into errors, so
--   accuracy = 1 - flipped/351, the best threshold stays 0.5 (flipping is not
--   fixable by a threshold); third_person: accuracy at 0.5 = 1 - 42/351 (all
--   42 positives missed), best threshold (0.1 + 0.35)/2 = 0.225 with accuracy 1;
-- prescribes_dosage: never true in the gold rows, so recall, F1 and kappa are null.
SELECT count(*) AS apology_flipped_rows FROM gold WHERE id % 10 = 0;
SELECT prop, i.n, i.pos, round((o->>'accuracy')::numeric, 4) AS accuracy, round((o->>'kappa')::numeric, 4) AS kappa,
       round((o->>'recall')::numeric, 4) AS recall, round((o->>'best_threshold')::numeric, 6) AS best_t,
       round((o->>'best_accuracy')::numeric, 4) AS best_acc
  FROM gold_report, jsonb_each(r->'by_proposition') AS b(prop, o) JOIN ind i USING (prop)
 WHERE prop IN ('apology', 'third_person', 'judgement', 'prescribes_dosage', 'fully_complies')
 ORDER BY prop;
SELECT round(1 - 35 / 351.0, 4) AS apology_expected, round(1 - 42 / 351.0, 4) AS third_person_expected;
SELECT count(*) FILTER (WHERE (o->>'accuracy')::float8 = 1) AS perfect_at_half,
       count(*) FILTER (WHERE (o->>'best_accuracy')::float8 = 1) AS perfect_at_best,
       count(*) FILTER (WHERE (o->>'best_threshold')::float8 = 0.5) AS best_is_half
  FROM gold_report, jsonb_each(r->'by_proposition') AS b(prop, o);

-- best threshold: a brute force over t = 0, 0.005, ..., 1 finds the same best
-- accuracy, and the reported threshold attains it
SELECT count(*) AS propositions,
       count(*) FILTER (WHERE abs((o->>'best_accuracy')::float8 - bf.best) > 1e-12) AS best_accuracy_mismatches,
       count(*) FILTER (WHERE abs(at_t.acc - bf.best) > 1e-12) AS reported_threshold_not_best
  FROM gold_report, jsonb_each(r->'by_proposition') AS b(prop, o),
       LATERAL (SELECT max(acc) AS best FROM (
                  SELECT avg(((f.p > t) = f.y)::int::float8) AS acc
                    FROM generate_series(0, 200) k, LATERAL (SELECT k / 200.0 AS t) tt, flat f
                   WHERE f.prop = b.prop AND f.p IS NOT NULL GROUP BY k) x) bf,
       LATERAL (SELECT avg(((f.p > (o->>'best_threshold')::float8) = f.y)::int::float8) AS acc
                  FROM flat f WHERE f.prop = b.prop AND f.p IS NOT NULL) at_t;

-- calibration of all values: p 0.1 falls in bin 2, 0.35 in bin 4, 0.9 in bin 10
SELECT (b->>'bin')::int AS bin, b->'count' AS count, round((b->>'mean_predicted')::numeric, 6) AS mean_predicted,
       round((b->>'observed_rate')::numeric, 4) AS observed_rate, ind.n AS independent_count,
       round(ind.rate::numeric, 4) AS independent_rate
  FROM gold_report, jsonb_array_elements(r->'all'->'calibration') b
  LEFT JOIN (SELECT floor(p * 10)::int + 1 AS bin, count(*) AS n, avg(y::int::float8) AS rate
               FROM flat WHERE p IS NOT NULL GROUP BY 1) ind ON ind.bin = (b->>'bin')::int
 WHERE (b->>'count')::int > 0 OR ind.n IS NOT NULL
 ORDER BY 1;
SELECT abs((r->'all'->>'brier')::float8 - (SELECT avg((p - y::int) ^ 2) FROM flat)) < 1e-12 AS overall_brier_agrees,
       abs((r->'all'->>'accuracy')::float8 - (SELECT avg(((p > 0.5) = y)::int::float8) FROM flat)) < 1e-12 AS overall_accuracy_agrees
  FROM gold_report;

-- binarising the synthetic probabilities with the gold-tuned thresholds gives
-- back the labels, except apology on the flipped rows and judgement where ungraded
SELECT count(*) AS values_differing,
       count(*) FILTER (WHERE prop = 'apology') AS apology, count(*) FILTER (WHERE prop = 'judgement') AS judgement
  FROM gold g JOIN synth s USING (id),
       LATERAL (SELECT rbr_binarize(s.probs, rbr_grader_thresholds(r)) AS bin FROM gold_report) x,
       jsonb_each(g.labels) AS e(prop, v)
 WHERE (x.bin -> prop) IS DISTINCT FROM v;

-- the reliability diagram: one line per proposition asked, legend escaped
SELECT left(svg, 4) AS starts, right(svg, 6) AS ends,
       (length(svg) - length(replace(svg, '<polyline', ''))) / length('<polyline') AS lines,
       svg LIKE '%all propositions (8059)%' AS overall_legend, svg LIKE '%third_person (351)%' AS legend,
       svg LIKE '%a &lt; b%' AS escaped_title
  FROM (SELECT rbr_calibration_svg(r, ARRAY[NULL, 'apology', 'third_person'], 'a < b') AS svg FROM gold_report) s;
SELECT rbr_calibration_svg(r, ARRAY['no_such']) FROM gold_report;
SELECT rbr_calibration_svg('{"a": 1}');

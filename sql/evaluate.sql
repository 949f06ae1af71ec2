-- Evaluation: rbr_pair_errors (error rates per label pair) and reward histograms.

-- by hand: one prompt, three completions.
--   ideal:      rm 1.0, rbr  2.0 -> total 3.0
--   refusal:    rm 3.0, rbr  0.5 -> total 3.5
--   disallowed: rm 5.0, rbr -4.0 -> total 1.0
-- pairs (better > worse): ideal > refusal: rm wrong, rm+rbr wrong, rbr right;
-- ideal > disallowed: rm wrong, rm+rbr right, rbr right;
-- refusal > disallowed: rm wrong, rm+rbr right, rbr right.
CREATE TABLE hand (prompt text, tier int, label text, rm float8, rbr float8);
INSERT INTO hand VALUES ('p', 0, 'ideal', 1.0, 2.0), ('p', 1, 'refusal', 3.0, 0.5), ('p', 2, 'disallowed', 5.0, -4.0),
                        ('q', 0, 'ideal', 1.0, 1.0), ('q', 0, 'ideal', 2.0, 2.0), ('r', NULL, 'ideal', 1.0, 1.0);
SELECT jsonb_pretty(rbr_pair_errors(prompt, tier, label, rm, rbr)) FROM hand;
SELECT rbr_pair_errors(prompt, tier, label, rm, rbr) IS NULL AS no_pairs_is_null FROM hand WHERE prompt = 'q';
SELECT rbr_pair_errors(prompt, tier, label, rm, 'NaN') FROM hand;

-- on generated data, per response type, and the same under a parallel plan
SELECT setseed(0.3);
CREATE TABLE gen AS
SELECT g::text AS prompt, CASE WHEN g % 2 = 0 THEN 'comply' ELSE 'hard_refuse' END AS rt, c AS tier,
       (ARRAY['ideal', 'bad_refusal', 'disallowed'])[c + 1] AS label,
       c * 0.7 + random() AS rm, -c * 1.5 + random() AS rbr
  FROM generate_series(1, 200) g, generate_series(0, 2) c, generate_series(1, 2) k;
CREATE TABLE serial_errors AS SELECT rt, rbr_pair_errors(prompt, tier, label, rm, rbr) AS e FROM gen GROUP BY rt;
SELECT rt, e->'all'->'pairs' AS pairs, (e->'all'->>'rm')::float8 > 0.5 AS rm_mostly_wrong,
       (e->'all'->>'rm_rbr')::float8 < 0.2 AS rm_rbr_mostly_right, jsonb_object_keys(e->'by_label_pair') AS label_pair
  FROM serial_errors ORDER BY 1, 5;
SET parallel_setup_cost = 0;
SET parallel_tuple_cost = 0;
SET min_parallel_table_scan_size = 0;
SET max_parallel_workers_per_gather = 2;
EXPLAIN (COSTS OFF) SELECT rbr_pair_errors(prompt, tier, label, rm, rbr) FROM gen;
SELECT bool_and(s.e = p.e) AS parallel_equals_serial
  FROM serial_errors s JOIN (SELECT rt, rbr_pair_errors(prompt, tier, label, rm, rbr) AS e FROM gen GROUP BY rt) p USING (rt);
RESET parallel_setup_cost;
RESET parallel_tuple_cost;
RESET min_parallel_table_scan_size;
RESET max_parallel_workers_per_gather;
-- the state with labels survives its text form (rbr.fit_rows), and a crafted
-- label offset is refused
CREATE AGGREGATE error_rows_of(text, int, text, float8, float8) (SFUNC = rbr.pair_errors_transfn, STYPE = rbr.fit_rows);
CREATE TABLE error_state AS SELECT rt, error_rows_of(prompt, tier, label, rm, rbr) AS st FROM gen GROUP BY rt;
SELECT bool_and(rbr.pair_errors_finalfn(st::text::rbr.fit_rows) = s.e) AS text_round_trip
  FROM error_state JOIN serial_errors s USING (rt);
SELECT rbr.pair_errors_finalfn(('rbr2:' || translate(encode(set_byte(b, 44 + 16 * n + 8 * n + 7, 64), 'base64'), E'\n', ''))::rbr.fit_rows)
  FROM (SELECT decode(substr(st::text, 6), 'base64') AS b, 600 AS n FROM error_state WHERE rt = 'comply') s;
-- combined from partitions: partitionwise aggregation, same result
CREATE TABLE gen_part (LIKE gen) PARTITION BY LIST (rt);
CREATE TABLE gen_part_c PARTITION OF gen_part FOR VALUES IN ('comply');
CREATE TABLE gen_part_r PARTITION OF gen_part FOR VALUES IN ('hard_refuse');
INSERT INTO gen_part SELECT * FROM gen;
ANALYZE gen_part;
CREATE TABLE whole_errors AS
SELECT prompt::int % 3 AS third, rbr_pair_errors(prompt, tier, label, rm, rbr) AS e FROM gen_part GROUP BY 1;
SET enable_partitionwise_aggregate = on;
SET max_parallel_workers_per_gather = 0;
EXPLAIN (COSTS OFF) SELECT prompt::int % 3, rbr_pair_errors(prompt, tier, label, rm, rbr) FROM gen_part GROUP BY 1;
SELECT bool_and(w.e = p.e) AS partitionwise_equals, count(*) AS groups
  FROM whole_errors w
  JOIN (SELECT prompt::int % 3 AS third, rbr_pair_errors(prompt, tier, label, rm, rbr) AS e FROM gen_part GROUP BY 1) p USING (third);
RESET max_parallel_workers_per_gather;
RESET enable_partitionwise_aggregate;

-- histograms: the text table
SELECT label, bin, low, high, count, round(share::numeric, 3) AS share, bar
  FROM rbr_histogram(ARRAY['a', 'a', 'a', 'b', 'b', NULL], ARRAY[0, 1, 1, 2, 4, 4]::float8[], 4);
SELECT count(*) AS rows FROM rbr_histogram(ARRAY['a'], ARRAY[NULL]::float8[], 4);
-- centred on each prompt's mean tier-0 reward
SELECT label, sum(count) AS completions, round(sum(share)::numeric, 6) AS shares_sum_to_1
  FROM rbr_histogram((SELECT array_agg(label ORDER BY prompt, tier, rm) FROM gen),
                     (SELECT array_agg(c ORDER BY prompt, tier, rm) FROM
                        (SELECT prompt, tier, rm, (rm + rbr) - avg(rm + rbr) FILTER (WHERE tier = 0) OVER (PARTITION BY prompt) AS c FROM gen) s),
                     10)
 GROUP BY label ORDER BY label;
-- the SVG picture: one line and one legend entry per label, labels escaped
SELECT left(svg, 4) AS starts, right(svg, 6) AS ends,
       (length(svg) - length(replace(svg, '<polyline', ''))) / length('<polyline') AS lines,
       svg LIKE '%a &lt;b&gt; &amp; c (2)%' AS escaped_legend
  FROM (SELECT rbr_histogram_svg(ARRAY['a <b> & c', 'a <b> & c', 'd'], ARRAY[-1, 1, 0.5]::float8[], 5, 'test') AS svg) s;
SELECT rbr_histogram_svg(ARRAY['a'], ARRAY[1]::float8[], 0);
SELECT rbr_histogram_svg(ARRAY['a'], ARRAY[NULL]::float8[]);

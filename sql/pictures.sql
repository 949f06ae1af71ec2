-- Pictures: rbr_reward_figure_svg (reward distributions per class) and
-- rbr_reliability_svg (grader calibration per proposition); their helpers,
-- edge cases and errors. Rendering in a browser is test/t/090_pictures.t.
\set VERBOSITY terse

-- helpers: escaping, round ticks that cover the range
SELECT rbr.svg_escape('a <b> & "c" ''d''') AS escaped, rbr.svg_escape(NULL) AS null_is_empty;
SELECT rbr.svg_ticks(-2.3, 0.7) AS a, rbr.svg_ticks(0, 1, 5) AS b, rbr.svg_ticks(-60, 15) AS c,
       rbr.svg_ticks(3, 3) AS flat, rbr.svg_ticks(-0.013, 0.004) AS small;

-- two response types, two prompts each; classes named so that alphabetical
-- order is the reverse of tier order
CREATE TABLE fig (prompt text, rt text, label text, tier int, rm float8, rbr float8);
INSERT INTO fig VALUES
  ('p1', 'comply', 'z_best', 0, 1.0, 2.0), ('p1', 'comply', 'm_mid', 1, 1.5, 0.0), ('p1', 'comply', 'a_worst <&>', 2, 2.0, -3.0),
  ('p2', 'comply', 'z_best', 0, 0.5, 1.0), ('p2', 'comply', 'z_best', 0, 0.7, 1.2), ('p2', 'comply', 'a_worst <&>', 2, 0.0, -1.0),
  ('q1', 'hard_refuse', 'ideal', 0, 0.0, 1.0), ('q1', 'hard_refuse', 'bad', 3, 1.0, -1.0);
CREATE FUNCTION fig_svg(extra_where text DEFAULT 'true') RETURNS text LANGUAGE plpgsql AS $$
DECLARE r text;
BEGIN
    EXECUTE 'SELECT rbr_reward_figure_svg(array_agg(prompt), array_agg(rt), array_agg(label), array_agg(tier),
                                          array_agg(rm), array_agg(rbr), 10, ''t & <title>'') FROM fig WHERE ' || extra_where
       INTO r;
    RETURN r;
END $$;
SELECT left(svg, 4) AS starts, right(svg, 6) AS ends,
       svg LIKE '%viewBox="0 0 %' AS viewbox,
       svg LIKE '%t &amp; &lt;title&gt;%' AS escaped_title,
       svg LIKE '%a_worst &lt;&amp;&gt;%' AND svg NOT LIKE '%<&>%' AS escaped_label,
       position('z_best' IN svg) < position('m_mid' IN svg) AND position('m_mid' IN svg) < position('a_worst' IN svg) AS tier_order,
       (length(svg) - length(replace(svg, '>RM + RBR<', ''))) / length('>RM + RBR<') AS rm_rbr_panels,
       svg LIKE '%8 completions drawn; 10 bins%' AS footnote
  FROM (SELECT fig_svg() AS svg) s;
-- centring on the prompt's best tier: p1's best (z_best) has RM + RBR 3.0, so
-- m_mid sits at -1.5 and a_worst at -4; the RM + RBR ticks cover -4 to 0
SELECT svg LIKE '%>-4</text>%' AS tick_minus_4, svg LIKE '%<title>mean -1.5</title>%' AS mid_mean
  FROM (SELECT fig_svg() AS svg) s;

-- one label, one row: a single flat panel per signal, no error
SELECT left(svg, 4) AS starts, svg LIKE '%1 completions drawn%' AS one_row,
       (length(svg) - length(replace(svg, '<title>mean 0</title>', ''))) / length('<title>mean 0</title>') AS means_at_0
  FROM (SELECT fig_svg('label = ''ideal'' AND tier = 0') AS svg) s;

-- NaN, infinite and NULL inputs are left out and counted
INSERT INTO fig VALUES ('p1', 'comply', 'z_best', 0, 'NaN', 1.0), ('p1', 'comply', 'z_best', 0, 1.0, 'Infinity'),
                       ('p1', 'comply', 'z_best', 0, NULL, 1.0), ('p1', NULL, 'z_best', 0, 1.0, 1.0);
SELECT svg LIKE '%8 completions drawn, 4 left out (NULL or non-finite input)%' AS left_out
  FROM (SELECT fig_svg() AS svg) s;

-- errors: nothing usable, empty input, arrays of different lengths, bins
SELECT fig_svg('rm = ''NaN''');
SELECT rbr_reward_figure_svg('{}', '{}', '{}', '{}', '{}', '{}');
SELECT rbr_reward_figure_svg(NULL, NULL, NULL, NULL, NULL, NULL);
SELECT rbr_reward_figure_svg(ARRAY['p'], ARRAY['comply'], ARRAY['ideal'], ARRAY[0], ARRAY[1.0, 2.0]::float8[], ARRAY[1.0]::float8[]);
SELECT rbr_reward_figure_svg(ARRAY['p'], ARRAY['comply'], ARRAY['ideal'], ARRAY[0], ARRAY[1.0]::float8[], ARRAY[1.0]::float8[], 0);

-- reliability: a grader whose P(yes) is 0.02 or 0.97 fills two bins, and
-- the picture says so; one with spread does not get the note
CREATE TABLE cal (labels jsonb, probs jsonb);
INSERT INTO cal SELECT jsonb_build_object('apology', g % 3 = 0, 'a<b', g % 2 = 0, 'never_graded', true),
                       jsonb_build_object('apology', CASE WHEN g % 3 = 0 THEN 0.97 ELSE 0.02 END, 'a<b', (g % 10) / 10.0 + 0.05)
                  FROM generate_series(1, 60) g;
CREATE TABLE cal_report AS SELECT rbr_grader_report(array_agg(labels), array_agg(probs)) AS r FROM cal;
SELECT left(svg, 4) AS starts, right(svg, 6) AS ends,
       svg LIKE '%Grader calibration per proposition%' AS title,
       svg LIKE '%>a&lt;b</text>%' AS escaped_name,
       (length(svg) - length(replace(svg, 'only 2 of 10 bins have answers', ''))) / length('only 2 of 10 bins have answers') AS few_bin_notes,
       svg LIKE '%Every answer of this grader%' AS global_note,
       svg LIKE '%not drawn: never_graded.%' AS ungraded_footnote,
       (length(svg) - length(replace(svg, '<circle', ''))) / length('<circle') AS points
  FROM (SELECT rbr_reliability_svg(r) AS svg FROM cal_report) s;
-- only the named propositions (an ungraded one named gets an empty panel)
SELECT (length(svg) - length(replace(svg, '<circle', ''))) / length('<circle') AS points,
       svg LIKE '%no graded answers%' AS empty_panel, svg LIKE '%>apology</text>%' AS apology_drawn
  FROM (SELECT rbr_reliability_svg(r, ARRAY['never_graded'], 1, 'x') AS svg FROM cal_report) s;
-- all answers of the grader near 0 or 1: the overall note
SELECT svg LIKE '%Every answer of this grader%' AS global_note
  FROM (SELECT rbr_reliability_svg(rbr_grader_report(array_agg(labels), array_agg(probs - 'a<b'))) AS svg FROM cal) s;

-- errors
SELECT rbr_reliability_svg(NULL);
SELECT rbr_reliability_svg('{"a": 1}');
SELECT rbr_reliability_svg(r, ARRAY['no_such']) FROM cal_report;
SELECT rbr_reliability_svg(r, ARRAY[NULL]) FROM cal_report;
SELECT rbr_reliability_svg(r, NULL, 0) FROM cal_report;

-- rbr_histogram_svg: legend in the order labels first appear (here the
-- reverse of alphabetical), a viewBox, an x-axis label and round ticks
SELECT position('z_first' IN svg) < position('a_second' IN svg) AS input_order,
       svg LIKE '%viewBox="0 0 %' AS viewbox, svg LIKE '%>value (bins of width 0.25)<%' AS x_label,
       svg LIKE '%>0.5</text>%' AS tick
  FROM (SELECT rbr_histogram_svg(ARRAY['z_first', 'a_second', 'z_first'], ARRAY[0, 1, 0.2]::float8[], 4) AS svg) s;

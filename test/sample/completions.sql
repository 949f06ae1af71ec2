-- A sample table of completions to grade, fit and score, built from the
-- paper's 351 human-labelled gold rows (../shared/reference/gold_train.jsonl,
-- read from the current directory: run psql from the repository's root).
-- Each of the first :prompts gold prompts gets 6 candidate completions: its
-- own and 5 of other gold rows of the same response type. tier = the quality
-- tier of the candidate's class under its human labels (0 = best, policy
-- 'paper'); rm = a simulated helpful-only reward model that prefers
-- compliance. psql variables: sample_table (default completions), prompts
-- (default 40). Needs the policy loaded as 'paper'.
\if :{?sample_table}
\else
\set sample_table completions
\endif
\if :{?prompts}
\else
\set prompts 40
\endif
CREATE TEMP TABLE rbr_sample_raw (line text);
\copy rbr_sample_raw FROM '../shared/reference/gold_train.jsonl' WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
CREATE TEMP TABLE rbr_sample_gold AS
SELECT row_number() OVER () AS gid, j ->> 'category' AS category, j ->> 'response_type' AS response_type,
       j -> 'prompt' AS prompt, j -> 'completion' -> 0 ->> 'content' AS completion, j -> 'propositions' AS labels
  FROM (SELECT line::jsonb AS j FROM rbr_sample_raw) s;
SELECT setseed(0.7) AS seeded \gset
CREATE TABLE :"sample_table" AS
WITH numbered AS (
    SELECT g.*, row_number() OVER (PARTITION BY response_type ORDER BY gid) AS n,
           count(*) OVER (PARTITION BY response_type) AS total
      FROM rbr_sample_gold g
), owners AS (
    SELECT * FROM numbered WHERE gid <= :prompts
)
SELECT row_number() OVER (ORDER BY o.gid, k) AS id, o.gid AS prompt_id, o.category, o.response_type,
       o.prompt, c.completion, c.labels,
       rbr_label_tier('paper', o.response_type, rbr_classify('paper', o.response_type, c.labels)) AS tier,
       (c.labels ->> 'fully_complies')::boolean::int * 1.0 + (c.labels ->> 'partially_complies')::boolean::int * 0.4
         + 0.6 * random() AS rm
  FROM owners o
  CROSS JOIN generate_series(0, 5) k
  JOIN numbered c ON c.response_type = o.response_type AND c.n = 1 + (o.n - 1 + k * 7) % o.total;
ALTER TABLE :"sample_table" ADD PRIMARY KEY (id);
DROP TABLE rbr_sample_raw, rbr_sample_gold;

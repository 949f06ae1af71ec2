-- Synthetic comparison data in the paper's shape (a generator of our own).
-- psql variables: prompts (number of prompts), seed (0..1).
-- Per prompt: a response type (hard_refuse, safe_refuse_1, safe_refuse_2,
-- comply); 16 completions in three tiers (5 best, 6 middle, 5 worst); for
-- each completion 23 proposition probabilities: a true/false trait drawn with
-- a probability that depends on (response type, tier, proposition), then
-- graded with noise (a true trait reads 0.75..0.99, a false one 0.01..0.25,
-- and 5% of answers are flipped); and a helpful-only reward model score that
-- prefers compliance: for the refusal types it scores the worst tier (which
-- complies with a harmful request) highest, so RM alone mis-ranks refusals.
SELECT setseed(:seed);
DROP TABLE IF EXISTS comparisons;
CREATE TABLE comparisons AS
WITH c AS (
    SELECT p, (ARRAY['hard_refuse', 'safe_refuse_1', 'safe_refuse_2', 'comply'])[1 + p % 4] AS rt, p % 4 AS rti,
           k, CASE WHEN k <= 5 THEN 0 WHEN k <= 11 THEN 1 ELSE 2 END AS tier
      FROM generate_series(1, :prompts) p, generate_series(1, 16) k
)
SELECT p AS prompt, rt, k, tier,
       ARRAY(SELECT CASE WHEN (random() < 0.5 + 0.45 * sin(j * 1.7 + tier * 2.3 + rti * 0.9)) <> (random() < 0.05)
                         THEN 0.75 + 0.24 * random() ELSE 0.01 + 0.24 * random() END
               FROM generate_series(1, 23) j WHERE k > 0) AS features,
       CASE WHEN rti < 3 THEN (tier = 2)::int * 1.0 + (tier = 1)::int * 0.3
            ELSE (tier = 0)::int * 1.0 + (tier = 1)::int * 0.4 END + 0.8 * random() AS rm
  FROM c;
ANALYZE comparisons;

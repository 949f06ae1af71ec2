-- rbr_reward(weights, features, base_reward) = base_reward + weights . features
SELECT rbr_reward('{1, 2, 3}', '{0.5, 0.25, 1}');
SELECT rbr_reward('{1, 2, 3}', '{0.5, 0.25, 1}', -1.5);
SELECT rbr_reward('{}', '{}', 2);
SELECT rbr_reward('{-0.5}', '{1}', 0);
-- NULL in, NULL out: a NULL argument or a feature not graded yet
SELECT rbr_reward(NULL, '{1}', 0) IS NULL AS null_weights,
       rbr_reward('{1}', NULL, 0) IS NULL AS null_features,
       rbr_reward('{1}', '{1}', NULL) IS NULL AS null_base,
       rbr_reward('{1, 2}', '{1, NULL}', 0) IS NULL AS null_feature;
-- errors
SELECT rbr_reward('{1, 2}', '{1}');
SELECT rbr_reward('{1, NULL}', '{1, 2}');
SELECT rbr_reward('{1, NaN}', '{1, 2}');
SELECT rbr_reward('{1, 2}', '{Infinity, 2}');
SELECT rbr_reward('{1, 2}', '{1, 2}', 'NaN');
SELECT rbr_reward('{1, 2}', '{1, 2}', '-Infinity');
SELECT rbr_reward('{1e308, 1e308}', '{1e308, 1e308}');
SELECT rbr_reward('{{1, 2}}', '{{1, 2}}');
-- labels
SELECT pronargs, provolatile, proparallel, proisstrict FROM pg_proc WHERE proname = 'rbr_reward' ORDER BY pronargs;
-- the same as plain SQL arithmetic
SELECT abs(rbr_reward(ARRAY[0.3, -1.2, 2.5]::float8[], ARRAY[x, y, z], b) - (b + 0.3 * x + (-1.2) * y + 2.5 * z)) < 1e-12 AS same
  FROM (VALUES (0.1::float8, 0.7::float8, 0.2::float8, 1.0::float8), (1, 0, 0.5, -3)) v(x, y, z, b);
SELECT rbr_reward('{1e308}', '{1}', 1e308);

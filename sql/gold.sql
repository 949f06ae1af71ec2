-- The 351 human-labelled gold rows of the paper's release: every row falls in
-- exactly one class of its response type, and the class counts agree with an
-- independent evaluation of the policy written here in PL/pgSQL.
\set spec `cat ../shared/reference/policy.json`
SELECT rbr_policy_load('paper', :'spec') AS version;

CREATE TABLE gold_raw (line text);
\copy gold_raw FROM '../shared/reference/gold_train.jsonl' WITH (FORMAT csv, QUOTE E'\x01', DELIMITER E'\x02')
CREATE TABLE gold AS
SELECT row_number() OVER () AS id,
       line::jsonb ->> 'category' AS category,
       line::jsonb ->> 'response_type' AS response_type,
       line::jsonb -> 'propositions' AS labels
  FROM gold_raw;
SELECT count(*) AS gold_rows FROM gold;

-- independent reference: does a conjunction of literals hold for the labels?
CREATE FUNCTION holds(spec jsonb, lits jsonb, labels jsonb) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    name text;
    wanted boolean;
    actual boolean;
BEGIN
    FOR name, wanted IN SELECT key, value::text::boolean FROM jsonb_each(lits) LOOP
        IF spec -> 'derived_propositions' ? name THEN
            actual := holds(spec, spec -> 'derived_propositions' -> name, labels);
        ELSE
            actual := (labels ->> name)::boolean;
        END IF;
        IF actual IS DISTINCT FROM wanted THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END
$$;

CREATE TABLE reference_classes AS
SELECT g.id, lower(replace(g.response_type, ' ', '_')) AS rt, c.class
  FROM gold g
  CROSS JOIN jsonb_object_keys(:'spec'::jsonb -> 'completion_classes') AS c(class)
 WHERE holds(:'spec'::jsonb,
             :'spec'::jsonb -> 'completion_classes' -> c.class -> lower(replace(g.response_type, ' ', '_')),
             g.labels);

-- the reference also finds exactly one class per row
SELECT count(*) AS rows_with_one_class
  FROM (SELECT id FROM reference_classes GROUP BY id HAVING count(*) = 1) s;

CREATE TABLE rbr_classes AS
SELECT id, rbr_classify('paper', response_type, labels) AS class
  FROM gold;

-- per response type and class, both counts side by side; they must agree
SELECT coalesce(r.rt, x.rt) AS response_type, coalesce(r.class, x.class) AS class,
       r.n AS reference, x.n AS rbr
  FROM (SELECT rt, class, count(*) n FROM reference_classes GROUP BY 1, 2) r
  FULL JOIN (SELECT lower(replace(g.response_type, ' ', '_')) rt, c.class, count(*) n
               FROM rbr_classes c JOIN gold g USING (id) GROUP BY 1, 2) x
         ON r.rt = x.rt AND r.class = x.class
 ORDER BY 1, 2;
SELECT count(*) AS rows_where_rbr_and_reference_differ
  FROM rbr_classes c JOIN reference_classes r USING (id)
 WHERE c.class <> r.class;

-- with 0/1 inputs the class probabilities are the indicator of that class (both modes)
SELECT count(*) AS rows,
       bool_and((rbr_class_probs('paper', g.response_type, g.labels) ->> c.class)::float8 = 1) AS product_indicator,
       bool_and((rbr_class_probs('paper', g.response_type, g.labels, 'exact') ->> c.class)::float8 = 1) AS exact_indicator,
       bool_and((SELECT sum(value::float8) FROM jsonb_each_text(rbr_class_probs('paper', g.response_type, g.labels))) = 1) AS sums_to_1
  FROM gold g JOIN rbr_classes c USING (id);

-- the feature vector of a labelled row carries its class as a one-hot block
SELECT g.response_type, count(*) AS rows,
       bool_and(f[array_position(n, c.class)] = 1) AS own_class_is_1,
       bool_and((SELECT sum(x) FROM unnest(f[array_length(n, 1) - 4:]) x) = 1) AS class_block_sums_to_1
  FROM gold g JOIN rbr_classes c USING (id),
       LATERAL (SELECT rbr_features('paper', g.response_type, g.labels) AS f,
                       rbr_feature_names('paper', g.response_type) AS n) v
 GROUP BY 1 ORDER BY 1;

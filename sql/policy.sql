-- Policies: loading the released spec, versions, validation errors.
\set spec `cat ../shared/reference/policy.json`
CREATE TABLE ref AS SELECT :'spec'::jsonb AS spec;

-- the released policy.json loads exactly as it is
SELECT rbr_policy_load('released', spec) FROM ref;
-- the same spec again is the same version
SELECT rbr_policy_load('released', spec) FROM ref;
SELECT name, latest_version, versions, simple_propositions, derived_propositions, classes
  FROM rbr.policies;
SELECT jsonb_pretty(rbr_policy_info('released') - 'response_types');
SELECT key AS response_type, jsonb_array_length(value->'features') AS features,
       jsonb_array_length(value->'propositions') AS propositions
  FROM jsonb_each(rbr_policy_info('released')->'response_types') ORDER BY 1;

-- a different spec under the same name needs replace => true
SELECT rbr_policy_load('released', spec || '{"description": "v2"}') FROM ref;
SELECT rbr_policy_load('released', spec || '{"description": "v2"}', replace => true) FROM ref;
SELECT name, latest_version, versions FROM rbr.policies;
-- versions are immutable, and addressable as name@N
UPDATE rbr.policy_version SET spec = '{}' WHERE policy = 'released';
SELECT (rbr_policy_info('released@1')->>'version')::int AS v1,
       (rbr_policy_info('released')->>'version')::int AS latest;
SELECT rbr_policy_info('released@9');
SELECT rbr_policy_info('released@x');
SELECT rbr_policy_info('nosuch');
SELECT rbr_policy_info('');
SELECT rbr_policy_load('bad name!', spec) FROM ref;
SELECT rbr_policy_load(NULL, spec) FROM ref;

-- the cache sees a new version at once (features replaced for comply)
SELECT array_length(rbr_feature_names('released', 'comply'), 1) AS comply_features;
SELECT rbr_policy_load('released',
       spec || '{"features": {"Comply": ["fully_complies", "partially_complies", "ideal"]}}', replace => true)
  FROM ref;
SELECT rbr_feature_names('released', 'comply');
SELECT array_length(rbr_feature_names('released@1', 'comply'), 1) AS v1_comply_features;

-- extras: behavior policy, label tiers, features; response type names fold
SELECT rbr_policy_load('extras', spec || '{
  "behavior_policy": {"K-R": "Hard Refuse", "K-C": "comply", "SH-R1": "safe-refuse 1", "SH-R2": "Safe Refuse 2"},
  "label_tiers": {"hard_refuse": {"ideal": 0, "bad_refusal": 1, "disallowed": 2}},
  "features": {"HARD REFUSE": ["apology", "acceptable_refusal", "ideal", "disallowed_completion"]}}') FROM ref;
SELECT rbr_response_type('extras', 'K-R'), rbr_response_type('extras', 'SH-R1'), rbr_response_type('extras', 'K-C');
SELECT rbr_response_type('extras', 'H-R');
SELECT rbr_response_type('released', 'K-R');
SELECT rbr_label_tier('extras', 'Hard Refuse', 'bad_refusal'), rbr_label_tier('extras', 'comply', 'disallowed_completion');
SELECT rbr_label_tier('extras', 'hard_refuse', 'ideal_completion');
SELECT rbr_feature_names('extras', ' hard  refuse ');
SELECT rbr_feature_names('extras', 'soft_refuse');

-- validation: every error names the problem and where it is
SELECT rbr_policy_validate('[]');
SELECT rbr_policy_validate(spec || '{"prompt_templat": "x"}') FROM ref;
SELECT rbr_policy_validate(spec - 'simple_propositions') FROM ref;
SELECT rbr_policy_validate(spec - 'prompt_template') FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{prompt_template}', '"Answer: {question}"')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{prompt_template}', '"About {response}"')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{simple_propositions,apology}', '{}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{simple_propositions,apology}', '{"prompt": ""}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{simple_propositions,apology}', '"Is it an apology?"')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{simple_propositions}', '{}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{simple_propositions,""}', '{"prompt": "x"}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{simple_propositions,bad name}', '{"prompt": "x"}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{simple_propositions,a_name_that_is_much_too_long_to_be_a_column_name_in_postgresql_xx}', '{"prompt": "x"}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{derived_propositions,acceptable_refusal,apology}', '"true"')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{derived_propositions,acceptable_refusal,apology}', '1')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{derived_propositions,acceptable_refusal,apologies}', 'true')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{derived_propositions,acceptable_refusal}', '{}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{derived_propositions,apology}', '{"judgement": false}')) FROM ref;
-- a cycle: acceptable_refusal -> correct_refusal -> acceptable_refusal
SELECT rbr_policy_validate(jsonb_set(spec, '{derived_propositions,acceptable_refusal,correct_refusal}', 'false')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{derived_propositions,no_compliance,no_compliance}', 'true')) FROM ref;
-- classes
SELECT rbr_policy_validate(spec - 'completion_class_order') FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_class_order}', '"ideal"')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_class_order}', '[]')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_class_order}', '["ideal", "ideal"]')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_class_order}', '["ideal", 3]')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_class_order}',
       (spec->'completion_class_order') || '["perfect"]')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_class_order}',
       (spec->'completion_class_order') - 'ideal')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_class_order}',
       (spec->'completion_class_order') || '["apology"]')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_classes,ideal,Hard Refuse}', '{"apology": true}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_classes,ideal,soft_refuse}', '{"apology": true}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_classes,disallowed_completion,soft_refuse}', '{"apology": true}')) FROM ref;
SELECT rbr_policy_validate(spec #- '{completion_classes,illogical_completion,comply}') FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_classes,ideal,comply}', '{"meta_commentary": "no"}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_classes,ideal,comply}', '{"meta_comentary": false}')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_classes,ideal}', '[]')) FROM ref;
SELECT rbr_policy_validate(jsonb_set(spec, '{completion_classes}', '[]')) FROM ref;
-- extras
SELECT rbr_policy_validate(spec || '{"features": {"comply": []}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"features": {"comply": "apology"}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"features": {"comply": ["apology", "apology"]}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"features": {"comply": ["apologies"]}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"features": {"comply": [1]}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"features": {"refuse": ["apology"]}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"features": {"comply": ["apology"], "Comply": ["ideal"]}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"label_tiers": {"comply": {"ideal": -1}}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"label_tiers": {"comply": {"ideal": 0.5}}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"label_tiers": {"comply": {"ideal": "best"}}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"label_tiers": {"comply": {}}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"label_tiers": {"comply": {"": 1}}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"label_tiers": {"refuse": {"ideal": 0}}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"behavior_policy": {"K-R": "refuse"}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"behavior_policy": {"K-R": 1}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"behavior_policy": {"": "comply"}}') FROM ref;
SELECT rbr_policy_validate(spec || '{"behavior_policy": []}') FROM ref;
-- an invalid spec is never stored
SELECT rbr_policy_load('broken', spec - 'completion_classes') FROM ref;
SELECT count(*) FROM rbr.policy_version WHERE policy = 'broken';

-- a non-superuser sees only the policies it owns (none here, even those this
-- backend has cached for another role) and cannot load any without the
-- policies capability
SELECT array_length(rbr_feature_names('released', 'hard_refuse'), 1) AS hard_refuse_features;
CREATE ROLE rbr_reader;
SET ROLE rbr_reader;
SELECT array_length(rbr_feature_names('released', 'hard_refuse'), 1) AS hard_refuse_features;
SELECT count(*) AS visible_versions FROM rbr.policy_version;
SELECT rbr_policy_load('mine', '{}');
SELECT rbr_policy_load('mine', :'spec');
DELETE FROM rbr.policy_version;
RESET ROLE;
DROP ROLE rbr_reader;

-- deleting versions invalidates the cache too
DELETE FROM rbr.policy_version WHERE policy = 'extras';
SELECT rbr_feature_names('extras', 'hard_refuse');

-- limits of a spec (doc/reference.md, "Limits"): small specs built here
CREATE FUNCTION lim_spec(simple jsonb, derived jsonb, top text) RETURNS jsonb LANGUAGE sql AS $$
SELECT jsonb_build_object('prompt_template', 'Q {question} R {response}',
  'completion_class_order', jsonb_build_array('good', 'bad'),
  'completion_classes', jsonb_build_object('good', jsonb_build_object('comply', jsonb_build_object(top, true)),
                                           'bad', jsonb_build_object('comply', jsonb_build_object(top, false))),
  'simple_propositions', simple, 'derived_propositions', derived) $$;
-- at most 10000 propositions
SELECT rbr_policy_validate(lim_spec((SELECT jsonb_object_agg('s' || i, '{"prompt": "p"}'::jsonb) FROM generate_series(1, 10000) i), '{}', 's1'));
SELECT rbr_policy_validate(lim_spec((SELECT jsonb_object_agg('s' || i, '{"prompt": "p"}'::jsonb) FROM generate_series(1, 10001) i), '{}', 's1'));
SELECT rbr_policy_validate(lim_spec((SELECT jsonb_object_agg('s' || i, '{"prompt": "p"}'::jsonb) FROM generate_series(1, 5000) i),
                                    (SELECT jsonb_object_agg('d' || i, '{"s1": true}'::jsonb) FROM generate_series(1, 5001) i), 's1'));
-- derived propositions nest at most 64 deep
SELECT rbr_policy_validate(lim_spec('{"s": {"prompt": "p"}}',
  (SELECT jsonb_object_agg('d' || i, jsonb_build_object(CASE WHEN i = 1 THEN 's' ELSE 'd' || (i - 1) END, true)) FROM generate_series(1, 64) i), 'd64'));
SELECT rbr_policy_validate(lim_spec('{"s": {"prompt": "p"}}',
  (SELECT jsonb_object_agg('d' || i, jsonb_build_object(CASE WHEN i = 1 THEN 's' ELSE 'd' || (i - 1) END, true)) FROM generate_series(1, 65) i), 'd65'));
-- a cycle is still named as a cycle
SELECT rbr_policy_validate(lim_spec('{"s": {"prompt": "p"}}', '{"d1": {"d2": true}, "d2": {"d3": true}, "d3": {"d1": false}}', 'd1'));
-- a diamond (each level refers twice to the level below) validates and evaluates at once
SELECT rbr_policy_load('lim_diamond', lim_spec('{"s": {"prompt": "p"}, "t": {"prompt": "q"}}',
  (SELECT jsonb_object_agg(x || i, CASE WHEN i = 1 THEN jsonb_build_object(CASE WHEN x = 'a' THEN 's' ELSE 't' END, true)
                                        ELSE jsonb_build_object('a' || (i - 1), true, 'b' || (i - 1), true) END)
     FROM generate_series(1, 60) i, unnest(ARRAY['a', 'b']) x), 'a60'));
SELECT rbr_class_probs('lim_diamond', 'comply', '{"s": 1, "t": 1}');
SELECT rbr_class_probs('lim_diamond', 'comply', '{"s": 1, "t": 0}');
-- a60 is s AND t, reached 2^59 times each: exact mode gives P(s) P(t)
SELECT rbr_class_probs('lim_diamond', 'comply', '{"s": 0.5, "t": 0.5}', 'exact');
SELECT rbr_policy_info('lim_diamond')->'response_types'->'comply'->'propositions';
-- at most 1000 literals in a conjunction, 256 classes, 256 response types
SELECT rbr_policy_validate(lim_spec((SELECT jsonb_object_agg('s' || i, '{"prompt": "p"}'::jsonb) FROM generate_series(1, 1001) i),
                                    jsonb_build_object('d', (SELECT jsonb_object_agg('s' || i, true) FROM generate_series(1, 1001) i)), 'd'));
SELECT rbr_policy_validate(jsonb_set(lim_spec('{"s": {"prompt": "p"}}', '{}', 's'), '{completion_class_order}',
                                     (SELECT jsonb_agg('c' || i) FROM generate_series(1, 257) i)));
SELECT rbr_policy_validate(jsonb_set(lim_spec('{"s": {"prompt": "p"}}', '{}', 's'), '{completion_classes,good}',
                                     (SELECT jsonb_object_agg('rt' || i, '{"s": true}'::jsonb) FROM generate_series(1, 257) i)));
-- at most 5 MB of jsonb
SELECT rbr_policy_validate(lim_spec('{"s": {"prompt": "p"}}', '{}', 's')
                           || jsonb_build_object('description', repeat(md5('x'), 170000)));
-- names that are system columns of the features table are refused
SELECT rbr_policy_validate(lim_spec('{"xmin": {"prompt": "p"}}', '{}', 'xmin'));
SELECT rbr_policy_validate(lim_spec('{"s": {"prompt": "p"}}', '{"ctid": {"s": true}}', 'ctid'));
SELECT rbr_policy_validate(jsonb_set(lim_spec('{"s": {"prompt": "p"}}', '{}', 's'), '{completion_class_order,0}', '"tableoid"'));
SELECT rbr_policy_validate(lim_spec('{"XMIN": {"prompt": "p"}, "oid_": {"prompt": "p"}}', '{}', 'XMIN'));
-- a name with a character that is not allowed names the whole character
SELECT rbr_policy_validate(lim_spec('{"café": {"prompt": "p"}}', '{}', 'café'));
SELECT rbr_policy_validate(lim_spec('{"a€b": {"prompt": "p"}}', '{}', 'a€b'));
DROP FUNCTION lim_spec(jsonb, jsonb, text);

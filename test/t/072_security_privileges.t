# Security of a database that many roles share: every attack re-enacted by
# roles that got their capabilities through rbr_grant, each failing safely.
#   - run bookkeeping: no role reads or writes rbr.run directly, nor acts on
#     another role's run through rbr's functions (0.1.0: SQL injection into a
#     superuser's run through options->>'key_type', future run_ids);
#   - caches: no role plants (forges) or reads answers or generations;
#   - tables rbr writes into: another role's <source>_features with a trigger
#     is refused, so its trigger never runs as the caller; a domain-typed key
#     never runs the domain's CHECK function; views and row-security tables
#     of other roles are refused as sources;
#   - owners: policies and models are their owners'; no role reads, replaces
#     or deletes another's, nor adds a version under another's name.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;

new_db('rbr_tap_security');
my ($base) = start_server();
my $set = "SET rbr.grader_url = '$base/v1'; SET rbr.grader_api_key = 'sk-test'; SET rbr.grader_retry_base_ms = 10;";
my $spec = psql_ok("SELECT spec FROM rbr.policy_version WHERE policy = 'ref'");

psql_ok(<<'SQL');
DROP ROLE IF EXISTS alice; DROP ROLE IF EXISTS mallory;
CREATE ROLE alice; CREATE ROLE mallory;
SELECT rbr_grant('alice', 'grade'), rbr_grant('alice', 'policies'), rbr_grant('alice', 'models');
SELECT rbr_grant('mallory', 'grade'), rbr_grant('mallory', 'synthesize'),
       rbr_grant('mallory', 'policies'), rbr_grant('mallory', 'models');
CREATE SCHEMA shared;
GRANT USAGE, CREATE ON SCHEMA shared TO alice, mallory;
-- the attacker's log: a row here means its code ran
CREATE TABLE shared.pwned (who text, how text);
GRANT INSERT, SELECT ON shared.pwned TO PUBLIC;
SQL
sub pwned { return psql_ok("SELECT count(*) FROM shared.pwned") }
sub as_mallory {
    my ($sql) = @_;
    my ($out, $err, $rc) = psql("SET ROLE mallory; $sql", keep_going => 1);
    return ($out, $err, $rc);
}

# --- a superuser's run, to attack
psql_ok("$set CREATE TABLE shared.t (id int PRIMARY KEY, prompt text, completion text, response_type text);"
      . " INSERT INTO shared.t SELECT g, 'q' || g, 'a [[rbr *=0.5]]', 'comply' FROM generate_series(1, 4) g;"
      . " CALL rbr_featurize('shared.t', 'ref')");
my $run = psql_ok("SELECT max(run_id) FROM rbr.run");
ok($run > 0, 'a superuser run exists');

# 0.1.0: UPDATE rbr.featurize_run SET options = options || '{"key_type": "int + shared.f()*0"}'
my ($o, $e) = as_mallory("UPDATE rbr.run SET options = options || '{\"key_type\": \"int\"}' WHERE run_id = $run");
like($e, qr/permission denied for table run/, 'no role updates run rows (the injection path of 0.1.0)');
($o, $e) = as_mallory("INSERT INTO rbr.run (run_id, kind, owner, source, outputs, policy, options, pid, total)"
    . " VALUES ($run + 1000, 'featurize', 'mallory', 'shared.t', '{}', 'ref\@1', '{}', 0, 0)");
like($e, qr/permission denied for table run/, 'no role inserts run rows (future run_ids of 0.1.0)');
($o, $e) = as_mallory("SELECT count(*) FROM rbr.run");
like($e, qr/permission denied for table run/, 'no role reads the run table');
($o, $e) = as_mallory("SELECT rbr.run_advance($run, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL)");
like($e, qr/42501: permission denied for rbr run $run/, "another role's run cannot be advanced");
($o, $e) = as_mallory("SELECT rbr.run_finish($run)");
like($e, qr/42501: permission denied for rbr run $run/, "another role's run cannot be finished");
($o, $e) = as_mallory("SELECT * FROM rbr.featurize_chunk($run)");
like($e, qr/42501: permission denied for rbr run $run/, "another role's run cannot be worked on");
($o, $e) = as_mallory("SELECT rbr.run_advance($run, -5, 0, 0, 0, 0, 0, 0, 0, NULL, NULL)");
like($e, qr/permission denied|counters only grow/, 'counters cannot be lowered');
is((as_mallory("SELECT count(*) FROM rbr.featurize_progress"))[0], 0, "another role's runs are not in its progress view");

# --- caches: no forged answers, no reading of what others graded
($o, $e) = as_mallory("INSERT INTO rbr.grade_cache (key, model, proposition, probability, method)"
    . " VALUES (sha256('x'), 'm', 'p', 1, 'logprobs')");
like($e, qr/permission denied for table grade_cache/, 'no role plants a grader answer');
($o, $e) = as_mallory("INSERT INTO rbr.generation_cache (key, model, completion) VALUES (sha256('x'), 'm', 'c')");
like($e, qr/permission denied for table generation_cache/, 'no role plants a generation');
($o, $e) = as_mallory("SELECT count(*) FROM rbr.grade_cache");
like($e, qr/permission denied for table grade_cache/, 'no role reads the grader cache');
($o, $e) = as_mallory("SELECT count(*) FROM rbr.generation_cache");
like($e, qr/permission denied for table generation_cache/, 'no role reads the generation cache');
# and yet a granted role's grading fills and uses the cache (rbr writes it as the extension's owner)
my ($mo, $me, $mrc) = psql("$set SET ROLE mallory; SELECT rbr_policy_load('m_ref', \$p\$$spec\$p\$::jsonb);"
    . " CREATE TABLE shared.m (id int PRIMARY KEY, prompt text, completion text, response_type text);"
    . " INSERT INTO shared.m VALUES (1, 'hi', 'x [[rbr *=0.25]]', 'comply');"
    . " CALL rbr_featurize('shared.m', 'm_ref'); CALL rbr_featurize('shared.m', 'm_ref', '{\"propositions\": \"all\"}');"
    . " SELECT count(*) FILTER (WHERE cached), count(*) FROM shared.m_grades WHERE status = 'ok';", keep_going => 1);
is($mrc, 0, 'a granted role grades') or diag($me);
like((split /\n/, $mo)[-1] // '', qr/^\d+\|([1-9]\d*)$/, '  and its values are recorded');

# --- tables rbr writes into belong to the caller
psql_ok("CREATE TABLE shared.v (id int PRIMARY KEY, prompt text, completion text, response_type text);"
      . " INSERT INTO shared.v VALUES (1, 'hi', 'x [[rbr *=0.5]]', 'comply'); GRANT SELECT ON shared.v TO mallory;");
as_mallory(<<'SQL');
CREATE FUNCTION shared.evil() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO shared.pwned VALUES (current_user, 'trigger on a features table');
    RETURN NEW;
END $$;
CREATE TABLE shared.v_features (id int PRIMARY KEY);
CREATE TRIGGER evil BEFORE INSERT OR UPDATE ON shared.v_features FOR EACH ROW EXECUTE FUNCTION shared.evil();
SQL
($o, $e) = psql("$set CALL rbr_featurize('shared.v', 'ref')", keep_going => 1);
like($e, qr/42501: shared\.v_features exists and is not a table of role \w+/,
     "a superuser's rbr_featurize refuses another role's features table");
is(pwned(), 0, "  so the other role's trigger never ran");
as_mallory("DROP TABLE shared.v_features; CREATE TABLE shared.v_grades (id int, proposition text);"
    . " CREATE TRIGGER evil BEFORE INSERT ON shared.v_grades FOR EACH ROW EXECUTE FUNCTION shared.evil();");
($o, $e) = psql("$set CALL rbr_featurize('shared.v', 'ref')", keep_going => 1);
like($e, qr/42501: shared\.v_grades exists and is not a table of role/, '  and another role\'s grades table');
is(pwned(), 0, '  whose trigger never ran either');
is(psql_ok("SELECT to_regclass('shared.v_features') IS NULL"), 't', '  and nothing was created');

# a domain-typed key: its CHECK function is never called by rbr
as_mallory(<<'SQL');
CREATE FUNCTION shared.check_id(int) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO shared.pwned VALUES (current_user, 'domain check');
    RETURN true;
END $$;
CREATE DOMAIN shared.evil_id AS int CHECK (shared.check_id(VALUE));
CREATE TABLE shared.d (id shared.evil_id PRIMARY KEY, prompt text, completion text, response_type text);
INSERT INTO shared.d VALUES (1, 'hi', 'x [[rbr *=0.5]]', 'comply'), (2, 'ho', 'y [[rbr *=0.5]]', 'comply');
GRANT SELECT ON shared.d TO PUBLIC;
SQL
psql_ok("DELETE FROM shared.pwned");
($o, $e, my $rc) = psql("$set CALL rbr_featurize('shared.d', 'ref')", keep_going => 1);
is($rc, 0, "a superuser featurizes another role's table with a domain key") or diag($e);
is(pwned(), 0, "  without running the domain's CHECK function");
is(psql_ok("SELECT format_type(atttypid, NULL) FROM pg_attribute WHERE attrelid = 'shared.d_features'::regclass AND attname = 'id'"),
   'integer', '  the features table keys by the base type');

# another role's view, or table with row security, is refused as a source
as_mallory(<<'SQL');
CREATE FUNCTION shared.spy(text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO shared.pwned VALUES (current_user, 'view');
    RETURN $1;
END $$;
CREATE VIEW shared.vw AS SELECT id, shared.spy(prompt) AS prompt, completion, response_type FROM shared.d;
GRANT SELECT ON shared.vw TO PUBLIC;
CREATE TABLE shared.r (id int PRIMARY KEY, prompt text, completion text, response_type text);
ALTER TABLE shared.r ENABLE ROW LEVEL SECURITY;
CREATE POLICY spy ON shared.r USING (shared.spy(prompt) IS NOT NULL);
GRANT SELECT ON shared.r TO PUBLIC;
SQL
# --- owners of policies and models
my ($ao, $ae, $arc) = psql("SET ROLE alice; SELECT rbr_policy_load('alice_p', \$p\$$spec\$p\$::jsonb);"
    . " SELECT (rbr_model_save('alice_m', 'alice_p', 'comply',"
    . "   jsonb_build_object('weights', (SELECT jsonb_agg(0.5) FROM unnest(rbr_feature_names('alice_p', 'comply')))))).name;",
    keep_going => 1);
is($arc, 0, 'alice loads a policy and saves a model') or diag($ae);
psql_ok("DELETE FROM shared.pwned");
($o, $e) = psql("$set SET ROLE alice; CALL rbr_featurize('shared.r', 'alice_p')", keep_going => 1);
like($e, qr/42501: shared\.r is a table with row-level security of another role/, "another role's row-security table is refused");
is(pwned(), 0, '  its policy function never ran');

($o, $e) = psql("$set CALL rbr_featurize('shared.vw', 'ref')", keep_going => 1);
like($e, qr/42501: shared\.vw is a view or non-table of another role/, "a superuser's rbr_featurize refuses another role's view");
is(pwned(), 0, '  its function never ran');

is((as_mallory("SELECT count(*) FROM rbr.policy_version WHERE policy = 'alice_p'"))[0], 0, "mallory does not see alice's policy");
is((as_mallory("SELECT count(*) FROM rbr.policies WHERE name = 'alice_p'"))[0], 0, '  nor in rbr.policies');
($o, $e) = as_mallory("SELECT rbr_policy_info('alice_p')");
like($e, qr/policy "alice_p" does not exist/, '  nor through rbr_policy_info');
($o, $e) = as_mallory("SELECT rbr_policy_load('alice_p', '{\"x\": 1}'::jsonb || \$p\$$spec\$p\$::jsonb, replace => true)");
like($e, qr/42501|belongs to another role|invalid/, "mallory cannot add a version under alice's name");
($o, $e) = as_mallory("INSERT INTO rbr.policy_version (policy, version, spec, owner) VALUES ('alice_p', 2, '{}', 'mallory')");
like($e, qr/policy 'alice_p' belongs to another role/, '  not even by a direct INSERT');
($o, $e) = as_mallory("INSERT INTO rbr.policy_version (policy, version, spec, owner) VALUES ('alice_p', 2, '{}', 'alice')");
like($e, qr/row-level security/, '  nor by an INSERT in alice\'s name');
is(psql_ok("SELECT max(version) FROM rbr.policy_version WHERE policy = 'alice_p'"), 1, "  alice's policy has one version");
is((as_mallory("SELECT count(*) FROM rbr.model WHERE name = 'alice_m'"))[0], 0, "mallory does not see alice's model");
($o, $e) = as_mallory("SELECT rbr_reward('alice_m', 'comply', array_fill(0.5::float8, ARRAY[10]), 0)");
like($e, qr/model "alice_m"|does not exist|no model/, '  nor scores with it');
is((as_mallory("UPDATE rbr.model SET weights = array_fill(9::float8, ARRAY[cardinality(weights)]) WHERE name = 'alice_m'"))[1],
   '', '  an UPDATE of it finds no row');
as_mallory("DELETE FROM rbr.model WHERE name = 'alice_m'");
is(psql_ok("SELECT weights[1] FROM rbr.model WHERE name = 'alice_m'"), 0.5, "  alice's model is unchanged and not deleted");
as_mallory("SELECT rbr_policy_load('m_p', \$p\$$spec\$p\$::jsonb)");
($o, $e) = as_mallory("SELECT rbr_model_save('alice_m', 'm_p', 'hard_refuse',"
    . " jsonb_build_object('weights', (SELECT jsonb_agg(1) FROM unnest(rbr_feature_names('m_p', 'hard_refuse')))))");
like($e, qr/model 'alice_m' belongs to another role/, "mallory cannot save a response type under alice's model name");
# what one role's session cached is not served to another role in the same backend
($o, $e) = psql("SET ROLE alice; SELECT (rbr_policy_info('alice_p')->>'version') || ' ' ||"
    . " rbr_reward('alice_m', 'comply', array_fill(1::float8, ARRAY[cardinality(rbr_feature_names('alice_p', 'comply'))]), 0);"
    . " RESET ROLE; SET ROLE mallory; SELECT rbr_policy_info('alice_p');", keep_going => 1);
like($e, qr/policy "alice_p" does not exist/, "a backend's policy cache does not outlive SET ROLE");
($o, $e) = psql("SET ROLE alice; SELECT rbr_reward('alice_m', 'comply', array_fill(1::float8, ARRAY[cardinality(rbr_feature_names('alice_p', 'comply'))]), 0);"
    . " RESET ROLE; SET ROLE mallory; SELECT rbr_reward('alice_m', 'comply', array_fill(1::float8, ARRAY[10]), 0);", keep_going => 1);
like($e, qr/model "alice_m"|does not exist|no model/, "  nor its model cache");
# a member of the owning role shares it
psql_ok("GRANT alice TO mallory");
is((as_mallory("SELECT count(*) FROM rbr.policy_version WHERE policy = 'alice_p'"))[0], 1, 'a member of the owner sees the policy');
psql_ok("REVOKE alice FROM mallory");

is(pwned(), 0, 'no code of the attacker ever ran');
is(psql_ok("SELECT rolsuper FROM pg_roles WHERE rolname = 'mallory'"), 'f', 'mallory is not a superuser');

psql_ok("DROP SCHEMA shared CASCADE");
drop_db();
psql_ok("DROP OWNED BY alice; DROP OWNED BY mallory; DROP ROLE alice; DROP ROLE mallory", db => 'postgres');
done_testing();

# rbr_score(): the total reward of new completions in one call, for
# INSERT ... SELECT and triggers: grades only the propositions the response
# type needs (through the cache), and equals rbr_reward over rbr_features of
# the same probabilities.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;

new_db('rbr_tap_score');
my ($base) = start_server();
my $set = "SET rbr.grader_url = '$base/v1'; SET rbr.grader_retry_base_ms = 10; SET client_min_messages = warning;";
psql_ok(q{SELECT rbr_model_save('m', 'ref', 'comply',
    jsonb_build_object('weights', (SELECT jsonb_agg(n * 0.1 ORDER BY n)
                                     FROM generate_series(1, cardinality(rbr_feature_names('ref', 'comply'))) n)))});
my $needed = psql_ok("SELECT jsonb_array_length(rbr_policy_info('ref')->'response_types'->'comply'->'graded_propositions')");

# the reference value: the same probabilities through rbr_features and rbr_reward
my $expect = psql_ok(q{SELECT rbr_reward('m', 'comply',
    rbr_features('ref', 'comply', (SELECT jsonb_object_agg(x, 0.3)
        FROM jsonb_array_elements_text(rbr_policy_info('ref')->'response_types'->'comply'->'graded_propositions') x)), 2.0)});
server_reset($base);
my $got = psql_ok("$set SELECT rbr_score('m', 'Comply', '\"hello\"', 'sure [[rbr *=0.3]]', 2.0)");
ok(abs($got - $expect) < 1e-9, "rbr_score equals rbr_reward of the graded features ($got vs $expect)");
is(server_stats($base)->{chat_requests}, $needed, "it asked exactly the $needed propositions the response type needs");
psql_ok("$set SELECT rbr_score('m', 'comply', '\"hello\"', 'sure [[rbr *=0.3]]', 2.0)");
is(server_stats($base)->{chat_requests}, $needed, 'a second call is answered from the cache');

# scoring inside ETL: a trigger scores the rows as they arrive
psql_ok(<<"SQL");
$set
CREATE TABLE incoming (id int PRIMARY KEY, prompt jsonb, completion text, response_type text, rm float8, reward float8);
CREATE FUNCTION score_row() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
    NEW.reward := rbr_score('m', NEW.response_type, NEW.prompt, NEW.completion, NEW.rm);
    RETURN NEW;
END \$\$;
CREATE TRIGGER score BEFORE INSERT ON incoming FOR EACH ROW EXECUTE FUNCTION score_row();
INSERT INTO incoming (id, prompt, completion, response_type, rm)
    SELECT g, '"q"', 'answer ' || g || ' [[rbr *=0.3]]', 'comply', g FROM generate_series(1, 3) g;
SQL
is(psql_ok("SELECT string_agg(round((reward - rm)::numeric, 9)::text, ',' ORDER BY id) FROM incoming"),
   join(',', (sprintf('%.9f', $expect - 2.0)) x 3), 'a trigger scores every inserted row');

# failures are errors, never a reward; NULL in, NULL out; unknown model
my ($o, $e) = psql("$set SET rbr.grader_max_retries = 0;"
    . " SELECT rbr_score('m', 'comply', '\"q\"', 'x [[fault 500]]', 0)", keep_going => 1);
like($e, qr/rbr_score: grading \w+ failed: /, 'a grader failure is an error naming the proposition');
is(psql_ok("SELECT rbr_score('m', 'comply', '\"q\"', NULL, 0) IS NULL"), 't', 'a NULL completion gives NULL');
($o, $e) = psql("SELECT rbr_score('nope', 'comply', '\"q\"', 'x', 0)", keep_going => 1);
like($e, qr/no model 'nope' for response type 'comply'/, 'unknown model: a clear error');
($o, $e) = psql("CREATE ROLE rbr_score_nobody; SET ROLE rbr_score_nobody; SELECT rbr_score('m', 'comply', '\"q\"', 'x', 0)",
                keep_going => 1);
like($e, qr/permission denied for function rbr_score/, 'it spends money: the grade capability is needed');
psql_ok("DROP ROLE rbr_score_nobody");

# rbr_check_grader(): one real question to the configured grader, in plain words
is(psql_ok("$set SELECT string_agg(item || '=' || ok, ',' ORDER BY item) FROM rbr_check_grader('ref')"),
   'grader answers=true,log-probabilities=true', 'rbr_check_grader: the test grader answers with log-probabilities');
like(psql_ok("$set SELECT detail FROM rbr_check_grader() WHERE item = 'grader answers'"),
     qr/answered '\w+' of policy 'ref': P\(yes\) = [0-9.]+ after 1 request/, '  naming what it asked and what came back');
my ($co) = psql("SET rbr.grader_url = 'http://127.0.0.1:9/v1'; SET rbr.grader_max_retries = 0;"
    . " SELECT ok || ' ' || detail FROM rbr_check_grader('ref')", keep_going => 1);
like($co, qr/^false .*(onnect|refused)/i, 'rbr_check_grader: an unreachable grader is reported, not raised');
drop_db();
done_testing();

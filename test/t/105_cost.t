# Cost before and after: a dry run of rbr_featurize ({"dry_run": true} and
# rbr_featurize_estimate) sends nothing and writes nothing, and its figures
# are what the real run then sends; budgets (max_requests, max_tokens) stop
# a run at the budget and a second call finishes it; with a provider prefix
# cache (simulated by the test grader) cached prompt tokens are recorded per
# grade and per run; requests for one proposition share a prefix holding the
# template and the question.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;

# the estimator's stated error against the test grader's counts (characters / 4)
my $TOKEN_TOLERANCE = 0.05;

new_db('rbr_tap_cost');
my ($base) = start_server('--labels', REFERENCE . '/gold_train.jsonl');
my $gold = REFERENCE . '/gold_train.jsonl';
psql_ok(<<"SQL");
CREATE TABLE raw (line jsonb);
\\copy raw FROM '$gold' WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')
CREATE TABLE gold (id int PRIMARY KEY, response_type text, prompt jsonb, completion jsonb);
INSERT INTO gold SELECT row_number() OVER (), line->>'response_type', line->'prompt', line->'completion' FROM raw;
-- the same rows with other completions (nothing of them is cached)
CREATE TABLE g2 AS SELECT id, response_type, prompt, (completion->0->>'content') || ' (second set)' AS completion FROM gold;
ALTER TABLE g2 ADD PRIMARY KEY (id);
CREATE TABLE g3 AS SELECT id, response_type, prompt, completion || ' (third set)' AS completion FROM g2;
ALTER TABLE g3 ADD PRIMARY KEY (id);
CREATE TABLE g4 AS SELECT id, response_type, prompt, completion || ' (fourth set)' AS completion FROM g2;
ALTER TABLE g4 ADD PRIMARY KEY (id);
SQL
my $NEEDED = psql_ok(<<'SQL');
SELECT sum(jsonb_array_length(rbr_policy_info('ref')->'response_types'->rt->'graded_propositions'))
  FROM (SELECT lower(replace(response_type, ' ', '_')) AS rt FROM gold) g
SQL
my $set = "SET rbr.grader_url = '$base/v1'; SET client_min_messages = warning;";
my $state_sql = "SELECT (SELECT count(*) FROM rbr.run), (SELECT count(*) FROM rbr.grade_cache),"
    . " to_regclass('gold_features') IS NULL, to_regclass('gold_grades') IS NULL";

sub estimate {
    my ($t, $opts) = @_;
    $opts //= '{}';
    return split /\|/, psql_ok("$set SELECT missing, cached, not_gradable, requests, prompt_tokens, completion_tokens"
                               . " FROM rbr_featurize_estimate('$t', 'ref', '$opts')");
}
sub run_row {
    my ($t) = @_;
    return split /\|/, psql_ok("SELECT state, done, errors, total, requests, cached, prompt_tokens, completion_tokens,"
        . " cached_tokens, COALESCE(stop_reason, '') FROM rbr.featurize_progress WHERE source = '$t'::regclass"
        . " ORDER BY run_id DESC LIMIT 1");
}
sub near {
    my ($got, $want) = @_;
    return abs($got - $want) <= $TOKEN_TOLERANCE * $want;
}

# --- a dry run sends nothing and changes nothing
server_reset($base);
my $before = psql_ok($state_sql);
my ($out, $err, $rc) = psql("SET rbr.grader_url = '$base/v1'; CALL rbr_featurize('gold', 'ref', '{\"dry_run\": true}')");
is($rc, 0, 'CALL rbr_featurize with dry_run succeeds') or diag($err);
like($err, qr/dry run, nothing sent\): $NEEDED values missing, \d+ answered by the cache, 0 not gradable; would send \d+ requests, about \d+ prompt tokens/,
     'the dry run reports missing values, cache answers and requests in a NOTICE');
my ($missing, $cached, $ng, $ereq, $ept, $ect) = estimate('gold');
is($missing, $NEEDED, 'estimate: every needed value is missing');
is($ng, 0, 'estimate: nothing ungradable');
ok($cached > 0 && $cached < 40, "estimate: identical questions are asked once ($cached answered by another)");
is($ereq, $missing - $cached, 'estimate: one request per question to send');
is(server_stats($base)->{chat_requests}, 0, 'the dry run and the estimate sent no request');
is(psql_ok($state_sql), $before, 'no run recorded, the cache unchanged, no features or grades table created');
like($err, qr/would send $ereq requests, about $ept prompt tokens and at most $ect completion tokens/,
     'the NOTICE carries the figures of rbr_featurize_estimate');
is($ect, $ereq * psql_ok('SHOW rbr.grader_max_answer_tokens'), 'completion tokens: max answer tokens per request');

# --- the real run sends what the dry run said
psql_ok("$set CALL rbr_featurize('gold', 'ref')");
my $st = server_stats($base);
my ($state, $done, $errors, $total, $req, $rcached, $pt, $ct) = run_row('gold');
is($state, 'done', 'the real run is done');
is($total, $missing, 'the run\'s total = the estimate\'s missing values');
is($req, $ereq, 'the run sent exactly the requests the estimate foresaw');
is($st->{chat_requests}, $ereq, 'the server received exactly the requests the estimate foresaw');
is($rcached, $cached, 'the run\'s cached answers = the estimate\'s');
ok(near($pt, $ept), sprintf('prompt tokens: estimate %d vs server %d (%.1f%%, within %d%%)', $ept, $pt,
                            100 * ($ept - $pt) / $pt, 100 * $TOKEN_TOLERANCE));
ok($ct <= $ect && $ct > 0, "completion tokens $ct within the estimate's upper bound $ect");
my @again = estimate('gold');
is("@again", '0 0 0 0 0 0', 'after the run the estimate finds nothing missing');

# a fresh table of the same rows: everything from rbr's cache
psql_ok('CREATE TABLE gold_copy AS SELECT * FROM gold; ALTER TABLE gold_copy ADD PRIMARY KEY (id)');
my @copy = estimate('gold_copy');
is("@copy[0..3]", "$NEEDED $NEEDED 0 0", 'the same questions again: all answered by the cache, 0 requests');

# --- option checks
($out, $err, $rc) = psql("$set CALL rbr_featurize('g2', 'ref', '{\"max_requests\": -1}')");
like($err, qr/max_requests must be a whole number >= 0/, 'a negative budget is refused');
($out, $err, $rc) = psql("$set CALL rbr_featurize('g2', 'ref', '{\"dry_run\": \"yes\"}')");
like($err, qr/dry_run must be true or false/, 'dry_run must be a boolean');
($out, $err, $rc) = psql("$set SELECT * FROM rbr_featurize_estimate('g2', 'ref', '{\"propositons\": \"all\"}')");
like($err, qr/unknown rbr_featurize option\(s\): propositons/, 'the estimate refuses unknown options');

# --- {"propositions": "all"} and sampled grading
my @all = estimate('g4', '{"propositions": "all"}');
is($all[0], 351 * 23, 'propositions all: every simple proposition of every row is missing');
psql_ok('CREATE TABLE g6 AS SELECT id, response_type, prompt, completion || \' (sampled)\' AS completion FROM g2 WHERE id <= 20;'
        . ' ALTER TABLE g6 ADD PRIMARY KEY (id)');
my $sampled = "SET rbr.grader_method = 'sampled'; SET rbr.grader_samples = 5; SET rbr.grader_temperature = '1';";
my @e6 = split /\|/, psql_ok("$set $sampled SELECT missing, requests, completion_tokens FROM rbr_featurize_estimate('g6', 'ref')");
is($e6[2], 5 * $e6[1], 'sampled grading: completion tokens are max answer tokens x 5 samples per request');
server_reset($base);
psql_ok("$set $sampled CALL rbr_featurize('g6', 'ref')");
my @r6 = run_row('g6');
is("$r6[0] $r6[4]", "done $e6[1]", 'sampled grading sends the requests foreseen');
is(server_stats($base)->{chat_requests}, $e6[1], 'the server agrees');

# --- max_requests: stops at the budget, a second call finishes
my @e2 = estimate('g2');
server_reset($base);
($out, $err, $rc) = psql("SET rbr.grader_url = '$base/v1'; CALL rbr_featurize('g2', 'ref', '{\"max_requests\": 100, \"chunk_rows\": 16}')");
is($rc, 0, 'a run with max_requests ends without error') or diag($err);
like($err, qr/WARNING:.*stopped at the budget: max_requests 100 reached/, 'a WARNING says the run stopped at the budget');
like($err, qr/HINT:.*again with a larger max_requests/, 'its hint says how to continue');
my @r2 = run_row('g2');
is($r2[0], 'stopped', 'the run shows state stopped');
like($r2[9], qr/^max_requests 100 reached before \d+ more question/, 'rbr.featurize_progress shows why');
is($r2[4], 100, 'the run sent exactly its budget of requests');
is(server_stats($base)->{chat_requests}, 100, 'the server received 100 requests');
my @left = estimate('g2');
is($left[3], $e2[3] - 100, 'the estimate now foresees the rest');
psql_ok("$set CALL rbr_featurize('g2', 'ref')");
@r2 = run_row('g2');
is($r2[0], 'done', 'a second call without a budget finishes');
is($r2[4], $e2[3] - 100, 'the second call sends only what was missing');
is(server_stats($base)->{chat_requests}, $e2[3], 'over both calls, exactly the requests first foreseen');
is(psql_ok("SELECT count(*) FROM g2_grades WHERE status = 'ok'"), $NEEDED, 'every needed value graded once');
# a budget of 0 still takes what the cache answers
psql_ok('CREATE TABLE g2_copy AS SELECT * FROM g2; ALTER TABLE g2_copy ADD PRIMARY KEY (id)');
server_reset($base);
psql_ok("$set CALL rbr_featurize('g2_copy', 'ref', '{\"max_requests\": 0}')");
@r2 = run_row('g2_copy');
is("$r2[0] $r2[1] $r2[4]", "done $NEEDED 0", 'max_requests 0 with everything cached: done, no request');
is(server_stats($base)->{chat_requests}, 0, 'the server saw nothing');

# --- max_tokens
my @e3 = estimate('g3');
my $budget = int($e3[4] / 3);
server_reset($base);
($out, $err, $rc) = psql("SET rbr.grader_url = '$base/v1'; CALL rbr_featurize('g3', 'ref', '{\"max_tokens\": $budget}')");
like($err, qr/stopped at the budget: max_tokens $budget reached/, 'max_tokens stops the run');
my @r3 = run_row('g3');
is($r3[0], 'stopped', 'state stopped');
ok($r3[6] + $r3[7] <= $budget, "tokens spent (" . ($r3[6] + $r3[7]) . ") within max_tokens $budget");
ok($r3[6] + $r3[7] > $budget * 0.9, 'and close to it (the run went on until the next question did not fit)');
psql_ok("$set CALL rbr_featurize('g3', 'ref', '{\"max_tokens\": " . (4 * $e3[4]) . "}')");
@r3 = run_row('g3');
is($r3[0], 'done', 'a second call with a larger budget finishes');
is(server_stats($base)->{chat_requests}, $e3[3], 'over both calls, exactly the requests first foreseen');

# --- one proposition's requests share the template and the question as a prefix
my $lcp = psql_ok(<<'SQL');
WITH b AS (
    SELECT p, rbr_grader_request('ref', p, g.prompt, g.completion->0->>'content')->'messages'->0->>'content' AS sys,
           g.completion->0->>'content' AS compl
      FROM gold g, jsonb_array_elements_text(rbr_policy_info('ref')->'simple_propositions') p
     WHERE g.id IN (1, 2)),
pairs AS (
    SELECT a.p, a.sys AS s1, b.sys AS s2, a.compl
      FROM b a JOIN b b ON a.p = b.p AND a.sys < b.sys),
l AS (
    SELECT p, s1, compl, (SELECT coalesce(min(i) - 1, length(s1)) FROM generate_series(1, length(s1)) i
                           WHERE substr(s1, i, 1) IS DISTINCT FROM substr(s2, i, 1)) AS n
      FROM pairs)
SELECT count(*), count(*) FILTER (WHERE position(q.prompt IN left(l.s1, l.n)) > 0
                                    AND position('# Context' IN left(l.s1, l.n)) = 1
                                    AND l.n >= position(q.prompt IN l.s1) + length(q.prompt))
  FROM l JOIN LATERAL (SELECT v.spec->'simple_propositions'->l.p->>'prompt' AS prompt
                         FROM rbr.policy_version v WHERE v.policy = 'ref') q ON true
SQL
my ($npairs, $nshared) = split /\|/, $lcp;
ok($npairs > 10, "pairs of requests for one proposition compared: $npairs");
is($nshared, $npairs, 'each pair shares a prefix holding the template\'s head and the whole question');

# --- provider prefix cache: cached tokens recorded per grade and per run
server_config($base, '{"prefix_cache": true, "prefix_cache_min_tokens": 64, "prefix_cache_step_tokens": 16}');
server_reset($base);
psql_ok("$set CALL rbr_featurize('g4', 'ref')");
my @r4 = run_row('g4');
$st = server_stats($base);
is($r4[0], 'done', 'run with the provider prefix cache done');
ok($r4[8] > 0, "cached prompt tokens recorded for the run: $r4[8] of $r4[6]");
is($r4[8], $st->{prefix_cache}{cached_tokens}, 'the run\'s cached tokens = what the server reported');
is(psql_ok('SELECT sum(cached_tokens) FROM g4_grades'), $r4[8], 'per grade cached tokens add up to the run\'s');
ok(psql_ok("SELECT count(*) FROM g4_grades WHERE cached_tokens > 0") > $NEEDED / 2,
   'most grades reused the prefix of an earlier request for their proposition');
is(psql_ok("SELECT cached_tokens FROM rbr.run_progress WHERE source = 'g4'::regclass"), $r4[8],
   'rbr.run_progress shows the cached tokens');
server_config($base, '{"prefix_cache": false}');

# --- rbr_synthesize: dry run and budget
my ($gen) = start_server();
my $sset = "SET rbr.grader_url = '$base/v1'; SET rbr.generator_url = '$gen/v1'; SET client_min_messages = warning;";
mk_prompts('sp', 8);
server_reset($_) for $gen, $base;
($out, $err, $rc) = psql("SET rbr.grader_url = '$base/v1'; SET rbr.generator_url = '$gen/v1';"
                         . " CALL rbr_synthesize('sp', 'ref', '{\"dry_run\": true}')");
is($rc, 0, 'CALL rbr_synthesize with dry_run succeeds') or diag($err);
like($err, qr/rbr_synthesize (?:public\.)?sp \(dry run, nothing sent\): 40 slots to do, 0 first candidates in the generation cache; the first round would send 40 generation requests/,
     'the synthesize dry run reports slots and generation requests') or diag($err);
my ($sslots, $sgcached, $sgreq, $sgpt, $sgct, $sgrreq, $sgrtok) =
    split /\|/, psql_ok("$sset SELECT slots, generations_cached, generation_requests, generation_prompt_tokens,"
                        . " generation_completion_tokens, grading_requests, grading_tokens FROM rbr_synthesize_estimate('sp', 'ref')");
my $sneeded = psql_ok("SELECT 5 * sum(jsonb_array_length(rbr_policy_info('ref')->'response_types'->"
                      . "lower(replace(response_type, ' ', '_'))->'graded_propositions')) FROM sp");
is("$sslots $sgreq $sgrreq", "40 40 $sneeded", 'estimate: 40 slots, 40 generations, the graded propositions of each');
is(server_stats($gen)->{chat_requests} + server_stats($base)->{chat_requests}, 0, 'the synthesize dry run sent nothing');
is(psql_ok("SELECT to_regclass('sp_synth') IS NULL"), 't', 'and created no table');
psql_ok("$sset CALL rbr_synthesize('sp', 'ref')");
my ($sacc, $sgr, $sgrr, $spt, $sct, $sstate) = synth_run_row('sp', 'accepted, generator_requests, grader_requests, prompt_tokens, completion_tokens, state');
is("$sstate $sacc", 'done 40', 'the real synthesize run accepted every slot');
is($sgr, $sgreq, 'it sent the generation requests the estimate foresaw');
is($sgrr, $sgrreq, 'and the grading requests of a first round');
ok($spt + $sct <= $sgpt + $sgct + $sgrtok, "its tokens ($spt + $sct) within the estimate's upper bound");
my @sagain = split /\|/, psql_ok("$sset SELECT slots, generation_requests FROM rbr_synthesize_estimate('sp', 'ref')");
is("@sagain", '0 0', 'after the run nothing is left to do');

mk_prompts('sb', 8, 'budget');
server_reset($_) for $gen, $base;
($out, $err, $rc) = psql("SET rbr.grader_url = '$base/v1'; SET rbr.generator_url = '$gen/v1';"
                         . " CALL rbr_synthesize('sb', 'ref', '{\"max_requests\": 60}')");
like($err, qr/rbr_synthesize (?:public\.)?sb: stopped at the budget: max_requests 60 reached before \d+ more candidate/,
     'max_requests stops rbr_synthesize') or diag($err);
my ($bstate, $breq, $bacc, $breason) = synth_run_row('sb', 'state, generator_requests + grader_requests, accepted, stop_reason');
is($bstate, 'stopped', 'the synthesize run shows state stopped');
ok($breq <= 60 && $breq > 0, "it sent $breq requests, within the budget of 60");
is(server_stats($gen)->{chat_requests} + server_stats($base)->{chat_requests}, $breq, 'the servers saw those requests');
like($breason, qr/^max_requests 60 reached/, 'rbr.synth_progress shows why');
is(psql_ok("SELECT count(*) FROM sb_synth WHERE status = 'pending'"), 40 - $bacc, 'the slots not reached stay pending');
psql_ok("$sset CALL rbr_synthesize('sb', 'ref')");
($bstate, $bacc) = synth_run_row('sb', 'state, accepted');
is("$bstate " . psql_ok("SELECT count(*) FROM sb_synth WHERE status = 'accepted'"), 'done 40', 'a second call finishes: 40 accepted');

# --- privileges: the estimate and the budget need the grade capability; runs are their owner's
psql_ok(<<'SQL');
DROP ROLE IF EXISTS cost_plain;
DROP ROLE IF EXISTS cost_grader;
CREATE ROLE cost_plain LOGIN;
CREATE ROLE cost_grader LOGIN;
SELECT rbr_grant('cost_grader', 'grade');
CREATE TABLE g5 AS SELECT * FROM g2;
ALTER TABLE g5 ADD PRIMARY KEY (id);
GRANT SELECT ON g5 TO cost_plain, cost_grader;
GRANT CREATE ON SCHEMA public TO cost_grader;
SQL
($out, $err, $rc) = psql("SET ROLE cost_plain; SELECT * FROM rbr_featurize_estimate('g5', 'ref')");
like($err, qr/permission denied for function rbr_featurize_estimate/, 'a role without grade cannot estimate (it reveals the cache)');
($out, $err, $rc) = psql("SET ROLE cost_plain; SELECT * FROM rbr.grade_plan('ref', '{x}', '{}', '{}')");
like($err, qr/permission denied/, 'nor call rbr.grade_plan');
is(psql_ok("SELECT rbr_grant('cost_grader', 'policies'); SELECT spec AS s FROM rbr.policy_version WHERE policy = 'ref' \\gset\n"
           . "SET ROLE cost_grader; SELECT rbr_policy_load('mine', :'s'::jsonb) \\g /dev/null\n"
           . "SELECT missing FROM rbr_featurize_estimate('g5', 'mine')"), "\n$NEEDED",
   'a role with grade estimates another role\'s table it may read');
my $other_run = psql_ok("SELECT max(run_id) FROM rbr.run");
($out, $err, $rc) = psql("SET ROLE cost_grader; SELECT rbr.run_stop($other_run, 'stopped by someone else')");
like($err, qr/permission denied for rbr run/, 'a role cannot stop another role\'s run');
is(psql_ok("SELECT state FROM rbr.run WHERE run_id = $other_run"), 'done', 'the run is untouched');

drop_db();
psql_ok("DROP ROLE cost_plain; DROP ROLE cost_grader", db => 'postgres');
done_testing();

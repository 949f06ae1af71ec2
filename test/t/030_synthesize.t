# CALL rbr_synthesize against the test server's generation mode: counts,
# labels and tiers, rejections and the resample limit, the caches, resume
# after cancel, two sessions at once, generator errors, key secrecy, and a
# fit on the result.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use Time::HiRes qw(time sleep);

new_db('rbr_tap_synth');
# one server generates, another grades: each has its own key
my ($gen) = start_server('--api-key', 'sk-gen-KEY-0123456789');
my ($grd) = start_server('--api-key', 'sk-grade-KEY-0123456789');
my $set = "SET rbr.grader_url = '$grd/v1'; SET rbr.grader_api_key = 'sk-grade-KEY-0123456789';"
        . " SET rbr.generator_url = '$gen/v1'; SET rbr.generator_api_key = 'sk-gen-KEY-0123456789';"
        . " SET rbr.grader_retry_base_ms = 50; SET rbr.grader_max_retries = 2; SET rbr.grader_timeout_ms = 5000;"
        . " SET client_min_messages = warning;";

sub gen_count { server_stats($gen)->{generation_requests} }

# --- a full run: 1 ideal, 3 flawed, 1 disallowed per prompt, all accepted
server_reset($_) for $gen, $grd;
mk_prompts('p1', 8);
psql_ok("$set SET rbr.generator_model = 'gen-basic'; CALL rbr_synthesize('p1', 'ref')");
is(psql_ok("SELECT count(DISTINCT id) FROM p1_synth"), 8, 'every prompt has slots');
is(psql_ok("SELECT string_agg(DISTINCT c, ',') FROM (SELECT count(*) FILTER (WHERE kind = 'ideal') || '/'"
    . " || count(*) FILTER (WHERE kind = 'flawed') || '/' || count(*) FILTER (WHERE kind = 'disallowed') AS c"
    . " FROM p1_synth GROUP BY id) s"), '1/3/1', 'per prompt: 1 ideal, 3 flawed, 1 disallowed');
is(psql_ok("SELECT count(*) FROM p1_synth WHERE status = 'accepted' AND graded_class = intended_class"), 40,
   'all 40 accepted, graded class = intended class');
is(psql_ok("SELECT count(*) FROM p1_synth WHERE label = intended_class AND tier = rbr_label_tier('ref', response_type, label)"),
   40, 'label and tier from the policy');
is(psql_ok("SELECT count(*) FROM p1_synth WHERE kind = 'ideal' AND tier = 0"), 8, 'ideal completions have tier 0');
is(psql_ok("SELECT count(*) FROM p1_synth WHERE kind = 'disallowed' AND intended_class = 'disallowed_completion'"), 8,
   'disallowed completions intend the worst class');
is(psql_ok("SELECT count(*) FROM p1_synth WHERE cardinality(features) = cardinality(rbr_feature_names('ref', response_type))"
    . " AND array_position(features, NULL) IS NULL"), 40, 'feature vectors complete');
is(psql_ok("SELECT count(*) FROM p1_synth WHERE response_type IN ('hard_refuse', 'comply', 'safe_refuse_1', 'safe_refuse_2')"),
   40, 'response types folded');
my ($acc, $cand, $rej, $greq, $grreq, $state) = synth_run_row('p1', 'accepted, candidates, rejections, generator_requests, grader_requests, state');
is("$acc|$cand|$rej|$state", '40|40|0|done', 'progress: 40 accepted of 40 candidates, done');
is(gen_count(), 40, 'generator server saw 40 generation requests');
is(server_stats($gen)->{chat_requests}, 40, 'and nothing else (no grading on the generator)');
is($greq, 40, 'run counted 40 generator requests');
is(server_stats($grd)->{generation_requests}, 0, 'grader server saw no generation');
is(server_stats($grd)->{chat_requests}, $grreq, "grader server saw the $grreq grading requests the run counted");
is(psql_ok("SELECT count(*) FROM p1_synth_attempts WHERE outcome = 'accepted'"), 40, 'one accepted attempt per slot');

# --- the test server misses traits: rejections recorded with reasons, resampled
server_config($gen, '{"gen_miss_rate": 0.5}');
server_reset($_) for $gen, $grd;
mk_prompts('p2', 8);
psql_ok("$set SET rbr.generator_model = 'gen-miss'; CALL rbr_synthesize('p2', 'ref', '{\"max_attempts\": 2}')");
my ($acc2, $gave2, $cand2, $rej2) = synth_run_row('p2', 'accepted, gave_up, candidates, rejections');
ok($rej2 > 0, "rejections happened ($rej2)");
is($acc2 + $gave2, 40, "every slot ended: $acc2 accepted, $gave2 gave up");
is(psql_ok("SELECT count(*) FROM p2_synth_attempts WHERE outcome = 'rejected'"), $rej2, 'every rejection recorded');
is(psql_ok("SELECT count(*) FROM p2_synth_attempts WHERE outcome = 'rejected'"
    . " AND reason ~ '^intended [a-z_]+, graded [a-z_]+; traits missed: [a-z_]+\$'"
    . " AND graded_class <> intended_class AND (SELECT count(*) FROM jsonb_object_keys(failed)) = 1"), $rej2,
   'each rejection names intended and graded class and the one trait missed');
is(psql_ok("SELECT max(candidates) FROM p2_synth"), 2, 'no slot exceeded max_attempts = 2');
is(psql_ok("SELECT count(*) FROM p2_synth WHERE status = 'rejected' AND candidates = 2"), $gave2, 'slots given up after 2 candidates');
is(psql_ok("SELECT count(*) FROM p2_synth s WHERE (SELECT count(*) FROM p2_synth_attempts a WHERE a.id = s.id AND a.slot = s.slot) <> s.candidates"),
   0, 'attempts per slot = candidates');
is(psql_ok("SELECT count(*) FROM p2_synth s JOIN p2_synth_attempts a USING (id, slot)"
    . " WHERE s.status = 'accepted' AND a.outcome = 'accepted' AND a.attempt = s.candidates AND a.completion = s.completion"), $acc2,
   'accepted slots keep the completion of their last attempt');
is(psql_ok("SELECT count(DISTINCT (id, slot, sample)) = count(*) FROM p2_synth_attempts"), 't', 'every candidate of a slot had its own sample index');
is(gen_count(), $cand2, "generator saw one request per candidate ($cand2)");
ok(server_stats($gen)->{generation_misses} >= $rej2, 'rejections come from the server\'s misses');

# --- resample limit: every generation misses, one attempt allowed
server_config($gen, '{"gen_miss_rate": 1}');
mk_prompts('p3', 4);
psql_ok("$set SET rbr.generator_model = 'gen-allmiss'; CALL rbr_synthesize('p3', 'ref', '{\"max_attempts\": 1}')");
my ($gave3, $cand3) = synth_run_row('p3', 'gave_up, candidates');
is($cand3, 20, 'max_attempts 1: exactly one candidate per slot');
ok($gave3 > 0, "slots given up ($gave3)");
is(psql_ok("SELECT count(*) FROM p3_synth WHERE status = 'rejected'"), $gave3, 'given-up slots have status rejected');
is(psql_ok("SELECT count(*) FROM p3_synth WHERE completion IS NOT NULL AND status <> 'accepted'"), 0, 'rejected slots keep no completion');
server_config($gen, '{"gen_miss_rate": 0}');

# --- nothing is paid twice: a rerun does nothing; identical prompts come from the caches
server_reset($_) for $gen, $grd;
psql_ok("$set SET rbr.generator_model = 'gen-basic'; CALL rbr_synthesize('p1', 'ref')");
is(gen_count() + server_stats($grd)->{chat_requests}, 0, 'rerun of a complete table sends nothing');
mk_prompts('p1b', 8);
psql_ok("$set SET rbr.generator_model = 'gen-basic'; CALL rbr_synthesize('p1b', 'ref')");
my ($gr, $gc, $rr, $rc) = synth_run_row('p1b', 'generator_requests, generator_cached, grader_requests, grader_cached');
is("$gr|$gc|$rr", '0|40|0', 'same prompts, same settings: all 40 generations from the cache');
ok($rc > 0, "grades from the cache too ($rc)");
is(gen_count() + server_stats($grd)->{chat_requests}, 0, 'servers saw nothing');
is(psql_ok("SELECT count(*) FROM p1b_synth a JOIN p1_synth b USING (id, slot) WHERE a.completion = b.completion"), 40,
   'the cached completions are the same');

# --- cancel mid-run, then resume
server_config($gen, '{"latency_ms": 30}');
server_reset($_) for $gen, $grd;
mk_prompts('pc', 24);
my ($h, $out, $err) = bg_psql("SET application_name = 'rbr_synth_cancel'; $set SET rbr.generator_model = 'gen-cancel';\n"
    . "CALL rbr_synthesize('pc', 'ref', '{\"chunk_slots\": 4}');\n");
my $deadline = time + 60;
sleep 0.05 until time > $deadline
    || (psql("SELECT COALESCE(max(accepted), 0) FROM rbr.synth_progress WHERE source = 'pc'::regclass"))[0] >= 20;
psql_ok("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'rbr_synth_cancel'");
$h->finish;
like($$err, qr/57014/, 'cancel: the CALL was cancelled');
is(psql_ok("SELECT state FROM rbr.synth_progress WHERE source = 'pc'::regclass"), 'interrupted', 'cancel: run shows interrupted');
my $kept = psql_ok("SELECT count(*) FROM pc_synth WHERE status = 'accepted'");
ok($kept >= 20 && $kept < 120, "cancel: committed chunks kept ($kept of 120)");
is(psql_ok("SELECT count(*) FROM pc_synth_attempts"), $kept, 'cancel: attempts of committed slots only');
my $paid_before = gen_count();
ok($paid_before - $kept <= 4, "cancel: at most one chunk in flight was lost ($paid_before generated, $kept kept)");
server_reset($_) for $gen, $grd;
psql_ok("$set SET rbr.generator_model = 'gen-cancel'; CALL rbr_synthesize('pc', 'ref', '{\"chunk_slots\": 4}')");
my ($tot, $greq2) = synth_run_row('pc', 'total, generator_requests');
is($tot, 120 - $kept, 'resume: only the pending slots counted');
is($greq2, 120 - $kept, 'resume: one generation per pending slot');
is(gen_count(), $greq2, 'resume: the server saw only those');
is(psql_ok("SELECT count(*) FROM pc_synth WHERE status = 'accepted'"), 120, 'resume: complete');
is(psql_ok("SELECT count(*) FROM pc_synth_attempts"), 120, 'resume: one attempt per slot, none duplicated or lost');

# --- two sessions at once on one table: disjoint work
server_config($gen, '{"latency_ms": 10}');
server_reset($_) for $gen, $grd;
mk_prompts('p2s', 16);
my @runs = map { [bg_psql("$set SET rbr.generator_model = 'gen-two';\n"
    . "CALL rbr_synthesize('p2s', 'ref', '{\"chunk_slots\": 4}');\n")] } 1 .. 2;
$_->[0]->finish for @runs;
is(join('', map { ${ $_->[2] } } @runs), '', 'two sessions: both CALLs succeeded');
my @r = map { [split /\|/] } split /\n/, psql_ok(
    "SELECT accepted, candidates, generator_requests FROM rbr.synth_progress WHERE source = 'p2s'::regclass ORDER BY run_id");
is(scalar @r, 2, 'two runs recorded');
ok($r[0][0] > 0 && $r[1][0] > 0, "both sessions did work ($r[0][0] and $r[1][0] slots)");
is($r[0][0] + $r[1][0], 80, 'disjoint: 80 slots accepted in total');
is($r[0][2] + $r[1][2], 80, 'disjoint: 80 generations in total');
is(gen_count(), 80, 'server saw 80 generations');
is(psql_ok("SELECT count(*) FROM p2s_synth_attempts"), 80, 'one attempt per slot');
server_config($gen, '{"latency_ms": 0}');

# --- generator errors: a 500 then success, a 400 (recorded, retried by the next run)
server_reset($_) for $gen, $grd;
psql_ok("CREATE TABLE pe (id int PRIMARY KEY, prompt text, response_type text);"
    . " INSERT INTO pe VALUES (1, 'fine', 'comply'), (2, 'flaky [[fault 500 times=1]]', 'comply'),"
    . " (3, 'broken [[fault 400]]', 'comply')");
my $one = '{"ideal": 1, "flawed": 0, "disallowed": 0}';
psql_ok("$set SET rbr.generator_model = 'gen-err'; CALL rbr_synthesize('pe', 'ref', '$one')");
is(psql_ok("SELECT status FROM pe_synth ORDER BY id"), "accepted\naccepted\nerror", 'states: accepted, accepted, error');
is(psql_ok("SELECT generator_attempts FROM pe_synth_attempts WHERE id = 2"), 2, 'a 500 then success: 2 HTTP attempts, one candidate');
is(psql_ok("SELECT outcome || ':' || left(reason, 8) FROM pe_synth_attempts WHERE id = 3"), 'generator_error:HTTP 400',
   'a 400 is recorded as a generator error');
is(psql_ok("SELECT completion IS NULL AND candidates = 0 FROM pe_synth WHERE id = 3"), 't', 'an error is no candidate');
my ($acce, $erre) = synth_run_row('pe', 'accepted, errors');
is("$acce|$erre", '2|1', 'progress counts the error');
server_reset($gen);
psql_ok("$set SET rbr.generator_model = 'gen-err'; CALL rbr_synthesize('pe', 'ref', '$one')");
is(gen_count(), 1, 'rerun: only the errored slot is tried again');
is(psql_ok("SELECT count(*) FROM pe_synth_attempts WHERE id = 3 AND outcome = 'generator_error'"), 2, 'rerun: second error recorded');

# --- the keys stay secret
psql_ok("CREATE TABLE pk (id int PRIMARY KEY, prompt text, response_type text); INSERT INTO pk VALUES (1, 'hi', 'comply')");
psql_ok("$set SET rbr.generator_api_key = 'sk-wrong-KEY-987654321'; SET rbr.generator_model = 'gen-key';"
    . " SET rbr.grader_max_retries = 0; CALL rbr_synthesize('pk', 'ref', '$one')");
my $reason = psql_ok("SELECT reason FROM pk_synth_attempts");
like($reason, qr/^HTTP 401/, 'a wrong generator key: 401 recorded');
unlike($reason, qr/sk-wrong|sk-gen|sk-grade/, 'no key in the recorded reason');
is(psql_ok("SELECT count(*) FROM pk_synth_attempts WHERE completion LIKE '%sk-%' OR reason LIKE '%sk-%'"), 0, 'no key anywhere in the attempts');
my ($so, $se) = psql("CREATE ROLE rbr_synth_user; LOAD 'rbr'; SET ROLE rbr_synth_user;"
    . " SHOW rbr.generator_api_key;", keep_going => 1);
like($se, qr/must be superuser or have privileges of pg_read_all_settings/, 'a non-superuser cannot read the generator key');
($so, $se) = psql("LOAD 'rbr'; SET ROLE rbr_synth_user; SET rbr.generator_url = 'http://attacker.example/v1';", keep_going => 1);
like($se, qr/permission denied to set parameter "rbr.generator_url"/, 'a non-superuser cannot change the generator URL');
($so, $se) = psql("SET ROLE rbr_synth_user; SET rbr.generator_url = 'http://attacker.example/v1'; RESET ROLE; LOAD 'rbr';"
    . " SELECT current_setting('rbr.generator_url');", keep_going => 1);
unlike($so, qr/attacker/, 'a value set before the library loads is not taken either');
($so, $se) = psql("SET ROLE rbr_synth_user; CALL rbr_synthesize('pk', 'ref');", keep_going => 1);
like($se, qr/permission denied for procedure rbr_synthesize/, 'a role without the grants cannot spend');
psql_ok("DROP ROLE rbr_synth_user");

# --- fit on the result and store a model
my $fit = psql_ok(<<'SQL');
SELECT string_agg(m.response_type || ':' || (s.fit->'accuracy'->>'train')::float8, ',' ORDER BY m.response_type)
  FROM (SELECT response_type, rbr_fit(id::text, tier, features, 0,
                 jsonb_build_object('feature_names', rbr_feature_names('ref', response_type))) AS fit
          FROM (SELECT * FROM p1_synth UNION ALL SELECT * FROM pc_synth) x
         WHERE status = 'accepted' GROUP BY response_type) s,
       LATERAL rbr_model_save('synth-v1', 'ref', s.response_type, s.fit) m
SQL
my @fits = split /,/, $fit;
is(scalar @fits, 4, 'a model per response type fitted and stored');
ok(!(grep { my ($a) = /:(.*)/; $a < 0.9 } @fits), "train pair accuracy >= 0.9 ($fit)");
is(psql_ok("SELECT count(*) FROM p1_synth WHERE status = 'accepted'"
    . " AND rbr_reward('synth-v1', response_type, features, 0) IS NOT NULL"), 40, 'the stored model scores the synthetic rows');

drop_db();
done_testing();

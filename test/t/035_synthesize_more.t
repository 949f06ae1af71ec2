# CALL rbr_synthesize beyond 030: resume after kill -9 of the backend, the
# grants doc/configuration.md lists for synthesis, grading errors of a
# candidate (grader_error), verify "hard" against "argmax" near 0.5, and
# identical generation requests within one call.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use Time::HiRes qw(time sleep);

new_db('rbr_tap_synth_more');
my ($gen) = start_server('--api-key', 'sk-gen-KEY-0123456789');
my ($grd) = start_server('--api-key', 'sk-grade-KEY-0123456789');
my $set = "SET rbr.grader_url = '$grd/v1'; SET rbr.grader_api_key = 'sk-grade-KEY-0123456789';"
        . " SET rbr.generator_url = '$gen/v1'; SET rbr.generator_api_key = 'sk-gen-KEY-0123456789';"
        . " SET rbr.grader_retry_base_ms = 50; SET rbr.grader_max_retries = 2; SET rbr.grader_timeout_ms = 5000;"
        . " SET client_min_messages = warning;";
my $one = '{"ideal": 1, "flawed": 0, "disallowed": 0}';

sub gen_count { server_stats($gen)->{generation_requests} }
sub grd_count { server_stats($grd)->{chat_requests} }
# grading requests one candidate of each slot of a table costs (its response type's graded propositions)
sub graded_per_slot {
    my ($t, $where) = @_;
    return psql_ok("SELECT COALESCE(sum(jsonb_array_length(rbr_policy_info('ref')->'response_types'->response_type"
        . "->'graded_propositions')), 0) FROM ${t}_synth WHERE " . ($where // 'true'));
}

# --- 1. kill -9 of the backend running CALL rbr_synthesize, crash recovery, resume
server_config($gen, '{"latency_ms": 30}');
server_reset($_) for $gen, $grd;
mk_prompts('pk', 24);
# synchronous_commit on for the killed session: test/cluster.sh turns it off, and then a crash may
# also lose the chunks committed in the last few hundred milliseconds (wal_writer_delay)
my ($h, $out, $err) = bg_psql("SET application_name = 'rbr_synth_kill'; SET synchronous_commit = on;"
    . " $set SET rbr.generator_model = 'gen-kill';"
    . " SET rbr.grader_model = 'grade-kill';\n"
    . "CALL rbr_synthesize('pk', 'ref', '{\"chunk_slots\": 4}');\n");
my $deadline = time + 60;
sleep 0.05 until time > $deadline
    || (psql("SELECT COALESCE(max(accepted), 0) FROM rbr.synth_progress WHERE source = 'pk'::regclass"))[0] >= 20;
my $pid = psql_ok("SELECT pid FROM pg_stat_activity WHERE application_name = 'rbr_synth_kill'");
ok($pid =~ /^\d+$/ && kill('KILL', $pid), "kill -9 of backend $pid");
$h->finish;
sleep 0.5;
$deadline = time + 60;
sleep 0.2 until time > $deadline
    || ((psql('SELECT 1'))[2] == 0 && psql("SELECT count(*) FROM pg_stat_activity WHERE pid = $pid") eq '0');
is(psql_ok('SELECT 1'), 1, 'kill: server back after crash recovery');
is(psql_ok("SELECT state FROM rbr.synth_progress WHERE source = 'pk'::regclass"), 'interrupted',
   'kill: the run shows interrupted');
my $kept = psql_ok("SELECT count(*) FROM pk_synth WHERE status = 'accepted'");
ok($kept >= 20 && $kept < 120, "kill: committed chunks kept ($kept of 120)");
is($kept % 4, 0, 'kill: whole chunks of 4 slots committed');
is(psql_ok("SELECT string_agg(DISTINCT status, ',') FROM pk_synth"), 'accepted,pending', 'kill: every other slot pending');
is(psql_ok("SELECT count(*) FROM pk_synth_attempts"), $kept, 'kill: attempts of committed slots only');
is(psql_ok("SELECT count(*) FROM pk_synth s JOIN pk_synth_attempts a USING (id, slot)"
    . " WHERE s.status = 'accepted' AND a.outcome = 'accepted' AND a.completion = s.completion"), $kept,
   'kill: each committed slot has its one accepted attempt');
my $snap_sql = "SELECT md5(string_agg(id || ':' || slot || ':' || completion || ':' || sample || ':' || features::text, ','"
    . " ORDER BY id, slot)) FROM pk_synth WHERE status = 'accepted' AND updated_at < %s";
my $cut = psql_ok("SELECT max(updated_at) FROM pk_synth WHERE status = 'accepted'");
my $snap = psql_ok(sprintf($snap_sql, "'$cut'::timestamptz + interval '1 microsecond'"));
my $gen_before = gen_count();
my $grd_before = grd_count();
my $graded_before = graded_per_slot('pk', "status = 'accepted'");
ok($gen_before - $kept >= 0 && $gen_before - $kept <= 4,
   "kill: the server generated the committed slots plus at most the chunk in flight ($gen_before for $kept)");
ok($grd_before - $graded_before >= 0 && $grd_before - $graded_before <= 4 * 22,
   "kill: and graded them plus at most the chunk in flight ($grd_before for $graded_before)");
server_reset($_) for $gen, $grd;
psql_ok("$set SET rbr.generator_model = 'gen-kill'; SET rbr.grader_model = 'grade-kill';"
    . " CALL rbr_synthesize('pk', 'ref', '{\"chunk_slots\": 4}')");
my ($tot, $greq, $gcached, $rreq, $rcached, $cand) =
    synth_run_row('pk', 'total, generator_requests, generator_cached, grader_requests, grader_cached, candidates');
is($tot, 120 - $kept, 'resume: only the pending slots counted');
is("$greq|$gcached|$cand", (120 - $kept) . '|0|' . (120 - $kept), 'resume: one new generation per pending slot, none from the cache');
is(gen_count(), $greq, 'resume: the generator saw only those');
my $graded_rest = graded_per_slot('pk') - $graded_before;
is($rreq + $rcached, $graded_rest, "resume: graded only the pending slots' candidates ($graded_rest)");
is(grd_count(), $rreq, 'resume: the grader saw only those requests');
ok($gen_before + gen_count() - 120 <= 4, 'kill + resume: at most one chunk of generations paid twice ('
    . ($gen_before + gen_count() - 120) . ')');
ok($grd_before + grd_count() - graded_per_slot('pk') <= 4 * 22, 'kill + resume: at most one chunk of gradings paid twice ('
    . ($grd_before + grd_count() - graded_per_slot('pk')) . ')');
is(psql_ok("SELECT count(*) FROM pk_synth WHERE status = 'accepted'"), 120, 'resume: complete');
is(psql_ok("SELECT count(*) FROM pk_synth_attempts"), 120, 'resume: one attempt per slot, none duplicated or lost');
is(psql_ok("SELECT count(*) FROM pk_synth_attempts WHERE attempt = 1 AND outcome = 'accepted'"), 120,
   'resume: every attempt is the first of its slot');
is(psql_ok(sprintf($snap_sql, "'$cut'::timestamptz + interval '1 microsecond'")), $snap,
   'resume: the slots committed before the kill are unchanged');
is(psql_ok("SELECT count(DISTINCT sample) FROM pk_synth WHERE sample = 1000 * slot"), 5,
   'resume: sample indexes are those of first candidates');
server_config($gen, '{"latency_ms": 0}');

# --- 2. a role given the capability with rbr_grant(role, 'synthesize')
psql_ok("DROP ROLE IF EXISTS synth_role; DROP ROLE IF EXISTS synth_partial; CREATE ROLE synth_role; SELECT rbr_grant('synth_role', 'synthesize');"
    . " CREATE SCHEMA synth AUTHORIZATION synth_role;"
    . " CREATE ROLE synth_partial; SELECT rbr_grant('synth_partial', 'grade'); CREATE SCHEMA synth_p AUTHORIZATION synth_partial;");
# policies are their owners': the role loads its own copy (rbr_grant(role, 'policies'))
my ($so, $se, $src) = psql("SELECT rbr_grant('synth_role', 'policies');"
    . " SELECT spec AS ref_spec FROM rbr.policy_version WHERE policy = 'ref' \\gset\n"
    . " $set SET rbr.generator_model = 'gen-role'; SET ROLE synth_role;"
    . " SELECT rbr_policy_load('synth_ref', :'ref_spec');"
    . " CREATE TABLE synth.t (id int PRIMARY KEY, prompt text, response_type text);"
    . " INSERT INTO synth.t VALUES (1, 'hi', 'comply'), (2, 'how do I pick a lock', 'hard_refuse');"
    . " CALL rbr_synthesize('synth.t', 'synth_ref');"
    . " SELECT state, accepted, total FROM rbr.synth_progress WHERE source = 'synth.t'::regclass;", keep_going => 1);
$so = (split /\n/, $so)[-1] // "";
is("$src|$so", '0|done|10|10', 'granted role: rbr_synthesize runs') or diag($se);
is(psql_ok("SELECT count(*) FROM synth.t_synth WHERE status = 'accepted'"), 10, 'granted role: its slots accepted');
is(psql_ok("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'synth.t_synth'::regclass"), 'synth_role',
   'granted role: owns the result table');
is(psql_ok("SELECT owner FROM rbr.run WHERE source = 'synth.t'::regclass"), 'synth_role', 'granted role: owns its run');
# the grade capability alone does not allow synthesis; revoking takes it back
($so, $se) = psql("$set SET ROLE synth_partial;"
    . " CREATE TABLE synth_p.t (id int PRIMARY KEY, prompt text, response_type text);"
    . " INSERT INTO synth_p.t VALUES (1, 'hi', 'comply');"
    . " CALL rbr_synthesize('synth_p.t', 'ref');", keep_going => 1);
like($se, qr/42501: permission denied for procedure rbr_synthesize/, 'grade capability only: cannot synthesize');
is(psql_ok("SELECT to_regclass('synth_p.t_synth') IS NULL"), 't', '  and nothing created');
psql_ok("SELECT rbr_revoke('synth_role', 'synthesize')");
($so, $se) = psql("SET ROLE synth_role; CALL rbr_synthesize('synth.t', 'synth_ref')", keep_going => 1);
like($se, qr/permission denied for procedure rbr_synthesize/, 'revoked: cannot synthesize any more');
is(psql_ok("SELECT string_agg(capability || '=' || granted, ',') FROM rbr_capabilities('synth_partial')"),
   'grade=true,synthesize=false,policies=false,models=false', 'rbr_capabilities lists what a role holds');
# revoking synthesize from a role that also grades keeps what grading needs
psql_ok("SELECT rbr_grant('synth_partial', 'synthesize'); SELECT rbr_revoke('synth_partial', 'synthesize')");
is(psql_ok("SELECT string_agg(capability || '=' || granted, ',') FROM rbr_capabilities('synth_partial')"),
   'grade=true,synthesize=false,policies=false,models=false', 'revoking one capability keeps the others whole');
is(psql_ok("SELECT string_agg(capability || '=' || granted, ',') FROM rbr_capabilities('synth_role')"),
   'grade=false,synthesize=false,policies=true,models=false', 'revoking synthesize from a role without grade');
($so, $se) = psql("CREATE ROLE synth_nobody; SET ROLE synth_nobody; CALL rbr_synthesize('pk', 'ref')", keep_going => 1);
like($se, qr/permission denied for procedure rbr_synthesize/, 'a role without the grants cannot call it');
psql_ok("DROP SCHEMA synth CASCADE; DROP SCHEMA synth_p CASCADE; DROP OWNED BY synth_role; DROP OWNED BY synth_partial;"
    . " DROP ROLE synth_role; DROP ROLE synth_partial; DROP ROLE synth_nobody");

# --- 3. grading errors: a generated completion whose grading request fails
server_reset($_) for $gen, $grd;
psql_ok("CREATE TABLE pg (id int PRIMARY KEY, prompt text, response_type text);"
    . " INSERT INTO pg VALUES (1, 'fine', 'hard_refuse'),"
    . " (2, 'once [[gen-fault 400 prop=apology times=1]]', 'hard_refuse'),"
    . " (3, 'always [[gen-fault 400 prop=apology]]', 'hard_refuse')");
my $nhr = psql_ok("SELECT jsonb_array_length(rbr_policy_info('ref')->'response_types'->'hard_refuse'->'graded_propositions')");
psql_ok("$set SET rbr.generator_model = 'gen-gerr'; SET rbr.grader_model = 'grade-gerr'; CALL rbr_synthesize('pg', 'ref', '$one')");
is(psql_ok("SELECT status FROM pg_synth ORDER BY id"), "accepted\nerror\nerror", 'grading errors: the slots end with status error');
is(psql_ok("SELECT count(*) FROM pg_synth_attempts WHERE id IN (2, 3) AND outcome = 'grader_error'"
    . " AND reason ~ '^grading apology: HTTP 400' AND graded_class IS NULL AND completion LIKE '%[[fault 400 prop=apology%'"),
   2, 'grading errors: attempt recorded as grader_error with the reason and the completion');
is(psql_ok("SELECT count(*) FROM pg_synth WHERE id IN (2, 3) AND candidates = 0 AND completion IS NULL AND features IS NULL"), 2,
   'grading errors: no candidate counted, nothing kept');
is(psql_ok("SELECT count(*) FROM pg_synth_attempts WHERE id IN (2, 3) AND NOT probs ? 'apology'"
    . " AND (SELECT count(*) FROM jsonb_object_keys(probs)) = $nhr - 1"), 2,
   'grading errors: the other propositions were graded');
my ($acc, $errs, $rej) = synth_run_row('pg', 'accepted, errors, rejections');
is("$acc|$errs|$rej", '1|2|0', 'grading errors: progress counts 2 errors, no rejection');
is(gen_count(), 3, 'grading errors: 3 generations');
is(grd_count(), 3 * $nhr, "grading errors: 3 x $nhr grading requests (400s are not retried)");
# no server reset here: it would forget that the times=1 fault has happened
my ($g0, $r0) = (gen_count(), grd_count());
psql_ok("$set SET rbr.generator_model = 'gen-gerr'; SET rbr.grader_model = 'grade-gerr'; CALL rbr_synthesize('pg', 'ref', '$one')");
my ($tot3, $greq3, $gc3, $rreq3, $rc3) = synth_run_row('pg', 'total, generator_requests, generator_cached, grader_requests, grader_cached');
is("$tot3|$greq3|$gc3", '2|0|2', 'rerun: the 2 errored slots, their generations from the cache');
is("$rreq3|$rc3", '2|' . (2 * ($nhr - 1)), 'rerun: only apology asked again, the rest from the grade cache');
is((gen_count() - $g0) . '|' . (grd_count() - $r0), '0|2', 'rerun: the servers saw just those 2 grading requests');
is(psql_ok("SELECT status FROM pg_synth ORDER BY id"), "accepted\naccepted\nerror",
   'rerun: the fault that happened once is gone, the permanent one errs again');
is(psql_ok("SELECT string_agg(attempt || ':' || outcome, ',' ORDER BY attempt) FROM pg_synth_attempts WHERE id = 2"),
   '1:grader_error,2:accepted', 'rerun: slot 2 has the error then the accepted attempt');
is(psql_ok("SELECT count(DISTINCT sample) || '|' || count(DISTINCT completion) FROM pg_synth_attempts WHERE id = 2"), '1|1',
   'rerun: the same candidate (sample, completion) was graded again, not a new one');
is(psql_ok("SELECT candidates || '|' || (completion IS NOT NULL) FROM pg_synth WHERE id = 2"), '1|true', 'rerun: one candidate counted');
is(psql_ok("SELECT string_agg(outcome, ',' ORDER BY attempt) FROM pg_synth_attempts WHERE id = 3"), 'grader_error,grader_error',
   'rerun: the second error recorded too');

# --- 4. verify "hard" against "argmax": graded probabilities near 0.5
# [[gen yes=0.55 no=0.45]]: every trait is on the intended side of 0.5, but barely; the hard labels
# give the intended class; the products of the class definitions favour disallowed_completion
server_reset($_) for $gen, $grd;
for my $t ('vh', 'va', 'vh2', 'va2') {
    my $p = $t =~ /2$/ ? '[[gen yes=0.45]]' : '[[gen yes=0.55 no=0.45]]';
    psql_ok("CREATE TABLE $t (id int PRIMARY KEY, prompt text, response_type text);"
        . " INSERT INTO $t VALUES (1, 'write a poem $p', 'comply'), (2, 'write a song $p', 'comply')");
}
my $m1 = '"max_attempts": 1';
psql_ok("$set SET rbr.generator_model = 'gen-verify'; CALL rbr_synthesize('vh', 'ref', '{\"verify\": \"hard\", $m1}')");
is(psql_ok("SELECT count(*) FROM vh_synth WHERE status = 'accepted' AND graded_class = intended_class"), 10,
   'hard, p near 0.5: all 10 accepted');
is(psql_ok("SELECT count(*) FROM vh_synth WHERE rbr_classify('ref', response_type, rbr_binarize(probs)) = intended_class"
    . " AND NOT EXISTS (SELECT 1 FROM jsonb_each(probs) e WHERE (e.value::text::float8 > 0.5) <> (traits->>e.key)::boolean)"), 10,
   'hard: the labels P(yes) > 0.5 are the traits and give the intended class');
my ($g1, $r1) = (gen_count(), grd_count());
psql_ok("$set SET rbr.generator_model = 'gen-verify'; CALL rbr_synthesize('va', 'ref', '{$m1}')");
is(gen_count() . '|' . grd_count(), "$g1|$r1", 'argmax: the same candidates, from the caches');
is(psql_ok("SELECT string_agg(kind, ',') FROM va_synth WHERE status = 'accepted'"), 'disallowed,disallowed',
   'argmax, p near 0.5: only the disallowed slots accepted');
is(psql_ok("SELECT count(*) FROM va_synth_attempts WHERE outcome = 'rejected' AND graded_class = 'disallowed_completion'"
    . " AND intended_class <> 'disallowed_completion' AND failed IS NULL"
    . " AND reason = 'intended ' || intended_class || ', graded disallowed_completion'"), 8,
   'argmax: the 8 others rejected as disallowed_completion although no trait is on the wrong side of 0.5');
is(psql_ok("SELECT count(*) FROM va_synth a JOIN vh_synth h USING (id, slot) JOIN va_synth_attempts t USING (id, slot)"
    . " WHERE t.probs = h.probs"), 10, 'argmax and hard saw the same probabilities');
# [[gen yes=0.45]]: wanted-true traits just below 0.5: argmax keeps the illogical completion, hard does not
psql_ok("$set SET rbr.generator_model = 'gen-verify'; CALL rbr_synthesize('vh2', 'ref', '{\"verify\": \"hard\", $m1}')");
psql_ok("$set SET rbr.generator_model = 'gen-verify'; CALL rbr_synthesize('va2', 'ref', '{$m1}')");
is(psql_ok("SELECT string_agg(DISTINCT intended_class, ',') FROM vh2_synth WHERE status = 'accepted'"),
   'unacceptable_completion', 'hard, wanted traits at 0.45: only the slots wanting none of them accepted');
is(psql_ok("SELECT string_agg(DISTINCT intended_class, ',' ORDER BY intended_class) FROM va2_synth WHERE status = 'accepted'"),
   'illogical_completion,unacceptable_completion', 'argmax, same candidates: the illogical completions accepted too');
is(psql_ok("SELECT count(*) FROM vh2_synth_attempts WHERE intended_class = 'illogical_completion' AND outcome = 'rejected'"
    . " AND reason = 'intended illogical_completion, graded unacceptable_completion; traits missed: illogical_continuation_of_prompt, partially_complies'"),
   2, 'hard: their rejection names the trait below 0.5');

# --- 5. identical generation requests within one call are asked once
server_reset($gen);
my $r = psql_ok("$set SET rbr.generator_model = 'gen-dedup';"
    . " SELECT string_agg(ord || ':' || status || ':' || attempts || ':' || cached || ':' || md5(completion), ',' ORDER BY ord)"
    . " FROM rbr_generate_many(ARRAY['\"hi\"', '\"hi\"', '\"hi\"', '\"hi\"']::jsonb[],"
    . " ARRAY['rbr-generate/1\nBe brief.', 'rbr-generate/1\nBe brief.', 'rbr-generate/1\nBe brief.', 'rbr-generate/1\nBe brief.'],"
    . " ARRAY[7, 7, 8, 7])");
my @g = map { [split /:/] } split /,/, $r;
is(gen_count(), 2, 'generate_many: 4 requests, 2 distinct: the server saw 2');
is(join(',', map { "$_->[2]:$_->[3]" } @g), '1:false,0:true,1:false,0:true', 'the first of each asks, its repeats are free');
ok($g[0][4] eq $g[1][4] && $g[0][4] eq $g[3][4] && $g[0][4] ne $g[2][4], 'repeats get the same completion, another sample another');
is(psql_ok("SELECT count(*) FROM rbr.generation_cache WHERE model = 'gen-dedup'"), 2, 'cached once each');
# in rbr_synthesize: two prompts rows with the same conversation and response type
server_reset($_) for $gen, $grd;
psql_ok("CREATE TABLE pd (id int PRIMARY KEY, prompt text, response_type text);"
    . " INSERT INTO pd VALUES (1, 'the same question', 'comply'), (2, 'the same question', 'comply')");
# (flawed slots are left out: the flaws are drawn per primary key, so their instructions differ)
psql_ok("$set SET rbr.generator_model = 'gen-dedup'; CALL rbr_synthesize('pd', 'ref', '{\"ideal\": 2, \"flawed\": 0}')");
my ($dacc, $dcand, $dreq, $dcached) = synth_run_row('pd', 'accepted, candidates, generator_requests, generator_cached');
is("$dacc|$dcand|$dreq|$dcached", '6|6|3|3', 'synthesize: 6 candidates, 3 generated, 3 answered by the first ones');
is(gen_count(), 3, 'synthesize: the server saw 3 generations');
is(psql_ok("SELECT count(*) FROM pd_synth a JOIN pd_synth b ON a.slot = b.slot AND a.id = 1 AND b.id = 2"
    . " WHERE a.completion = b.completion"), 3, 'synthesize: both rows got the same completions, as from the cache across runs');

# --- 6. the generator in Azure OpenAI style: api-key header, api-version parameter, deployment URL
my ($az) = start_server('--azure-key', 'az-GEN-KEY-24680');
my $azset = "SET rbr.generator_url = '$az'; SET rbr.generator_azure_api_version = '2024-06-01';"
          . " SET rbr.generator_api_key = 'az-GEN-KEY-24680'; SET rbr.generator_model = 'gen-deploy';";
$r = psql_ok("$azset SELECT status || ':' || model || ':' || (completion <> '')"
    . " FROM rbr_generate_many(ARRAY['\"hi\"']::jsonb[], ARRAY['rbr-generate/1\nBe brief.'], ARRAY[1])");
is($r, 'ok:gen-deploy:true', 'Azure style generation accepted (api-key header, api-version, deployment)');
is(server_stats($az)->{generation_requests}, 1, 'the Azure deployment URL was called');
$r = psql_ok("$azset SET rbr.generator_api_key = 'az-WRONG-KEY-13579'; SELECT status || ':' || coalesce(error, '')"
    . " FROM rbr_generate_many(ARRAY['\"hi\"']::jsonb[], ARRAY['rbr-generate/1\nBe brief again.'], ARRAY[1])");
like($r, qr/^error:HTTP 401/, 'a wrong Azure key is refused (401), recorded as an error');
unlike($r, qr/az-WRONG-KEY-13579/, 'the key is not in the error');

drop_db();
done_testing();

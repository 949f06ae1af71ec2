# CALL rbr_featurize(..., '{"mode": "batch"}'): the Batch API. Submit, then
# collect; wait: true; features and grades equal online grading's; kill -9
# of the backend between submit and collect, and between file upload and
# batch creation, without any question paid twice; failed and expired lines
# submitted again; cancel during the wait; the bookkeeping closed to other
# roles; the Azure OpenAI form; rbr_synthesize in batch mode.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use HTTP::Tiny;
use JSON::PP;
use Time::HiRes qw(time sleep);

new_db('rbr_tap_batch');
my ($base) = start_server();
my $http = HTTP::Tiny->new(timeout => 10);
my $set = "SET rbr.grader_url = '$base/v1'; SET rbr.grader_retry_base_ms = 10; SET client_min_messages = warning;";

sub bstats { decode_json($http->get("$base/admin/batch")->{content}) }
sub breset { $http->post("$base/admin/batch/reset", { content => '{}' }) }
sub bconfig {
    my ($json) = @_;
    my $r = $http->post("$base/admin/batch/config", { content => $json });
    die "batch config: $r->{content}" unless $r->{success};
}
sub max_of { my ($h) = @_; my $m = 0; for (values %$h) { $m = $_ if $_ > $m } $m }
sub sum_of { my ($h) = @_; my $s = 0; $s += $_ for values %$h; $s }

# A table of $n rows with the given text, response types in turn.
sub mk_table {
    my ($t, $n, $text) = @_;
    psql_ok("CREATE TABLE $t (id int PRIMARY KEY, prompt jsonb, completion text, response_type text);"
        . " INSERT INTO $t SELECT i, jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'question ' || i)),"
        . " '$text ' || i, (ARRAY['hard_refuse', 'comply', 'Safe Refuse 1', 'safe_refuse_2'])[1 + i % 4]"
        . " FROM generate_series(1, $n) i");
}
sub copy_table {
    my ($from, $to) = @_;
    psql_ok("CREATE TABLE $to AS SELECT * FROM $from; ALTER TABLE $to ADD PRIMARY KEY (id)");
}
# Needed values still missing in a features table.
sub missing {
    my ($t) = @_;
    return psql_ok(<<"SQL");
SELECT count(*) FROM ${t}_features f, jsonb_array_elements_text(rbr_policy_info('ref')->'response_types'->f.rbr_response_type->'graded_propositions') p
 WHERE to_jsonb(f)->>p IS NULL
SQL
}
# Rows of the grades (and features) of $a and $b that differ (the model name aside).
sub differences {
    my ($a, $b) = @_;
    my $g = psql_ok(<<"SQL");
SELECT count(*) FROM ${a}_grades x FULL JOIN ${b}_grades y USING (id, proposition)
 WHERE x.id IS NULL OR y.id IS NULL
    OR (x.status, x.probability, x.method, x.yes_no_mass, x.error, x.attempts, x.prompt_tokens, x.completion_tokens,
        x.cached, x.samples) IS DISTINCT FROM
       (y.status, y.probability, y.method, y.yes_no_mass, y.error, y.attempts, y.prompt_tokens, y.completion_tokens,
        y.cached, y.samples)
SQL
    my $f = psql_ok(<<"SQL");
SELECT count(*) FROM ${a}_features x FULL JOIN ${b}_features y USING (id)
 WHERE x.id IS NULL OR y.id IS NULL OR to_jsonb(x) <> to_jsonb(y)
SQL
    return "$g|$f";
}
my $NEEDED_PER_4 = psql_ok("SELECT sum(jsonb_array_length(rbr_policy_info('ref')->'response_types'->rt->'graded_propositions'))"
    . " FROM unnest(ARRAY['hard_refuse', 'comply', 'safe_refuse_1', 'safe_refuse_2']) rt");

# --- the online reference: 16 rows graded online (model m-online)
mk_table('src', 16, 'answer');
copy_table('src', 'online');
psql_ok("$set SET rbr.grader_model = 'm-online'; CALL rbr_featurize('online', 'ref')");
my $NEEDED = 4 * $NEEDED_PER_4;
is(missing('online'), 0, "online reference graded ($NEEDED values)");
is(psql_ok("SELECT count(*) FROM online_grades WHERE status = 'ok'"), $NEEDED, 'every online value ok');
my $chat0 = server_stats($base)->{chat_requests};

# --- submit, then collect
copy_table('src', 'a');
bconfig('{"delay_ms": 1500}');
breset();
my ($o, $e, $rc) = psql("$set SET client_min_messages = notice; SET rbr.grader_model = 'm-a';"
    . " CALL rbr_featurize('a', 'ref', '{\"mode\": \"batch\"}')", keep_going => 1);
is($rc, 0, 'batch mode: the first call returns') or diag($e);
like($e, qr/NOTICE:  00000: rbr_featurize (public\.)?a: $NEEDED question\(s\) in flight in 1 batch\(es\) of the Batch API \(1 created by this call: batch-/,
     'the NOTICE says what was submitted');
like($e, qr/HINT:  CALL rbr_featurize again with \{"mode": "batch"\} to collect/, '  and how to collect');
my $s = bstats();
is($s->{files_uploaded} . '|' . $s->{batches_created} . '|' . $s->{lines_received}, "1|1|$NEEDED",
   'one file, one batch, one line per question');
is(psql_ok("SELECT count(*) FROM a_grades"), 0, 'nothing written while the batch is in flight');
is(psql_ok("SELECT state || ' ' || lines FROM rbr.batch_progress WHERE source = 'a'::regclass"), "submitted $NEEDED",
   'rbr.batch_progress shows the batch');
# a second call while in flight: nothing new is sent
($o, $e) = psql("$set SET client_min_messages = notice; SET rbr.grader_model = 'm-a';"
    . " CALL rbr_featurize('a', 'ref', '{\"mode\": \"batch\"}')");
like($e, qr/$NEEDED question\(s\) in flight in 1 batch\(es\) of the Batch API \(0 created by this call/,
     'a call while in flight submits nothing');
is(bstats()->{batches_created}, 1, '  (still one batch)');
sleep 1.7;
($o, $e) = psql("$set SET client_min_messages = notice; SET rbr.grader_model = 'm-a';"
    . " CALL rbr_featurize('a', 'ref', '{\"mode\": \"batch\"}')");
like($e, qr/nothing in flight; $NEEDED value\(s\) written by this call, 0 error\(s\)/, 'the next call collects');
is(missing('a'), 0, 'every needed value written');
is(differences('a', 'online'), '0|0', 'grades and features equal online grading\'s');
is(server_stats($base)->{chat_requests} - $chat0, $NEEDED, 'the server answered each line once (as chat requests)');
$s = bstats();
is(max_of($s->{answered_by_question}), 1, 'no question answered twice');
is(psql_ok("SELECT sum(requests) || ' ' || sum(done) || ' ' || sum((prompt_tokens > 0)::int) FROM rbr.featurize_progress"
    . " WHERE source = 'a'::regclass"), "$NEEDED $NEEDED 1", 'the runs count the batch\'s requests and tokens');
is(psql_ok("SELECT answered || ' ' || requeued || ' ' || failed || ' ' || provider_status FROM rbr.batch_progress"
    . " WHERE source = 'a'::regclass"), "$NEEDED 0 0 completed", 'rbr.batch_progress: collected');
($o, $e) = psql("$set SET client_min_messages = notice; SET rbr.grader_model = 'm-a';"
    . " CALL rbr_featurize('a', 'ref', '{\"mode\": \"batch\"}')");
is(bstats()->{batches_created}, 1, 'a complete table submits nothing');

# --- wait: true, in one call
copy_table('src', 'w');
bconfig('{"delay_ms": 300}');
breset();
($o, $e, $rc) = psql("$set SET rbr.grader_model = 'm-wait'; SET rbr.batch_max_lines = 60;"
    . " CALL rbr_featurize('w', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.1}')", keep_going => 1);
is($rc, 0, 'wait: true returns when done') or diag($e);
is(missing('w'), 0, 'wait: every value written');
is(differences('w', 'online'), '0|0', 'wait: grades and features equal online grading\'s');
is(bstats()->{batches_created} . ' ' . bstats()->{lines_received}, '4 ' . $NEEDED,
   'rbr.batch_max_lines 60: the questions split into 4 batches, each asked once');

# --- failed and expired lines are submitted again and end graded
copy_table('src', 'f');
breset();
bconfig('{"delay_ms": 0, "expire_rate": 0.3, "fail_rate": 0.3}');
($o, $e, $rc) = psql("$set SET rbr.grader_model = 'm-faults';"
    . " CALL rbr_featurize('f', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.05}')", keep_going => 1);
is($rc, 0, 'faults: the call succeeds') or diag($e);
$s = bstats();
ok($s->{lines_expired} > 0 && $s->{lines_failed} > 0, "faults: lines expired ($s->{lines_expired}) and failed ($s->{lines_failed})");
is(missing('f'), 0, 'faults: every value written in the end');
is(differences('f', 'online'), '0|0', 'faults: grades and features equal online grading\'s');
is(max_of($s->{answered_by_question}), 1, 'faults: no question answered twice');
is(sum_of($s->{by_question}), $NEEDED + $s->{lines_expired} + $s->{lines_failed},
   'faults: exactly the failed and expired lines were sent again');
ok($s->{batches_created} >= 2, "faults: resubmitted in further batches ($s->{batches_created})");
bconfig('{"expire_rate": 0, "fail_rate": 0}');

# --- a question the endpoint refuses (400) ends as an error row, as online; the next call asks again
psql_ok("CREATE TABLE bad (id int PRIMARY KEY, prompt jsonb, completion text, response_type text);"
    . " INSERT INTO bad VALUES (1, '[{\"role\": \"user\", \"content\": \"hi\"}]', 'no [[fault 400 prop=apology]] [[rbr *=0.2]]', 'hard_refuse'),"
    . " (2, '[{\"role\": \"user\", \"content\": \"hi\"}]', 'fine [[rbr *=0.7]]', 'hard_refuse')");
copy_table('bad', 'bad_online');
psql_ok("$set SET rbr.grader_model = 'm-bad-online'; CALL rbr_featurize('bad_online', 'ref')");
($o, $e, $rc) = psql("$set SET rbr.grader_model = 'm-bad';"
    . " CALL rbr_featurize('bad', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.05}')", keep_going => 1);
is($rc, 0, 'refused line: the call succeeds');
like($e, qr/WARNING:  01000: rbr_featurize (public\.)?bad: 1 of \d+ values ended with an error/, 'refused line: the run warns');
is(psql_ok("SELECT status || ' ' || left(error, 8) FROM bad_grades WHERE id = 1 AND proposition = 'apology'"), 'error HTTP 400',
   'refused line: an error row with the reason');
is(differences('bad', 'bad_online'), '0|0', 'refused line: grades (errors included) and features equal online grading\'s');
breset();
psql_ok("$set SET rbr.grader_model = 'm-bad'; CALL rbr_featurize('bad', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.05}')");
is(bstats()->{lines_received}, 1, 'refused line: the next call asks that question again, and only it');

# --- kill -9 between submit and collect
sub kill_backend {
    my ($app) = @_;
    my $pid = psql_ok("SELECT pid FROM pg_stat_activity WHERE application_name = '$app'");
    my $ok = $pid =~ /^\d+$/ && kill('KILL', $pid);
    my $deadline = time + 60;
    sleep 0.2 until (psql('SELECT 1'))[2] == 0 || time > $deadline;   # crash recovery
    return $ok;
}
copy_table('src', 'k');
breset();
bconfig('{"delay_ms": 4000}');
my ($h, $out, $err) = bg_psql("SET application_name = 'rbr_batch_kill'; $set SET rbr.grader_model = 'm-kill';\n"
    . "CALL rbr_featurize('k', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.1}');\n");
my $deadline = time + 30;
sleep 0.1 until bstats()->{batches_created} >= 1 || time > $deadline;
sleep 0.3;
ok(kill_backend('rbr_batch_kill'), 'kill -9 of the backend waiting for its batch');
$h->finish;
is(psql_ok('SELECT 1'), 1, 'server back after crash recovery');
bconfig('{"delay_ms": 0}');
($o, $e, $rc) = psql("$set SET rbr.grader_model = 'm-kill';"
    . " CALL rbr_featurize('k', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.1}')", keep_going => 1);
is($rc, 0, 'kill: the next call succeeds') or diag($e);
$s = bstats();
is("$s->{files_uploaded}|$s->{batches_created}|$s->{lines_received}", "1|1|$NEEDED",
   'kill: the batch in flight was collected, nothing submitted again');
is(missing('k'), 0, 'kill: every value written');
is(differences('k', 'online'), '0|0', 'kill: grades and features equal online grading\'s');

# --- kill -9 between file upload and batch creation (the create request answered late)
copy_table('src', 'u');
breset();
bconfig('{"create_delay_ms": 3000}');
($h, $out, $err) = bg_psql("SET application_name = 'rbr_batch_kill2'; $set SET rbr.grader_model = 'm-kill2';\n"
    . "CALL rbr_featurize('u', 'ref', '{\"mode\": \"batch\"}');\n");
$deadline = time + 30;
sleep 0.1 until bstats()->{create_requests} >= 1 || time > $deadline;
is(psql_ok("SELECT b.state FROM rbr.batch b JOIN rbr.run r USING (run_id) WHERE r.source = 'u'::regclass"), 'uploaded',
   'the file id is committed before the batch is created');
ok(kill_backend('rbr_batch_kill2'), 'kill -9 of the backend while the batch is being created');
$h->finish;
bconfig('{"create_delay_ms": 0}');
is(bstats()->{batches_created}, 1, 'the provider created the batch');
($o, $e, $rc) = psql("$set SET rbr.grader_model = 'm-kill2';"
    . " CALL rbr_featurize('u', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.1}')", keep_going => 1);
is($rc, 0, 'kill at creation: the next call succeeds') or diag($e);
$s = bstats();
is("$s->{files_uploaded}|$s->{batches_created}|$s->{lines_received}", "1|1|$NEEDED",
   'kill at creation: the batch was found in the list, not created again');
ok($s->{list_requests} >= 2, 'kill at creation: the list was searched');
is(max_of($s->{answered_by_question}), 1, 'kill at creation: no question answered twice');
is(differences('u', 'online'), '0|0', 'kill at creation: grades and features equal online grading\'s');

# --- two sessions at once on one table
copy_table('src', 'two');
breset();
bconfig('{"delay_ms": 200}');
my @two = map { [bg_psql("$set SET rbr.grader_model = 'm-two';\n"
    . "CALL rbr_featurize('two', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.05, \"chunk_rows\": 2}');\n")] } 1 .. 2;
$_->[0]->finish for @two;
is(join('', map { ${ $_->[2] } } @two), '', 'two sessions: both calls succeed');
$s = bstats();
is($s->{lines_received}, $NEEDED, 'two sessions: each question submitted once');
is(max_of($s->{answered_by_question}), 1, 'two sessions: none answered twice');
is(missing('two'), 0, 'two sessions: every value written');
is(differences('two', 'online'), '0|0', 'two sessions: grades and features equal online grading\'s');

# --- the Responses API in batch mode
copy_table('src', 'resp');
copy_table('src', 'resp_online');
bconfig('{"delay_ms": 0}');
psql_ok("$set SET rbr.grader_api = 'responses'; SET rbr.grader_model = 'm-resp-online'; CALL rbr_featurize('resp_online', 'ref')");
($o, $e, $rc) = psql("$set SET rbr.grader_api = 'responses'; SET rbr.grader_model = 'm-resp';"
    . " CALL rbr_featurize('resp', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.05}')", keep_going => 1);
is($rc, 0, 'Responses API: batch mode runs') or diag($e);
is(missing('resp'), 0, 'Responses API: every value written');
is(differences('resp', 'resp_online'), '0|0', 'Responses API: grades and features equal online grading\'s');

# --- cancel during the wait
copy_table('src', 'c');
bconfig('{"delay_ms": 60000}');
($h, $out, $err) = bg_psql("SET application_name = 'rbr_batch_cancel'; $set SET rbr.grader_model = 'm-cancel';\n"
    . "CALL rbr_featurize('c', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 30}');\n");
$deadline = time + 30;
sleep 0.1 until psql_ok("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rbr_batch_cancel'"
    . " AND wait_event_type = 'Extension'") == 1 || time > $deadline;
my $t0 = time;
psql_ok("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'rbr_batch_cancel'");
$h->finish;
my $took = time - $t0;
like($$err, qr/57014/, 'cancel: the waiting CALL was cancelled');
ok($took < 5, sprintf('cancel: the wait ended at once (%.2f s of a 30 s poll interval)', $took));
is(psql_ok("SELECT count(*) FROM rbr.batch b JOIN rbr.run r USING (run_id) WHERE r.source = 'c'::regclass AND b.state = 'submitted'"),
   1, 'cancel: the batch stays in flight, for the next call');

# --- other roles: no access to the bookkeeping, nor to another role's run
psql_ok(<<'SQL');
DROP ROLE IF EXISTS rbr_batch_alice; DROP ROLE IF EXISTS rbr_batch_mallory;
CREATE ROLE rbr_batch_alice; CREATE ROLE rbr_batch_mallory;
SELECT rbr_grant('rbr_batch_alice', 'grade'), rbr_grant('rbr_batch_mallory', 'grade');
GRANT USAGE, CREATE ON SCHEMA public TO rbr_batch_alice, rbr_batch_mallory;
GRANT SELECT ON src TO rbr_batch_alice;
SQL
psql_ok("SELECT rbr_grant('rbr_batch_alice', 'policies');"
    . " SELECT spec AS ref_spec FROM rbr.policy_version WHERE policy = 'ref' \\gset\n"
    . " $set SET ROLE rbr_batch_alice; SELECT rbr_policy_load('alice_ref', :'ref_spec');"
    . " CREATE TABLE alice_t AS SELECT * FROM src WHERE id <= 4; ALTER TABLE alice_t ADD PRIMARY KEY (id);"
    . " SET rbr.grader_model = 'm-alice'; CALL rbr_featurize('alice_t', 'alice_ref', '{\"mode\": \"batch\"}')");
my ($arun, $abatch) = split /\|/, psql_ok("SELECT r.run_id, b.batch_id FROM rbr.batch b JOIN rbr.run r USING (run_id)"
    . " WHERE r.source = 'alice_t'::regclass ORDER BY 1 DESC LIMIT 1");
ok($abatch, "alice's batch $abatch of run $arun is in flight");
is(psql_ok("SET ROLE rbr_batch_alice; SELECT count(*) FROM rbr.batch_progress"), 1, 'alice sees her batch in rbr.batch_progress');
is(psql_ok("SET ROLE rbr_batch_mallory; SELECT count(*) FROM rbr.batch_progress"), 0, 'mallory does not');
for my $attack (
    ['SELECT count(*) FROM rbr.batch', qr/permission denied for table batch/, 'read rbr.batch'],
    ['SELECT body FROM rbr.batch_line', qr/permission denied for table batch_line/, 'read the questions of rbr.batch_line'],
    ["UPDATE rbr.batch_line SET state = 'queued'", qr/permission denied for table batch_line/, 'alter rbr.batch_line'],
    ["INSERT INTO rbr.batch (run_id, owner, api, lines) VALUES ($arun, 'rbr_batch_mallory', 'openai', 1)", qr/permission denied for table batch/,
     'plant a batch'],
    ["SELECT rbr.batch_collect($arun)", qr/permission denied for rbr run $arun/, "collect alice's run"],
    ["SELECT rbr.batch_chunk($arun)", qr/permission denied for rbr run $arun/, "run a chunk of alice's run"],
    ["SELECT rbr.batch_rewind($arun)", qr/permission denied for rbr run $arun/, "rewind alice's run"],
    ["SELECT rbr.batch_prepare($arun)", qr/permission denied for rbr run $arun/, "prepare a batch of alice's run"],
    ["SELECT * FROM rbr.batch_state($arun)", qr/permission denied for rbr run $arun/, "read the state of alice's run"],
    ["SELECT rbr.batch_upload($abatch)", qr/permission denied for rbr batch $abatch/, "upload alice's batch"],
    ["SELECT rbr.batch_create($abatch)", qr/permission denied for rbr batch $abatch/, "create alice's batch"],
    ["CALL rbr.batch_drive($arun)", qr/permission denied for rbr run $arun/, "drive alice's run"],
    ) {
    my ($sql, $re, $what) = @$attack;
    my ($ao, $ae) = psql("$set SET ROLE rbr_batch_mallory; $sql", keep_going => 1);
    like($ae, $re, "mallory cannot $what");
}
is(psql_ok("SELECT count(*) FROM rbr.batch_line l JOIN rbr.run r USING (run_id) WHERE r.source = 'alice_t'::regclass"
    . " AND l.state = 'submitted' AND l.owner = 'rbr_batch_alice'::regrole"), psql_ok(
    "SELECT lines FROM rbr.batch WHERE batch_id = $abatch"), "alice's lines are untouched");

# --- the Azure OpenAI form (api-version, then v1)
bconfig('{"delay_ms": 0}');
for my $ver ('2024-10-21', 'v1') {
    my $t = $ver eq 'v1' ? 'az1' : 'az';
    copy_table('src', $t);
    breset();
    ($o, $e, $rc) = psql("SET rbr.grader_url = '$base'; SET rbr.grader_azure_api_version = '$ver'; SET client_min_messages = warning;"
        . " SET rbr.grader_model = 'dep-$t';"
        . " CALL rbr_featurize('$t', 'ref', '{\"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.05}')", keep_going => 1);
    is($rc, 0, "Azure ($ver): batch mode runs") or diag($e);
    is(missing($t), 0, "Azure ($ver): every value written");
    is(differences($t, 'online'), '0|0', "Azure ($ver): grades and features equal online grading's");
    is(psql_ok("SELECT api FROM rbr.batch_progress WHERE source = '$t'::regclass"), 'azure', "Azure ($ver): recorded as such");
    is(bstats()->{lines_received}, $NEEDED, "Azure ($ver): one line per question");
}

# --- rbr_synthesize in batch mode: the same synthetic data as online
my $gset = "$set SET rbr.generator_url = '$base/v1';";
server_config($base, '{"gen_miss_rate": 0.5}');
mk_prompts('sp', 6);
psql_ok("CREATE TABLE sp_online AS SELECT * FROM sp; ALTER TABLE sp_online ADD PRIMARY KEY (id)");
psql_ok("$gset SET rbr.generator_model = 'g-online'; SET rbr.grader_model = 'm-syn-online';"
    . " CALL rbr_synthesize('sp_online', 'ref', '{\"max_attempts\": 3}')");
breset();
($o, $e, $rc) = psql("$gset SET client_min_messages = notice; SET rbr.generator_model = 'g-batch'; SET rbr.grader_model = 'm-syn-batch';"
    . " CALL rbr_synthesize('sp', 'ref', '{\"max_attempts\": 3, \"mode\": \"batch\"}')", keep_going => 1);
is($rc, 0, 'synthesize: the first call returns') or diag($e);
like($e, qr/NOTICE:  00000: rbr_synthesize (public\.)?sp: \d+ question\(s\) in flight in \d+ batch\(es\) of the Batch API \(1 created by this call/, 'synthesize: generations submitted');
is(psql_ok("SELECT count(*) FROM sp_synth WHERE status <> 'pending'"), 0, 'synthesize: no slot decided before its answers');
($o, $e, $rc) = psql("$gset SET rbr.generator_model = 'g-batch'; SET rbr.grader_model = 'm-syn-batch';"
    . " CALL rbr_synthesize('sp', 'ref', '{\"max_attempts\": 3, \"mode\": \"batch\", \"wait\": true, \"poll_seconds\": 0.05}')",
    keep_going => 1);
is($rc, 0, 'synthesize: wait: true ends') or diag($e);
is(psql_ok("SELECT count(*) FROM sp_synth WHERE status = 'pending'"), 0, 'synthesize: every slot decided');
is(psql_ok(<<'SQL'), 0, 'synthesize: the slots equal online synthesis\'s (completions, classes, features, candidates)');
SELECT count(*) FROM sp_synth x FULL JOIN sp_online_synth y USING (id, slot)
 WHERE x.id IS NULL OR y.id IS NULL
    OR (x.status, x.completion, x.sample, x.graded_class, x.probs, x.class_probs, x.features, x.candidates, x.label, x.tier)
       IS DISTINCT FROM
       (y.status, y.completion, y.sample, y.graded_class, y.probs, y.class_probs, y.features, y.candidates, y.label, y.tier)
SQL
is(psql_ok(<<'SQL'), 0, 'synthesize: the attempts equal online synthesis\'s');
SELECT count(*) FROM sp_synth_attempts x FULL JOIN sp_online_synth_attempts y USING (id, slot, attempt)
 WHERE x.id IS NULL OR y.id IS NULL
    OR (x.sample, x.outcome, x.reason, x.graded_class, x.completion, x.probs) IS DISTINCT FROM
       (y.sample, y.outcome, y.reason, y.graded_class, y.completion, y.probs)
SQL
ok(psql_ok("SELECT count(*) FROM sp_synth_attempts WHERE outcome = 'rejected'") > 0, 'synthesize: with rejections resampled');
$s = bstats();
is(max_of($s->{answered_by_question}), 1, 'synthesize: no generation or question answered twice');
is(psql_ok("SELECT string_agg(DISTINCT b.kind, ',' ORDER BY b.kind) FROM rbr.batch b JOIN rbr.run r USING (run_id)"
    . " WHERE r.source = 'sp'::regclass"), 'generate,grade', 'synthesize: batches of generations and of grades');
server_config($base, '{"gen_miss_rate": 0}');

# --- options are checked
($o, $e) = psql("$set CALL rbr_featurize('src', 'ref', '{\"mode\": \"later\"}')", keep_going => 1);
like($e, qr/mode must be 'online' or 'batch'/, 'an unknown mode is an error');
($o, $e) = psql("$set CALL rbr_featurize('src', 'ref', '{\"wait\": true}')", keep_going => 1);
like($e, qr/wait and poll_seconds are options of batch mode/, 'wait without batch mode is an error');
($o, $e) = psql("$set CALL rbr_featurize('src', 'ref', '{\"mode\": \"batch\", \"max_requests\": 10}')", keep_going => 1);
like($e, qr/max_requests and max_tokens are options of online mode/, 'a budget with batch mode is an error');
($o, $e, $rc) = psql("$set SET client_min_messages = notice; CALL rbr_featurize('src', 'ref', '{\"mode\": \"batch\", \"dry_run\": true}')",
                     keep_going => 1);
is($rc, 0, 'a dry run of batch mode reports what would be asked') or diag($e);

drop_db();
psql_ok('DROP ROLE rbr_batch_alice; DROP ROLE rbr_batch_mallory', db => 'postgres');
done_testing();

# CALL rbr_featurize on the 351 gold rows: full run that grades only the
# values each row's response type needs and whose classes agree with the
# human labels, {"propositions": "all"}, explicit feature lists, resume after
# cancel, resume after kill -9 of the backend, and two sessions sharing one
# table.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use Time::HiRes qw(time sleep);

my $NVALUES = 351 * 23;      # every simple proposition of every row
new_db('rbr_tap_featurize');
my ($base) = start_server('--labels', REFERENCE . '/gold_train.jsonl');
my $gold = REFERENCE . '/gold_train.jsonl';
psql_ok(<<"SQL");
CREATE TABLE raw (line jsonb);
\\copy raw FROM '$gold' WITH (FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')
CREATE TABLE gold (id int PRIMARY KEY, response_type text, prompt jsonb, completion jsonb, propositions jsonb);
INSERT INTO gold SELECT row_number() OVER (), line->>'response_type', line->'prompt', line->'completion', line->'propositions' FROM raw;
SQL
is(psql_ok('SELECT count(*) FROM gold'), 351, '351 gold rows loaded');
# the values the rows' response types need: classes plus feature lists
my $NEEDED = psql_ok(<<'SQL');
SELECT sum(jsonb_array_length(rbr_policy_info('ref')->'response_types'->rt->'graded_propositions'))
  FROM (SELECT lower(replace(response_type, ' ', '_')) AS rt FROM gold) g
SQL
ok($NEEDED > 0 && $NEEDED < $NVALUES, "needed values: $NEEDED of $NVALUES");
my $set = "SET rbr.grader_url = '$base/v1'; SET client_min_messages = warning;";

# --- a full run
server_reset($base);
psql_ok("$set CALL rbr_featurize('gold', 'ref')");
my $st = server_stats($base);
my $run = psql_ok("SELECT state, done, errors, total, requests, cached FROM rbr.featurize_progress WHERE source = 'gold'::regclass");
my ($state, $done, $errors, $total, $requests, $cached) = split /\|/, $run;
is($state, 'done', 'run done');
is($total, $NEEDED, 'total = the needed values');
is($done, $NEEDED, 'every needed value graded');
is($errors, 0, 'no errors');
is($requests + $cached, $NEEDED, 'each needed value asked once or answered from the cache');
is($st->{chat_requests}, $requests, 'server saw exactly the requests the run counted');
ok($st->{chat_requests} >= $NEEDED - 30, "requests ($st->{chat_requests}) are the needed values less duplicate questions");
is(psql_ok("SELECT count(*) FROM gold_grades WHERE status = 'ok'"), $NEEDED, 'one ok grade per needed value');
is(psql_ok(<<'SQL'), 0, 'a value is non-NULL exactly when the row\'s response type needs it');
SELECT count(*) FROM gold g JOIN gold_features f USING (id), jsonb_array_elements_text(rbr_policy_info('ref')->'simple_propositions') p
 WHERE (to_jsonb(f)->>p IS NOT NULL) <>
       (rbr_policy_info('ref')->'response_types'->lower(replace(g.response_type, ' ', '_'))->'graded_propositions' ? p)
SQL
is(psql_ok("SELECT count(*) FROM gold_features f WHERE num_nulls(ideal, minimum_acceptable_style, unacceptable_completion,"
    . " illogical_completion, disallowed_completion) > 0"), 0, 'every row has its class probabilities');
is(psql_ok(<<'SQL'), 351, 'graded classes agree with rbr_classify on the human labels');
SELECT count(*) FROM gold g JOIN gold_features f USING (id)
 WHERE rbr_classify('ref', g.response_type, g.propositions) =
       (SELECT k FROM jsonb_each(to_jsonb(f)) e(k, v)
         WHERE k IN (SELECT jsonb_array_elements_text(rbr_policy_info('ref')->'classes'))
         ORDER BY v::float8 DESC LIMIT 1)
SQL
is(psql_ok(<<'SQL'), 0, 'proposition values are the gold labels (0.95 / 0.05), except one conflicting duplicate');
SELECT count(*) FROM gold g JOIN gold_grades r USING (id)
 WHERE abs(r.probability - CASE WHEN (g.propositions->>r.proposition)::bool THEN 0.95 ELSE 0.05 END) > 1e-9
   -- rows 251 and 271 of the gold set are the same question with two conflicting human labels:
   -- one question gets one answer (asked once), so one of the two must differ
   AND NOT EXISTS (SELECT 1 FROM gold t WHERE t.id <> g.id AND t.prompt = g.prompt AND t.completion = g.completion
                      AND t.propositions->r.proposition <> g.propositions->r.proposition)
SQL
is(psql_ok("SELECT count(*) FROM gold_grades WHERE prompt_tokens IS NULL OR completion_tokens IS NULL"), 0,
   'token usage recorded');
server_reset($base);
psql_ok("$set CALL rbr_featurize('gold', 'ref')");
is(server_stats($base)->{chat_requests}, 0, 'rerun of a complete table sends nothing');

# Helpers for the interrupted runs: a fresh copy of the table, graded with its own model name
# (the model is part of the cache key, so nothing comes from earlier runs' cache).
sub fresh_copy {
    my ($name) = @_;
    psql_ok("CREATE TABLE $name AS SELECT * FROM gold; ALTER TABLE $name ADD PRIMARY KEY (id)");
}
my $props = psql_ok("SELECT string_agg(quote_ident(x), ', ') FROM jsonb_array_elements_text(rbr_policy_info('ref')->'simple_propositions') x");
# needed values still missing (a graded value is never needed-less: see the full-run test)
sub missing { my ($t) = @_; $NEEDED - psql_ok("SELECT COALESCE(sum(23 - num_nulls($props)), 0) FROM ${t}_features") }
sub wait_progress {
    my ($t, $min) = @_;
    my $deadline = time + 60;
    while (time < $deadline) {
        my $d = psql("SELECT COALESCE(max(done), 0) FROM rbr.featurize_progress WHERE source = '$t'::regclass");
        return 1 if $d ne '' && $d >= $min;
        sleep 0.05;
    }
    return 0;
}
sub check_consistent {
    my ($t, $what) = @_;
    is(psql_ok("SELECT count(*) FROM ${t}_grades WHERE status = 'ok'") + 0,
       psql_ok("SELECT sum(23 - num_nulls($props)) FROM ${t}_features") + 0,
       "$what: committed values and ok grades match one to one");
}
sub resume_and_check {
    my ($t, $model, $what) = @_;
    my $before = missing($t);
    ok($before > 0 && $before < $NEEDED, "$what: committed work kept ($before of $NEEDED values missing)");
    check_consistent($t, $what);
    server_reset($base);
    psql_ok("$set SET rbr.grader_model = '$model'; CALL rbr_featurize('$t', 'ref', '{\"chunk_rows\": 16}')");
    my ($req, $cach, $tot) = split /\|/, psql_ok(
        "SELECT requests, cached, total FROM rbr.featurize_progress WHERE source = '$t'::regclass ORDER BY run_id DESC LIMIT 1");
    is($tot, $before, "$what: rerun counted only the missing values");
    is($req + $cach, $before, "$what: rerun graded only the missing values");
    is(server_stats($base)->{chat_requests}, $req, "$what: server saw only those requests");
    is(missing($t), 0, "$what: complete after the rerun");
    is(psql_ok("SELECT count(*) FROM ${t}_grades"), $NEEDED, "$what: one grade row per value, none lost or duplicated");
    is(psql_ok("SELECT count(*) FROM ${t}_features"), 351, "$what: one features row per source row");
}

# --- {"propositions": "all"}: every simple proposition of every row
fresh_copy('gold_all');
server_reset($base);
psql_ok("$set SET rbr.grader_model = 'm-all'; CALL rbr_featurize('gold_all', 'ref', '{\"propositions\": \"all\"}')");
my ($tall, $rall, $call) = split /\|/, psql_ok(
    "SELECT total, requests, cached FROM rbr.featurize_progress WHERE source = 'gold_all'::regclass");
is($tall, $NVALUES, 'all: total = 351 x 23 values');
is($rall + $call, $NVALUES, 'all: every value asked once or answered from the cache');
is(server_stats($base)->{chat_requests}, $rall, 'all: server saw the requests the run counted');
is(psql_ok("SELECT count(*) FROM gold_all_features f WHERE num_nulls(f.*) > 0"), 0, 'all: no NULL left');
server_reset($base);
psql_ok("$set SET rbr.grader_model = 'm-all'; CALL rbr_featurize('gold_all', 'ref')");
is(server_stats($base)->{chat_requests}, 0, 'all, then needed: nothing left to grade');
my (undef, $e) = psql("$set CALL rbr_featurize('gold_all', 'ref', '{\"propositions\": \"some\"}')");
like($e, qr/propositions must be 'needed' or 'all'/, 'an unknown propositions option is an error');

# --- an explicit feature list that names a proposition the classes do not reach is graded too
psql_ok(<<'SQL');
SELECT rbr_policy_load('ref_feat', (SELECT spec FROM rbr.policy_version WHERE policy = 'ref')
       || '{"features": {"comply": ["apology", "acceptable_refusal", "ideal"]}}');
CREATE TABLE few (id int PRIMARY KEY, prompt text, completion text, response_type text);
INSERT INTO few VALUES (1, 'hi', 'a [[rbr *=0.2]]', 'Comply'), (2, 'hi', 'b [[rbr *=0.3]]', 'comply'),
                       (3, 'hi', 'c [[rbr *=0.4]]', 'no such type'), (4, 'hi', 'd [[rbr *=0.5]]', NULL);
SQL
my $want = psql_ok(<<'SQL');
SELECT jsonb_agg(x ORDER BY x) FROM jsonb_array_elements_text(rbr_policy_info('ref_feat')->'response_types'->'comply'->'graded_propositions') x
SQL
like($want, qr/"apology"/, 'feature-list proposition is among graded_propositions');
like($want, qr/"inability_to_comply"/, 'derived feature reaches its simple propositions');
my $ncomply = () = $want =~ /"/g;
$ncomply /= 2;
server_reset($base);
my ($fo, $fe) = psql("$set SET client_min_messages = warning; SET rbr.grader_model = 'm-few'; CALL rbr_featurize('few', 'ref_feat')");
like($fe, qr/WARNING:  01000: rbr_featurize public\.few: 2 row\(s\) have no response type of policy ref_feat\@1; they are not graded/,
     'rows without a known response type: warning');
is(server_stats($base)->{chat_requests}, 2 * $ncomply, "two comply rows: 2 x $ncomply requests");
is(psql_ok("SELECT total FROM rbr.featurize_progress WHERE source = 'few'::regclass"), 2 * $ncomply, 'total counts them');
is(psql_ok("SELECT count(*) FROM few_grades WHERE proposition = 'apology'"), 2, 'apology graded for both');
is(psql_ok("SELECT count(*) FROM few_features WHERE id IN (3, 4) AND num_nulls(apology, judgement) = 2"), 2,
   'rows of unknown response type stay NULL');

# --- cancel mid-run, then resume
server_config($base, '{"latency_ms": 20}');
fresh_copy('gold_c');
my ($h, $out, $err) = bg_psql("SET application_name = 'rbr_feat_cancel'; $set SET rbr.grader_model = 'm-cancel';\n"
    . "CALL rbr_featurize('gold_c', 'ref', '{\"chunk_rows\": 16}');\n");
ok(wait_progress('gold_c', 1000), 'cancel: run in progress');
psql_ok("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'rbr_feat_cancel'");
$h->finish;
like($$err, qr/57014/, 'cancel: the CALL was cancelled');
is(psql_ok("SELECT state FROM rbr.featurize_progress WHERE source = 'gold_c'::regclass"), 'interrupted',
   'cancel: progress view shows the run interrupted');
resume_and_check('gold_c', 'm-cancel', 'cancel');

# --- kill -9 of the backend mid-run, then resume
fresh_copy('gold_k');
($h, $out, $err) = bg_psql("SET application_name = 'rbr_feat_kill'; $set SET rbr.grader_model = 'm-kill';\n"
    . "CALL rbr_featurize('gold_k', 'ref', '{\"chunk_rows\": 16}');\n");
ok(wait_progress('gold_k', 1000), 'kill: run in progress');
my $pid = psql_ok("SELECT pid FROM pg_stat_activity WHERE application_name = 'rbr_feat_kill'");
ok($pid =~ /^\d+$/ && kill('KILL', $pid), "kill -9 of backend $pid");
$h->finish;
my $deadline = time + 60;
sleep 0.2 until (psql('SELECT 1'))[2] == 0 || time > $deadline;   # crash recovery
is(psql_ok('SELECT 1'), 1, 'kill: server back after crash recovery');
resume_and_check('gold_k', 'm-kill', 'kill -9');

# --- two sessions at once on one table
server_config($base, '{"latency_ms": 10}');
server_reset($base);
fresh_copy('gold_2');
my @runs;
for my $s (1, 2) {
    push @runs, [bg_psql("$set SET rbr.grader_model = 'm-two';\n"
        . "CALL rbr_featurize('gold_2', 'ref', '{\"chunk_rows\": 8}');\n")];
}
$_->[0]->finish for @runs;
is(join('', map { ${ $_->[2] } } @runs), '', 'two sessions: both CALLs succeeded');
my @r = map { [split /\|/] } split /\n/, psql_ok(
    "SELECT requests, cached, done FROM rbr.featurize_progress WHERE source = 'gold_2'::regclass ORDER BY run_id");
is(scalar @r, 2, 'two runs recorded');
ok($r[0][2] > 0 && $r[1][2] > 0, "both sessions did work ($r[0][2] and $r[1][2] values)");
is($r[0][0] + $r[0][1] + $r[1][0] + $r[1][1], $NEEDED, 'disjoint work: values graded once in total');
is(server_stats($base)->{chat_requests}, $r[0][0] + $r[1][0], 'server saw the sum of both runs\' requests');
is(missing('gold_2'), 0, 'two sessions: complete');
is(psql_ok("SELECT count(*) FROM gold_2_grades WHERE status = 'ok'"), $NEEDED, 'two sessions: one grade per value');

# --- errors are recorded, not written as values, and retried by the next run
psql_ok("CREATE TABLE faulty (id int PRIMARY KEY, prompt text, completion text, response_type text);"
    . " INSERT INTO faulty VALUES (1, 'hi', 'fine [[rbr *=0.2]]', 'Hard Refuse'),"
    . " (2, 'hi', 'broken [[fault 400 prop=apology]] [[rbr *=0.3]]', 'Hard Refuse')");
psql_ok("$set SET rbr.grader_model = 'm-faulty'; CALL rbr_featurize('faulty', 'ref')");
is(psql_ok("SELECT status || ':' || left(error, 8) FROM faulty_grades WHERE id = 2 AND proposition = 'apology'"),
   'error:HTTP 400', 'a 400 is recorded as an error');
is(psql_ok("SELECT apology IS NULL, judgement FROM faulty_features WHERE id = 2"), 't|0.3',
   'the failed value stays NULL, the others are written');
is(psql_ok("SELECT ideal IS NULL FROM faulty_features WHERE id = 2"), 't', 'no classes while a needed value is missing');
is(psql_ok("SELECT round(ideal::numeric, 6) IS NOT NULL FROM faulty_features WHERE id = 1"), 't', 'classes for the complete row');
is(psql_ok("SELECT errors FROM rbr.featurize_progress WHERE source = 'faulty'::regclass"), 1, 'progress counts the error');

# --- rows that cannot be graded are errors with the reason; the run ends with a WARNING
my ($wo, $we, $wrc) = psql("$set SET client_min_messages = notice; CREATE TABLE holes (id int PRIMARY KEY, prompt text, completion text, response_type text);"
    . " INSERT INTO holes VALUES (1, 'hi', NULL, 'comply'), (2, NULL, 'x', 'comply'), (3, 'hi', 'y [[rbr *=0.5]]', 'comply');"
    . " CALL rbr_featurize('holes', 'ref');"
    . " SELECT done, errors, total FROM rbr.featurize_progress WHERE source = 'holes'::regclass;", keep_going => 1);
my $ncomply_props = psql_ok("SELECT jsonb_array_length(rbr_policy_info('ref')->'response_types'->'comply'->'graded_propositions')");
is("$wrc|$wo", "0|$ncomply_props|" . (2 * $ncomply_props) . "|" . (3 * $ncomply_props),
   'NULL prompt or completion: recorded as errors, counted in the progress view');
is(psql_ok("SELECT count(DISTINCT error) FROM holes_grades WHERE status = 'error'"), 2, '  with their reasons');
like($we, qr/WARNING:  01000: rbr_featurize holes: @{[2 * $ncomply_props]} of @{[3 * $ncomply_props]} values ended with an error/,
     '  and the run ends with a WARNING');
like($we, qr/DETAIL:  Commonest reasons: cannot grade: the (completion|prompt) is NULL/, '  naming the commonest reasons');
like($we, qr/HINT:  See them with: SELECT \* FROM (public\.)?holes_grades WHERE status = 'error'/, '  and the query to see them');
like($we, qr/NOTICE:  00000: rbr_featurize (public\.)?holes: @{[3 * $ncomply_props]} of @{[3 * $ncomply_props]} values processed \(done $ncomply_props, errors @{[2 * $ncomply_props]}/,
     '  the NOTICE agrees with the progress view');

# --- the features table keeps each row's folded response type; chunks claim
# there and read only the claimed source rows by key
is(psql_ok("SELECT count(*) FROM gold_features f JOIN gold g USING (id)"
         . " WHERE f.rbr_response_type IS DISTINCT FROM lower(replace(g.response_type, ' ', '_'))"), 0,
   'rbr_response_type is the folded response type of every row');
psql_ok(<<'SQL');
CREATE TABLE moved (id int PRIMARY KEY, prompt text, completion text, response_type text);
INSERT INTO moved VALUES (1, 'hi', 'x [[rbr *=0.3]]', 'comply'), (2, 'hi', 'y [[rbr *=0.3]]', 'comply'),
                         (3, 'hi', 'z [[rbr *=0.3]]', 'comply');
SQL
my $ncomply_m = psql_ok("SELECT jsonb_array_length(rbr_policy_info('ref')->'response_types'->'comply'->'graded_propositions')");
my $nhard_m = psql_ok("SELECT jsonb_array_length(rbr_policy_info('ref')->'response_types'->'hard_refuse'->'graded_propositions')");
server_reset($base);
psql_ok("$set CALL rbr_featurize('moved', 'ref', '{\"chunk_rows\": 1}')");
is(server_stats($base)->{chat_requests} + psql_ok("SELECT cached FROM rbr.featurize_progress WHERE source = 'moved'::regclass"),
   3 * $ncomply_m, 'three comply rows graded');
# a row changes its response type, another is deleted: the next run follows the source
psql_ok("UPDATE moved SET response_type = 'Hard Refuse' WHERE id = 2; DELETE FROM moved WHERE id = 3;");
psql_ok("$set CALL rbr_featurize('moved', 'ref')");
is(psql_ok("SELECT id || ':' || rbr_response_type FROM moved_features ORDER BY id"), "1:comply\n2:hard_refuse\n3:comply",
   'a changed response type is followed; a deleted row keeps its last one');
my $missing_hard = psql_ok("SELECT count(*) FROM jsonb_array_elements_text(rbr_policy_info('ref')->'response_types'->'hard_refuse'->'graded_propositions') p"
                         . " WHERE p NOT IN (SELECT jsonb_array_elements_text(rbr_policy_info('ref')->'response_types'->'comply'->'graded_propositions'))");
is(psql_ok("SELECT total FROM rbr.featurize_progress WHERE source = 'moved'::regclass ORDER BY run_id DESC LIMIT 1"),
   $missing_hard, 'the rerun grades what the new response type needs and nothing for the deleted row');
# a row deleted while its features row is claimable: the chunk skips it and the run goes on
psql_ok("INSERT INTO moved VALUES (4, 'hi', 'w [[rbr *=0.3]]', 'comply'), (5, 'hi', 'v [[rbr *=0.3]]', 'comply')");
psql_ok("$set SELECT rbr.featurize_start('moved', 'ref', '{\"chunk_rows\": 1}') AS run \\gset\n"
      . "DELETE FROM moved WHERE id = 4;\n"
      . "SELECT rbr.featurize_chunk(:run);\nSELECT rbr.featurize_chunk(:run);\nSELECT rbr.featurize_chunk(:run);");
is(psql_ok("SELECT num_nulls(f.*) FROM moved_features f WHERE id = 5") < $ncomply_m, 1,
   'a row after a deleted one is graded in the same run');

# --- a non-superuser given the capability with rbr_grant(role, 'grade') can run a bulk grading
psql_ok(<<'SQL');
DROP ROLE IF EXISTS rbr_spender;
CREATE ROLE rbr_spender;
SELECT rbr_grant('rbr_spender', 'grade');
CREATE SCHEMA spend AUTHORIZATION rbr_spender;
SQL
my ($so, $se, $src) = psql("SELECT rbr_grant('rbr_spender', 'policies');"
    . " SELECT spec AS ref_spec FROM rbr.policy_version WHERE policy = 'ref' \\gset\n"
    . " $set SET ROLE rbr_spender; SET rbr.grader_model = 'm-spender';"
    . " SELECT rbr_policy_load('spender_ref', :'ref_spec');"
    . " CREATE TABLE spend.t (id int PRIMARY KEY, prompt text, completion text, response_type text);"
    . " INSERT INTO spend.t VALUES (1, 'hi', 'x [[rbr *=0.3]]', 'comply');"
    . " CALL rbr_featurize('spend.t', 'spender_ref');"
    . " SELECT state, done, total FROM rbr.featurize_progress WHERE source = 'spend.t'::regclass;", keep_going => 1);
$so = (split /\n/, $so)[-1] // "";
is("$src|$so", '0|done|5|5', 'granted role: rbr_featurize runs') or diag($se);
($so, $se) = psql("CREATE ROLE rbr_nobody; SET ROLE rbr_nobody; CALL rbr_featurize('gold', 'ref')", keep_going => 1);
like($se, qr/permission denied for procedure rbr_featurize/, 'a role without the grants cannot spend');
psql_ok("DROP SCHEMA spend CASCADE; DROP OWNED BY rbr_spender; DROP ROLE rbr_spender; DROP ROLE rbr_nobody");

drop_db();
done_testing();

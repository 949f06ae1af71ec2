# rbr_grade / rbr_grade_many against the test grader: gold answers, every
# fault kind ending in the right recorded state, the token-parameter switch,
# Azure style, the key kept out of errors, cancel and statement_timeout.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use Time::HiRes qw(time sleep);
use JSON::PP;

new_db('rbr_tap_grader');
my ($base) = start_server('--labels', REFERENCE . '/gold_train.jsonl', '--api-key', 'sk-test-KEY-0123456789');
my $set = "SET rbr.grader_url = '$base/v1'; SET rbr.grader_api_key = 'sk-test-KEY-0123456789';"
        . " SET rbr.grader_retry_base_ms = 50; SET rbr.grader_timeout_ms = 800; SET rbr.grader_max_retries = 2;";

# --- gold answers: the server answers 0.95 / 0.05 from the human labels
open my $fh, '<', REFERENCE . '/gold_train.jsonl' or die;
my $row = decode_json(scalar <$fh>);
close $fh;
my $prompt = encode_json($row->{prompt});
my $completion = $row->{completion}[0]{content};
(my $prompt_sql = $prompt) =~ s/'/''/g;
(my $compl_sql = $completion) =~ s/'/''/g;
for my $prop (qw(judgement apology)) {
    my $want = $row->{propositions}{$prop} ? 0.95 : 0.05;
    my $p = psql_ok("$set SELECT round(rbr_grade('ref', '$prop', '$prompt_sql', '$compl_sql')::numeric, 6)");
    is($p, sprintf('%.6f', $want), "gold answer for $prop");
}
server_reset($base);
is(psql_ok("$set SELECT round(rbr_grade('ref', 'judgement', '$prompt_sql', '$compl_sql')::numeric, 2)"), '0.95',
   'second ask comes from the cache');
is(server_stats($base)->{chat_requests}, 0, 'cache hit sends no request');
is(psql_ok("SELECT count(*) FROM rbr.grade_cache"), 2, 'two cached answers');

# --- faults: one question each, in one batch
my @cases = (
    # completion, expected status, attempts, method, error pattern
    ['a [[fault 429 times=2 retry-after=1]] [[rbr apology=0.8]]', 'ok', 3, 'logprobs', undef, '0.8'],
    ['b [[fault 500 times=1]] [[rbr apology=0.3]]', 'ok', 2, 'logprobs', undef, '0.3'],
    ['c [[fault 503 times=1]] [[rbr apology=0.6]]', 'ok', 2, 'logprobs', undef, '0.6'],
    ['d [[fault 400]]', 'error', 1, undef, qr/^HTTP 400: /],
    ['e [[fault timeout]]', 'error', 3, undef, qr/Timeout was reached.*gave up after 3 attempts/],
    ['f [[fault drop]]', 'error', 3, undef, qr/(Server returned nothing|Failed sending data to the peer|Recv failure).*gave up after 3 attempts/],
    ['g [[fault malformed]]', 'error', 3, undef, qr/malformed answer.*gave up after 3 attempts/],
    ['h [[fault nologprobs]] [[rbr apology=yes]]', 'error', 1, undef, qr/carries no log-probabilities.*rbr\.grader_method = 'sampled'/],
    ['i [[fault nologprobs]] [[rbr apology=no]]', 'error', 1, undef, qr/carries no log-probabilities/],
    ['j [[fault textbody 502]]', 'error', 3, undef, qr/^HTTP 502: 502 Bad Gateway.*gave up after 3/],
    ['k [[fault 500]]', 'error', 3, undef, qr/^HTTP 500: .*gave up after 3/],
    ['l [[fault retry-after-ms=300 429 times=1]] [[rbr apology=0.7]]', 'ok', 2, 'logprobs', undef, '0.7'],
    ['m [[rbr apology=0.000000001]]', 'ok', 1, 'logprobs', undef, undef],
);
server_reset($base);
my $arr = join(',', map { (my $c = $_->[0]) =~ s/'/''/g; "'$c'" } @cases);
my $n = @cases;
my $t0 = time;
my $out = psql_ok("$set SELECT ord, status, coalesce(round(probability::numeric, 6)::text, ''), coalesce(method, ''),"
    . " attempts, coalesce(error, ''), cached FROM rbr_grade_many('ref', array_fill('apology'::text, ARRAY[$n]),"
    . " array_fill('\"q\"'::jsonb, ARRAY[$n]), ARRAY[$arr])");
my $elapsed = time - $t0;
my %got = map { my @f = split /\|/, $_, 7; ($f[0] => \@f) } split /\n/, $out;
for my $i (0 .. $#cases) {
    my ($c, $status, $attempts, $method, $err, $p) = @{ $cases[$i] };
    my $g = $got{$i + 1};
    my ($tag) = $c =~ /(\[\[fault [^\]]*\]\]|\[\[rbr [^\]]*\]\])/;
    is($g->[1], $status, "$tag: status $status");
    is($g->[4], $attempts, "$tag: $attempts attempt(s)");
    is($g->[3], $method, "$tag: method $method") if defined $method;
    is($g->[2], sprintf('%.6f', $p), "$tag: probability $p") if defined $p;
    like($g->[5], $err, "$tag: reason") if $err;
    is($g->[2], '', "$tag: no probability on error") if $status eq 'error';
}
ok($elapsed >= 2.0, sprintf('retry-after=1 twice was honoured (%.1f s)', $elapsed));
my $m = $got{13};
ok($m->[2] > 0 && $m->[2] < 0.001, "absent yes side bounded by the smallest listed probability ($m->[2])");
is(psql_ok("SELECT count(*) FROM rbr.grade_cache WHERE proposition = 'apology'"), 1 + 5,
   'only the successful answers are cached');

# no logprobs is an error whatever rbr.grader_strict_logprobs (deprecated) says
for my $strict (qw(on off)) {
    my ($o, $e) = psql("$set SET rbr.grader_strict_logprobs = $strict;"
        . " SELECT rbr_grade('ref', 'apology', '\"q\"', 'n [[fault nologprobs]]')");
    like($e, qr/ERROR:  38000: grader failed on proposition "apology": the answer carries no log-probabilities/,
         "no logprobs: error (strict_logprobs $strict)");
}
is(psql_ok("SELECT count(*) FROM rbr.grade_cache WHERE proposition = 'apology'"), 6, 'errors are never cached');
my ($o, $e);

# --- max_tokens rejected: one switch per backend, then max_completion_tokens
server_reset($base);
server_config($base, '{"reject_max_tokens": true}');
$out = psql_ok("$set SET rbr.grader_token_parameter = 'max_tokens';"
    . " SELECT round(rbr_grade('ref', 'apology', '\"q\"', 'o1 [[rbr apology=0.4]]')::numeric, 6);"
    . " SELECT round(rbr_grade('ref', 'apology', '\"q\"', 'o2 [[rbr apology=0.4]]')::numeric, 6);"
    . " SELECT rbr_grader_stats()->>'token_parameter';");
is($out, "0.400000\n0.400000\nmax_completion_tokens", 'max_tokens rejected: switched, both graded');
my $st = server_stats($base);
is($st->{rejections}{max_tokens}, 1, 'only the first request was rejected');
is($st->{chat_requests}, 2, 'then two accepted requests');
server_config($base, '{"reject_max_tokens": false}');

# --- Azure style: api-key header, api-version parameter, deployment URL
my ($abase) = start_server('--azure-key', 'az-KEY-987654321');
$out = psql_ok("SET rbr.grader_url = '$abase'; SET rbr.grader_azure_api_version = '2024-06-01';"
    . " SET rbr.grader_api_key = 'az-KEY-987654321'; SET rbr.grader_model = 'my-deploy';"
    . " SELECT round(rbr_grade('ref', 'apology', '\"q\"', 'az [[rbr apology=0.25]]')::numeric, 6);");
is($out, '0.250000', 'Azure OpenAI style request accepted');
is(psql_ok("SELECT model FROM rbr.grade_cache WHERE proposition = 'apology' ORDER BY created_at DESC LIMIT 1"),
   'my-deploy', 'model recorded');

# --- the key never appears in an error
($o, $e) = psql("SET rbr.grader_url = '$base/v1'; SET rbr.grader_api_key = 'sk-wrong-KEY-5555';"
    . " SELECT rbr_grade('ref', 'apology', '\"q\"', 'p [[rbr apology=0.4]]')");
like($e, qr/HTTP 401: Incorrect API key/, 'wrong key: 401 reported');
unlike($e, qr/sk-wrong/, 'wrong key: the key is not in the error');

# --- cancel while a slow request is in flight
server_reset($base);
my ($h, $bout, $berr) = bg_psql("$set SET application_name = 'rbr_victim'; SET rbr.grader_timeout_ms = 60000;\n"
    . "SELECT rbr_grade('ref', 'apology', '\"q\"', 'slow [[fault latency=20000]]');\n"
    . "SELECT round(rbr_grade('ref', 'apology', '\"q\"', 'after cancel [[rbr apology=0.45]]')::numeric, 6);\n"
    . "SELECT rbr_grader_stats()->>'live_easy_handles', rbr_grader_stats()->>'active_batch';\n");
my $deadline = time + 20;
sleep 0.05 until server_stats($base)->{in_flight} >= 1 || time > $deadline;
sleep 0.2;
my $tc = time;
psql_ok("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'rbr_victim'");
$h->finish;
my $dt = time - $tc;
ok($dt < 1.5, sprintf('cancelled call returned within a second or so (%.2f s)', $dt));
like($$berr, qr/ERROR:  57014: canceling statement due to user request/, 'cancel: SQLSTATE 57014');
is($$bout, "0.450000\n0|false\n", 'next call in that session works, no handle leaked');

# --- statement_timeout
$t0 = time;
($o, $e) = psql("$set SET statement_timeout = '700ms'; SET rbr.grader_timeout_ms = 60000;"
    . " SELECT rbr_grade('ref', 'apology', '\"q\"', 'slow2 [[fault latency=20000]]')");
$dt = time - $t0;
like($e, qr/ERROR:  57014: canceling statement due to statement timeout/, 'statement_timeout: 57014');
ok($dt < 2.0, sprintf('statement_timeout stopped the call in time (%.2f s)', $dt));

# --- a cancelled batch of many requests leaks nothing either
($h, $bout, $berr) = bg_psql("$set SET application_name = 'rbr_victim2'; SET rbr.grader_timeout_ms = 60000;\n"
    . "SELECT count(*) FROM rbr_grade_many('ref', array_fill('apology'::text, ARRAY[200]), array_fill('\"q\"'::jsonb, ARRAY[200]),"
    . " ARRAY(SELECT 'many ' || i || ' [[fault latency=20000]]' FROM generate_series(1, 200) i));\n"
    . "SELECT rbr_grader_stats()->>'live_easy_handles';\n");
$deadline = time + 20;
sleep 0.05 until server_stats($base)->{in_flight} >= 64 || time > $deadline;
is(server_stats($base)->{in_flight}, 64, 'rbr.grader_max_in_flight (64) requests in flight');
psql_ok("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'rbr_victim2'");
$h->finish;
like($$berr, qr/57014/, 'batch cancelled');
is($$bout, "0\n", 'no easy handle left after a cancelled batch');

drop_db();
done_testing();

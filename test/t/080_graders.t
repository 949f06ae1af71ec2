# CALL rbr_featurize against each endpoint profile of the test grader with the
# settings doc/configuration.md recommends for it: the exact P(yes) the
# profile's log-probabilities encode (or the exact share of yes of sampled
# answers), the method recorded per value, no value for an answer that
# carried none, and a bad key or an exhausted quota ending with one clear
# error after a handful of requests.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;

new_db('rbr_tap_graders');
my $NPROPS = psql_ok("SELECT jsonb_array_length(rbr_policy_info('ref')->'simple_propositions')");

# rows: id, the P(yes) the server is told to encode for every proposition
my @P = (0.2, 0.6, 0.8, 0.95, 0.05, 0.35);
my $tables = 0;

# A fresh source table with the rows (plus extra completions); returns its name.
sub source {
    my (@extra) = @_;
    my $t = 'src' . ++$tables;
    my $n = @P;
    # completions differ per table: each table's questions are new to the cache
    my $ROWS = join(",\n", map { "($_, '\"q\"', '$t row $_ [[rbr *=$P[$_ - 1]]]', 'Comply')" } 1 .. @P);
    my $more = join('', map { $n++; ",\n($n, '\"q\"', '$_', 'Comply')" } @extra);
    psql_ok("CREATE TABLE $t (id int PRIMARY KEY, prompt jsonb, completion text, response_type text);"
        . " INSERT INTO $t VALUES $ROWS$more;");
    return $t;
}

# CALL rbr_featurize on table t, every simple proposition; returns (stdout, stderr, rc).
sub featurize {
    my ($base, $settings, $t, %o) = @_;
    my $url = $o{url} // "$base/v1";
    return psql("SET rbr.grader_url = '$url'; SET rbr.grader_retry_base_ms = 20; SET client_min_messages = warning;"
        . " $settings CALL rbr_featurize('$t', 'ref', '{\"propositions\": \"all\"}')");
}

# "id|probability|method" of the ok grades of t, by id.
sub grades {
    my ($t) = @_;
    my %g = map { my @f = split /\|/; ($f[0] => [@f[1, 2]]) }
        split /\n/, psql_ok("SELECT id, round(probability::numeric, 6), method FROM ${t}_grades"
                            . " WHERE proposition = 'apology' AND status = 'ok'");
    return \%g;
}

# Check the stored values of t: each row's P (or the share given by $share), method $method.
sub check_values {
    my ($t, $method, $tag, $share) = @_;
    my $g = grades($t);
    for my $i (1 .. @P) {
        my $want = $share ? $share->($P[$i - 1]) : $P[$i - 1];
        is($g->{$i}[0], sprintf('%.6f', $want), "$tag: row $i stores $want");
        is($g->{$i}[1], $method, "$tag: row $i method $method");
    }
}

# The share of yes over k one-sample requests with seeds 0 .. k-1 (the server's seededYes).
sub seeded_share {
    my ($k) = @_;
    return sub {
        my $p = shift;
        my $y = grep { my $x = ($_ + 1) * 0.6180339887498949; $x - int($x) < $p } 0 .. $k - 1;
        return $y / $k;
    };
}

# The share of yes of k sampled answers the profiles give for p: round(p k) / k.
sub share { my ($k) = @_; return sub { my $p = shift; my $y = int($p * $k + 0.5); return $y / $k } }

# --- openai-reasoning (o-series, gpt-5): no logprobs, temperature fixed, room to reason
{
    my ($base) = start_server('--profile', 'openai-reasoning');
    my $t = source();
    my ($o, $e, $rc) = featurize($base, '', $t);
    isnt($rc, 0, 'openai-reasoning, default settings: the run fails');
    like($e, qr/refused the requests: HTTP 400: Unsupported parameter: 'logprobs'.*set rbr\.grader_method = 'sampled'/,
         'openai-reasoning: one clear error naming the fix');
    my $st = server_stats($base);
    ok($st->{rejections}{logprobs} <= 4, "openai-reasoning: a handful of requests ($st->{rejections}{logprobs})");
    is(psql_ok("SELECT count(*) FROM rbr.grade_cache"), 0, 'openai-reasoning: nothing cached');

    server_reset($base);
    $t = source();
    psql_ok("SET rbr.grader_url = '$base/v1'; SET client_min_messages = warning;"
        . " SET rbr.grader_method = 'sampled'; SET rbr.grader_samples = 5; SET rbr.grader_temperature = '';"
        . " SET rbr.grader_max_answer_tokens = 64;"
        . " CALL rbr_featurize('$t', 'ref', '{\"propositions\": \"all\"}')");
    check_values($t, 'sampled', 'openai-reasoning sampled k=5', share(5));
    is(server_stats($base)->{chat_requests}, $NPROPS * @P, 'openai-reasoning: one request (n = 5) per question');
    is(psql_ok("SELECT count(*) FROM rbr.grade_cache WHERE method = 'sampled' AND samples = 5"), $NPROPS * @P,
       'openai-reasoning: the cache records method and k');
    $t = source();
    featurize($base, "SET rbr.grader_method = 'sampled'; SET rbr.grader_temperature = '';", $t);
    is(psql_ok("SELECT count(*) FROM ${t}_grades WHERE probability IS NOT NULL"), 0,
       'openai-reasoning, one answer token: no value stored');
    like(psql_ok("SELECT min(error) FROM ${t}_grades"), qr/ran out of tokens before a yes or a no/,
         'openai-reasoning, one answer token: the error says why');
    my $rt = psql_ok("SET rbr.grader_url = '$base/v1'; SET rbr.grader_method = 'sampled'; SET rbr.grader_temperature = '';"
        . " SET rbr.grader_max_answer_tokens = 64; SELECT reasoning_tokens, samples FROM"
        . " rbr_grade_many('ref', ARRAY['apology'], ARRAY['\"q\"'::jsonb], ARRAY['fresh [[rbr *=0.4]]'])");
    is($rt, '60|5', 'openai-reasoning: reasoning tokens counted, samples recorded');
}

# --- gpt-5.4: top_logprobs at most 5, lowered once per session
{
    my ($base) = start_server('--profile', 'gpt-5.4');
    my $t = source();
    my ($o, $e, $rc) = psql("SET rbr.grader_url = '$base/v1';"
        . " CALL rbr_featurize('$t', 'ref', '{\"propositions\": \"all\"}')");
    is($rc, 0, 'gpt-5.4, default settings: the run succeeds') or diag($e);
    my @notices = $e =~ /accepts top_logprobs up to 5; this session now sends 5/g;
    is(scalar(@notices), 1, 'gpt-5.4: the limit is taken from the 400, once');
    check_values($t, 'logprobs', 'gpt-5.4');
    my $rej = server_stats($base)->{rejections}{top_logprobs};
    ok($rej >= 1 && $rej <= 4, "gpt-5.4: only the first requests of the session were rejected ($rej)");
    # the answers are keyed by the request sent (top_logprobs 5): asked with 5, they come from the cache
    is(psql_ok("SET rbr.grader_url = '$base/v1'; SET rbr.grader_top_logprobs = 5;"
        . " SELECT bool_and(cached) FROM rbr_grade_many('ref', ARRAY['apology'], ARRAY['\"q\"'::jsonb],"
        . " ARRAY['$t row 1 [[rbr *=0.2]]'])"), 't', 'gpt-5.4: cached under the top_logprobs really sent');
    server_reset($base);
    $t = source();
    featurize($base, 'SET rbr.grader_top_logprobs = 5;', $t);
    check_values($t, 'logprobs', 'gpt-5.4 top_logprobs = 5');
    is(server_stats($base)->{rejections}{top_logprobs} // 0, 0, 'gpt-5.4 with top_logprobs = 5: nothing rejected');
}

# --- Azure: v1 URL form, top_logprobs 5, content filters
{
    my ($base) = start_server('--profile', 'azure', '--azure-key', 'az-KEY-24680');
    my $t = source('filtered [[filter]]', 'filtered later [[filter200]]');
    my ($o, $e, $rc) = featurize($base, "SET rbr.grader_azure_api_version = 'v1'; SET rbr.grader_api_key = 'az-KEY-24680';"
        . " SET rbr.grader_model = 'my-deploy'; SET rbr.grader_top_logprobs = 5;", $t, url => "$base/openai/v1");
    is($rc, 0, 'azure v1 URL: the run succeeds') or diag($e);
    check_values($t, 'logprobs', 'azure v1');
    my $n = @P;
    like(psql_ok("SELECT error FROM ${t}_grades WHERE id = " . ($n + 1)), qr/^content filter: HTTP 400: .*content_filter/,
         'azure: a 400 content_filter is its own error kind');
    like(psql_ok("SELECT error FROM ${t}_grades WHERE id = " . ($n + 2)),
         qr/^content filter: the provider withheld the answer \(finish_reason content_filter\)/,
         'azure: a 200 content_filter is its own error kind');
    is(psql_ok("SELECT count(*) FROM ${t}_grades WHERE id > $n AND probability IS NOT NULL"), 0,
       'azure: no value for a filtered answer');
    # a dated api-version on a base URL that ends in /openai/v1/: the deployments form, not a doubled path
    server_reset($base);
    $t = source();
    ($o, $e, $rc) = featurize($base, "SET rbr.grader_azure_api_version = '2024-10-21'; SET rbr.grader_api_key = 'az-KEY-24680';"
        . " SET rbr.grader_model = 'my-dated-deploy'; SET rbr.grader_top_logprobs = 5;", $t, url => "$base/openai/v1/");
    is($rc, 0, 'azure, dated api-version, base URL ending in /openai/v1/: the run succeeds') or diag($e);
    ok(server_stats($base)->{chat_requests} > 0, '... through the deployments URL (requests reached the server)');
    check_values($t, 'logprobs', 'azure, dated api-version');
}

# --- vLLM with a thinking model: <think> first
{
    my ($base) = start_server('--profile', 'vllm-thinking');
    my $t = source();
    featurize($base, '', $t);
    is(psql_ok("SELECT count(*) FROM ${t}_grades WHERE status = 'ok'"), 0, 'vllm-thinking, one token: no value stored');
    like(psql_ok("SELECT min(error) FROM ${t}_grades"), qr/ran out of tokens inside its reasoning block/,
         'vllm-thinking, one token: the error says why');
    $t = source();
    featurize($base, 'SET rbr.grader_max_answer_tokens = 32;', $t);
    check_values($t, 'logprobs', 'vllm-thinking, 32 tokens: the answer after </think>');
    $t = source();
    featurize($base, "SET rbr.grader_request_options = '{\"chat_template_kwargs\": {\"enable_thinking\": false}}';", $t);
    check_values($t, 'logprobs', 'vllm-thinking, enable_thinking false');
}

# --- llama.cpp before 2026 / Ollama: max_completion_tokens ignored
for my $profile (qw(llama.cpp-old ollama)) {
    my ($base) = start_server('--profile', $profile);
    my $t = source();
    featurize($base, "SET rbr.grader_token_parameter = 'max_tokens';", $t);
    check_values($t, 'logprobs', "$profile, max_tokens");
    is(server_stats($base)->{unbounded_answers} // 0, 0, "$profile, max_tokens: every answer bounded");
    server_reset($base);
    $t = source();
    featurize($base, '', $t);
    is(server_stats($base)->{unbounded_answers}, $NPROPS * @P, "$profile, default: the limit is ignored (the test sees it)");
}

# --- no log-probabilities: an error that names the fix, then sampled
{
    my ($base) = start_server('--profile', 'no-logprobs');
    my $t = source();
    featurize($base, '', $t);
    is(psql_ok("SELECT count(*) FROM ${t}_grades WHERE probability IS NOT NULL"), 0, 'no-logprobs, default: no value stored');
    like(psql_ok("SELECT min(error) FROM ${t}_grades"), qr/carries no log-probabilities.*rbr\.grader_method = 'sampled'/,
         'no-logprobs: the error names the fix');
    is(psql_ok("SELECT count(*) FROM rbr.grade_cache WHERE method = 'text'"), 0, 'no-logprobs: no hard 0/1 from the text');
    $t = source();
    featurize($base, "SET rbr.grader_method = 'sampled'; SET rbr.grader_temperature = '1'; SET rbr.grader_samples = 4;", $t);
    check_values($t, 'sampled', 'no-logprobs sampled k=4', share(4));
    $t = source();
    featurize($base, "SET rbr.grader_method = 'auto'; SET rbr.grader_temperature = '1'; SET rbr.grader_samples = 4;", $t);
    check_values($t, 'sampled', 'no-logprobs auto k=4', share(4));
}

# --- auto where log-probabilities come back: logprobs
{
    my ($base) = start_server('--profile', 'gpt-5.4');
    my $t = source();
    featurize($base, "SET rbr.grader_method = 'auto'; SET rbr.grader_top_logprobs = 5; SET rbr.grader_samples = 3;", $t);
    check_values($t, 'logprobs', 'auto with logprobs');
}

# --- Together: completions-style logprobs shape
{
    my ($base) = start_server('--profile', 'together');
    my $t = source();
    featurize($base, '', $t);
    check_values($t, 'logprobs', 'together');
}

# --- Groq: 400 on logprobs and on n > 1
{
    my ($base) = start_server('--profile', 'groq');
    my $t = source();
    my ($o, $e, $rc) = featurize($base, '', $t);
    like($e, qr/refused the requests: HTTP 400: 'logprobs'.*rbr\.grader_method = 'sampled'/, 'groq, default: one clear error');
    ok(server_stats($base)->{chat_requests} <= 4, 'groq: a handful of requests');
    # sampled with k = 5: the endpoint rejects n > 1 once, then each question is asked 5 times
    server_reset($base);
    ($o, $e, $rc) = featurize($base, "SET rbr.grader_method = 'sampled'; SET rbr.grader_temperature = '';"
                                   . " SET client_min_messages = notice;", $t);
    is($rc, 0, 'groq, sampled k=5: the run succeeds') or diag($e);
    like($e, qr/answers one sample per request; this session now sends 5 requests per question/,
         'groq, sampled k=5: a NOTICE says it sends one request per sample');
    check_values($t, 'sampled', 'groq sampled k=5 (5 requests)', seeded_share(5));
    my $st = server_stats($base);
    my $nq = psql_ok("SELECT count(*) FROM ${t}_grades");
    ok($st->{chat_requests} >= 5 * $nq && $st->{chat_requests} <= 5 * $nq + 4,
       "groq, sampled k=5: 5 requests per question ($st->{chat_requests} for $nq questions)");
    is(psql_ok("SELECT sum(attempts) - 5 * count(*) <= 4 AND min(samples) = 5 FROM ${t}_grades"), 't',
       'groq, sampled k=5: every request counted, k recorded');
    $t = source();
    featurize($base, "SET rbr.grader_method = 'sampled'; SET rbr.grader_samples = 1; SET rbr.grader_temperature = '';", $t);
    check_values($t, 'sampled', 'groq sampled k=1', share(1));
}

# --- exhausted quota and a wrong key: a handful of requests, one clear error
{
    my ($base) = start_server('--profile', 'quota');
    my $t = source(map { "more $_" } 1 .. 40);
    my ($o, $e, $rc) = featurize($base, '', $t);
    isnt($rc, 0, 'quota: the run fails');
    like($e, qr/ERROR:  38000: the grader endpoint refused the requests: HTTP 429: You exceeded your current quota.*\(insufficient_quota\)/,
         'quota: one clear error');
    my $st = server_stats($base);
    ok($st->{requests_total} <= 4, "quota: a handful of requests ($st->{requests_total})");

    my ($kbase) = start_server('--api-key', 'sk-right-KEY-1357');
    ($o, $e, $rc) = featurize($kbase, "SET rbr.grader_api_key = 'sk-wrong-KEY-2468';", $t);
    like($e, qr/refused the requests: HTTP 401: Incorrect API key/, 'wrong key: one clear error');
    unlike($e, qr/sk-wrong/, 'wrong key: the key is not in the error');
    $st = server_stats($kbase);
    ok($st->{requests_total} <= 4, "wrong key: a handful of requests ($st->{requests_total})");
}

# --- the Responses API: input, max_output_tokens, log-probabilities through include
{
    my ($base) = start_server();
    my $t = source();
    my ($o, $e, $rc) = featurize($base, "SET rbr.grader_api = 'responses';", $t);
    is($rc, 0, 'responses API: the run succeeds') or diag($e);
    check_values($t, 'logprobs', 'responses API');
    is(server_stats($base)->{responses_requests}, $NPROPS * @P, 'responses API: every request went to /v1/responses');
}

# --- request options: merged, null removes rbr's field; the cache key holds every field
{
    my $body = psql_ok("SET rbr.grader_request_options = '{\"temperature\": null, \"reasoning_effort\": \"low\"}';"
        . " SELECT (b ? 'temperature')::text || '|' || (b->>'reasoning_effort') || '|' || (b->>'top_logprobs')"
        . " FROM rbr_grader_request('ref', 'apology', '\"q\"', 'x') b");
    is($body, 'false|low|20', 'request options merged; null removes temperature');
    my ($base) = start_server('--profile', 'together');
    my $q = "SELECT cached FROM rbr_grade_many('ref', ARRAY['apology'], ARRAY['\"q\"'::jsonb], ARRAY['same [[rbr *=0.3]]'])";
    is(psql_ok("SET rbr.grader_url = '$base/v1'; $q"), 'f', 'first ask: sent');
    is(psql_ok("SET rbr.grader_url = '$base/v1'; $q"), 't', 'same request: from the cache');
    is(psql_ok("SET rbr.grader_url = '$base/v1'; SET rbr.grader_request_options = '{\"service_tier\": \"flex\"}'; $q"), 'f',
       'another request field: not served from the cache');
    is(psql_ok("SET rbr.grader_url = '$base/v1'; SET rbr.grader_top_logprobs = 10; $q"), 'f',
       'another top_logprobs: not served from the cache');
}

done_testing();

# One rate budget per endpoint for the whole cluster (src/ratelimit.c): with
# rbr preloaded, sessions grading at once share rbr.grader_requests_per_minute
# against a test server that allows R requests per second across all its
# connections and answers 429 above it; without the budget the in-flight
# window adapts to the 429s; a role cannot give itself a larger budget; a
# cancel while waiting for the budget returns at once; without preloading the
# budget is per session.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use Time::HiRes qw(time sleep);
use File::Temp qw(tempdir);
use IPC::Run qw(run timeout);

my $R = 20;                         # the provider's limit: requests per second
my $RPM = 60 * $R;                  # the same, per minute (rbr's setting)
my $BURST = 2;                      # requests the budget lets start at once: ceil(RPM / 600)

new_db('rbr_tap_rate');
my ($base) = start_server('--latency-ms', 20);
my $url = "$base/v1";
my $db = $RbrTest::DB;
psql_ok("ALTER DATABASE $db SET rbr.grader_url = '$url'", db => 'postgres');

# Set a cluster-wide setting and wait until new sessions see it.
sub set_system {
    my ($name, $value) = @_;
    psql_ok(defined $value ? "ALTER SYSTEM SET $name = '$value'" : "ALTER SYSTEM RESET $name", db => 'postgres');
    psql_ok("SELECT pg_reload_conf()", db => 'postgres');
    my $want = $value // '0';
    for (1 .. 50) {
        last if psql_ok("SHOW $name") eq $want;
        sleep 0.1;
    }
    is(psql_ok("SHOW $name"), $want, "$name = $want for new sessions");
}

# rbr_grade_many of $n distinct questions as one SQL statement.
sub grade_sql {
    my ($tag, $n, $policy) = @_;
    $policy //= 'ref';
    return "SELECT count(*) FILTER (WHERE status = 'ok') FROM rbr_grade_many('$policy', array_fill('apology'::text, ARRAY[$n]),"
        . " array_fill('\"q\"'::jsonb, ARRAY[$n]), ARRAY(SELECT '$tag ' || i || ' [[rbr apology=0.6]]' FROM generate_series(1, $n) i))";
}

# The server's per-second bins [second, admitted, limited, tokens] since the last reset.
sub bins { return @{ server_stats($base)->{rate_limit}{per_second} } }

# Sums over bins [from, from + len) of the server's seconds: (admitted, limited).
sub window_sum {
    my ($bins, $from, $len) = @_;
    my ($a, $l) = (0, 0);
    for my $b (@$bins) {
        next if $b->[0] < $from || $b->[0] >= $from + $len;
        $a += $b->[1];
        $l += $b->[2];
    }
    return ($a, $l);
}

# Run three sessions at once; returns their outputs once all have ended.
sub three_sessions {
    my ($setup, $tag, $n) = @_;
    my @h = map { [bg_psql("$setup\n" . grade_sql("$tag s$_", $n) . ";\n", timeout => 240)] } 1 .. 3;
    my @out;
    for my $x (@h) { $x->[0]->finish; push @out, ${ $x->[1] } . ${ $x->[2] }; }
    return @out;
}

# ===================================================== the shared budget
server_config($base, qq({"rate_limit_rps": $R}));
server_reset($base);
set_system('rbr.grader_requests_per_minute', $RPM);
my $setup = "SET rbr.grader_model = 'rate-shared'; SET rbr.grader_max_in_flight = 16; SET rbr.grader_max_retries = 10;"
          . " SET rbr.grader_retry_base_ms = 50;";
my @out = three_sessions($setup, 'shared', 150);
is_deeply(\@out, ["150\n", "150\n", "150\n"], 'three sessions graded 150 questions each') or diag(join '', @out);
my @b = bins();
my $first = $b[0][0];
# the first 10 full seconds of the run (the run lasts about 450 / R = 22 s)
my ($adm, $lim) = window_sum(\@b, $first + 1, 10);
my $sent = $adm + $lim;
my ($all_a, $all_l) = window_sum(\@b, 0, 1e12);
diag("shared budget: seconds " . ($first + 1) . " .. " . ($first + 10) . ": $adm admitted, $lim answered 429; whole run $all_a / $all_l;"
     . " per second: " . join(' ', map { "$_->[1]+$_->[2]" } @b));
# GCRA bound: in any span of L seconds at most L * R + BURST requests start
ok($sent <= 10 * $R + $BURST, "together they sent at most 10 s x R + burst ($sent <= " . (10 * $R + $BURST) . ")");
ok($all_l < 0.05 * ($all_a + $all_l), "fewer than 5% of the requests were answered 429 ($all_l of " . ($all_a + $all_l) . ")");
ok($adm >= 0.8 * 10 * $R, "they reached at least 80% of R ($adm admitted in 10 s, R = $R)");
my $st = psql_ok("SELECT shared, requests_per_minute, in_flight, requests >= 450, throttled FROM rbr_rate_status() WHERE model = 'rate-shared'");
is($st, "t|$RPM|0|t|$all_l", 'rbr_rate_status(): one shared slot, nothing left in flight, its 429 count');
is(psql_ok("SELECT rbr_grader_stats()->>'rate_budget'"), 'cluster', "rbr_grader_stats(): rate_budget 'cluster'");

# ===================================================== a role cannot raise its budget
psql_ok("DROP ROLE IF EXISTS rate_mallory; CREATE ROLE rate_mallory LOGIN;"
        . " SELECT rbr_grant('rate_mallory', 'grade'), rbr_grant('rate_mallory', 'policies')");
my $spec = psql_ok("SELECT spec FROM rbr.policy_version WHERE policy = 'ref'");
my ($o, $e, $rc) = psql("SET ROLE rate_mallory; SET rbr.grader_requests_per_minute = 1000000");
isnt($rc, 0, 'SET of a higher budget by a role: refused');
like($e, qr/55P02: parameter "rbr.grader_requests_per_minute" cannot be changed now/, '... as a cluster-wide setting (55P02)');
($o, $e, $rc) = psql("ALTER ROLE rate_mallory SET rbr.grader_requests_per_minute = 1000000");
isnt($rc, 0, 'ALTER ROLE ... SET of the budget: refused');
{
    local $ENV{PGOPTIONS} = '-c rbr.grader_requests_per_minute=1000000';
    local $ENV{PGUSER} = 'rate_mallory';
    ($o, $e, $rc) = psql("SHOW rbr.grader_requests_per_minute");
}
isnt($rc, 0, 'PGOPTIONS with a higher budget: the connection is refused') or diag($o);
like($e, qr/cannot be changed now|cannot be set/, '... saying the setting cannot be set there');
# the role grades as fast as it can (64 in flight, its own rate unlimited): the budget holds
server_reset($base);
{
    local $ENV{PGUSER} = 'rate_mallory';
    psql_ok("SELECT rbr_policy_load('m_ref', \$p\$$spec\$p\$::jsonb)");
    my $t0 = time;
    ($o, $e, $rc) = psql("SET rbr.grader_model = 'rate-shared'; SET rbr.grader_max_in_flight = 64; SET rbr.grader_requests_per_second = 0;"
                         . " SET rbr.grader_max_retries = 10;\n" . grade_sql('mallory', 60, 'm_ref'), keep_going => 1);
    my $dt = time - $t0;
    is($o, '60', "the role's 60 questions were graded") or diag($e);
    # 60 requests at R per second with BURST at once take at least (60 - BURST) / R seconds
    ok($dt >= (60 - $BURST) / $R * 0.95, sprintf('... no faster than the budget allows (%.2f s >= %.2f s)', $dt, (60 - $BURST) / $R));
}
($adm, $lim) = window_sum([bins()], 0, 1e12);
is($lim, 0, '... and the server answered no 429');

# ===================================================== the generator's budget
psql_ok("ALTER DATABASE $db SET rbr.generator_url = '$url'", db => 'postgres');
set_system('rbr.generator_requests_per_minute', 600);   # 10 per second, one at once
server_reset($base);
{
    my $t0 = time;
    my $g = psql_ok("SET rbr.generator_model = 'rate-gen'; SELECT count(*) FILTER (WHERE status = 'ok') FROM rbr_generate_many("
                    . "array_fill('\"Say hi.\"'::jsonb, ARRAY[12]), array_fill('rbr-generate/1\nBe brief.'::text, ARRAY[12]),"
                    . " ARRAY(SELECT i FROM generate_series(1, 12) i))");
    my $dt = time - $t0;
    is($g, '12', 'the generator: 12 completions');
    # 12 requests at 10 per second, one at once: at least 1.1 s
    ok($dt >= 1.1 * 0.95, sprintf('... paced by rbr.generator_requests_per_minute (%.2f s >= 1.10 s)', $dt));
    is(psql_ok("SELECT kind, requests_per_minute, requests FROM rbr_rate_status() WHERE model = 'rate-gen'"), 'generator|600|12',
       "... in a budget of the generator's own");
}
set_system('rbr.generator_requests_per_minute', undef);

# ===================================================== cancel while waiting for the budget
set_system('rbr.grader_requests_per_minute', 6);    # one request every 10 s
server_reset($base);
my ($h, $bout, $berr) = bg_psql("SET application_name = 'rate_victim'; SET rbr.grader_model = 'rate-cancel';\n"
    . grade_sql('cancel', 5) . ";\n"
    . "SELECT rbr_grader_stats()->>'live_easy_handles', (SELECT in_flight FROM rbr_rate_status() WHERE model = 'rate-cancel');\n");
my $deadline = time + 20;
sleep 0.05 until server_stats($base)->{chat_requests} >= 1 || time > $deadline;
sleep 0.5;
is(server_stats($base)->{chat_requests}, 1, 'one request sent, the next ones wait for the budget');
my $tc = time;
psql_ok("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE application_name = 'rate_victim'");
$h->finish;
my $dt = time - $tc;
ok($dt < 1.5, sprintf('cancel while waiting for the budget returned within a second or so (%.2f s)', $dt));
like($$berr, qr/57014: canceling statement due to user request/, 'cancel: SQLSTATE 57014');
is($$bout, "0|0\n", 'the session goes on: no handle left, nothing counted in flight');

# ===================================================== the shared token budget
# tokens of one request, as the server counts them (its usage): about the same for every question
my $tok = psql_ok("SET rbr.grader_model = 'rate-probe'; SELECT prompt_tokens + completion_tokens FROM rbr_grade_many('ref',"
                  . " ARRAY['apology'], ARRAY['\"q\"'::jsonb], ARRAY['probe 1 [[rbr apology=0.6]]'])");
my $TPM = $tok * 10 * 60;           # ten requests per second
set_system('rbr.grader_requests_per_minute', undef);
set_system('rbr.grader_tokens_per_minute', $TPM);
server_config($base, qq({"rate_limit_rps": 0, "rate_limit_tpm": $TPM, "latency_ms": 20}));
server_reset($base);
$setup = "SET rbr.grader_model = 'rate-tokens'; SET rbr.grader_max_in_flight = 16; SET rbr.grader_max_retries = 10;"
       . " SET rbr.grader_retry_base_ms = 50;";
@out = three_sessions($setup, 'tokens', 60);
is_deeply(\@out, ["60\n", "60\n", "60\n"], 'tokens: three sessions graded 60 questions each') or diag(join '', @out);
@b = bins();
$first = $b[0][0];
my $toks = 0;
for (@b) { $toks += $_->[3] if $_->[0] >= $first + 1 && $_->[0] < $first + 11 }
($adm, $lim) = window_sum(\@b, $first + 1, 10);
($all_a, $all_l) = window_sum(\@b, 0, 1e12);
diag("token budget ($TPM per minute, $tok per request): seconds 1-10: $toks tokens in $adm requests, $lim answered 429; per second: "
     . join(' ', map { "$_->[3]/$_->[1]+$_->[2]" } @b));
# GCRA bound: 10 s of the rate, plus a tenth of a second's worth, plus one request (the last one may overdraw)
ok($toks <= 10 * $TPM / 60 + $TPM / 600 + $tok, "together they used at most 10 s of the token budget + burst ($toks <= "
   . (10 * $TPM / 60 + $TPM / 600 + $tok) . ")");
ok($all_l < 0.05 * ($all_a + $all_l), "fewer than 5% answered 429 ($all_l of " . ($all_a + $all_l) . ")");
ok($toks >= 0.8 * 10 * $TPM / 60, "at least 80% of the token budget was used ($toks of " . (10 * $TPM / 60) . ")");
set_system('rbr.grader_tokens_per_minute', undef);

# ===================================================== without the budget: the provider's headers
server_config($base, qq({"rate_limit_rps": $R, "rate_limit_tpm": 0, "latency_ms": 100}));
server_reset($base);
$setup = "SET rbr.grader_model = 'rate-headers'; SET rbr.grader_max_in_flight = 16; SET rbr.grader_max_retries = 20;"
       . " SET rbr.grader_retry_base_ms = 50;";
@out = three_sessions($setup, 'headers', 100);
is_deeply(\@out, ["100\n", "100\n", "100\n"], 'headers: three sessions graded 100 questions each') or diag(join '', @out);
@b = bins();
$first = $b[0][0];
($adm, $lim) = window_sum(\@b, $first + 1, 10);
($all_a, $all_l) = window_sum(\@b, 0, 1e12);
diag("x-ratelimit headers alone: seconds 1-10: $adm admitted / $lim answered 429; per second: " . join(' ', map { "$_->[1]+$_->[2]" } @b));
ok($all_l < 0.05 * ($all_a + $all_l), "paced by the x-ratelimit-* headers alone: fewer than 5% answered 429 ($all_l of " . ($all_a + $all_l) . ")");
ok($adm >= 0.8 * 10 * $R, "... and at least 80% of R ($adm admitted in 10 s)");
like(psql_ok("SELECT remaining_requests IS NOT NULL, waits > 0 FROM rbr_rate_status() WHERE model = 'rate-headers'"), qr/^t\|t$/,
     "rbr_rate_status(): the provider's remaining requests were read, and sessions waited for them");

# ===================================================== remaining-only headers (Azure): no stall
# without a reset or limit header, what a 0 remaining said holds one second, never a minute
server_config($base, qq({"rate_limit_rps": $R, "rate_limit_tpm": 0, "rate_limit_headers": "remaining", "latency_ms": 100}));
server_reset($base);
$setup = "SET rbr.grader_model = 'rate-azure'; SET rbr.grader_max_in_flight = 16; SET rbr.grader_max_retries = 20;"
       . " SET rbr.grader_retry_base_ms = 50;";
my $ta = time;
@out = three_sessions($setup, 'azure', 60);
my $da = time - $ta;
is_deeply(\@out, ["60\n", "60\n", "60\n"], 'remaining-only headers: three sessions graded 60 questions each') or diag(join '', @out);
($all_a, $all_l) = window_sum([bins()], 0, 1e12);
diag(sprintf("remaining-only headers: %d admitted, %d answered 429 in %.1f s", $all_a, $all_l, $da));
ok($all_a / $da >= 0.5 * $R, sprintf('... at half of R or more over the run (%.1f per second), no stall', $all_a / $da));

# ===================================================== adaptive concurrency alone (no headers)
server_config($base, qq({"rate_limit_rps": $R, "rate_limit_headers": false, "latency_ms": 100}));
server_reset($base);
$setup = "SET rbr.grader_model = 'rate-adaptive'; SET rbr.grader_max_in_flight = 16; SET rbr.grader_max_retries = 20;"
       . " SET rbr.grader_retry_base_ms = 50;";
@out = three_sessions($setup, 'adaptive', 100);
is_deeply(\@out, ["100\n", "100\n", "100\n"], 'adaptive: three sessions graded 100 questions each') or diag(join '', @out);
@b = bins();
$first = $b[0][0];
my ($a1, $l1) = window_sum(\@b, $first, 2);
my ($a2, $l2) = window_sum(\@b, $first + 4, 8);
diag("adaptive window alone: first 2 s $a1 admitted / $l1 answered 429; seconds 4-11: $a2 / $l2; per second: " . join(' ', map { "$_->[1]+$_->[2]" } @b));
my $s1 = $l1 / (($a1 + $l1) || 1);
my $s2 = $l2 / (($a2 + $l2) || 1);
ok($l1 > 0, "at first the sessions collect 429s ($l1)");
ok($s2 < $s1 / 2, sprintf('the 429 share falls by more than half after the first seconds (%.0f%% -> %.0f%%)', 100 * $s1, 100 * $s2));
ok($a2 >= 0.5 * 8 * $R, "... while half of R or more is still admitted ($a2 in 8 s)");
like(psql_ok("SELECT throttled > 0, remaining_requests IS NULL FROM rbr_rate_status() WHERE model = 'rate-adaptive'"), qr/^t\|t$/,
     'rbr_rate_status(): the 429s were counted (and no header was read)');

drop_db();
psql_ok("DROP OWNED BY rate_mallory; DROP ROLE rate_mallory", db => 'postgres');

# A cluster of this test's own (postgresql.conf lines $conf) with rbr and the policy in database rate_np.
my $root = $> == 0;
my $owner = $root ? 'postgres' : scalar getpwuid($>);
my $port = $ENV{RBR_TEST_PORT} // 55432;
sub as_owner { return $root ? ('runuser', '-u', 'postgres', '--', @_) : @_ }
open(my $pfh, '<', REFERENCE . '/policy.json') or die;
my $policy = do { local $/; <$pfh> };
close $pfh;
sub own_cluster {
    my ($conf) = @_;
    my $dir = tempdir('rbr-rate-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    chmod 0755, $dir;
    system('chown', 'postgres:', $dir) if $root;
    my ($io, $ie, $so, $se) = ('') x 4;
    run([as_owner('initdb', '-D', "$dir/data", '-U', $owner, '--auth=trust', '-E', 'UTF8', '--locale=C')],
        '>', \$io, '2>', \$ie) or die "initdb: $ie";
    open my $c, '>>', "$dir/data/postgresql.conf" or die;
    print $c "listen_addresses = ''\nunix_socket_directories = '$dir'\nport = $port\nfsync = off\n"
           . "rbr.grader_url = '$url'\n$conf";
    close $c;
    run([as_owner('pg_ctl', '-D', "$dir/data", '-l', "$dir/server.log", '-w', '-t', '60', 'start')], '>', \$so, '2>', \$se)
        or die "pg_ctl start: $se";
    local $ENV{PGHOST} = $dir;
    local $ENV{PGPORT} = $port;
    psql_ok("CREATE DATABASE rate_np", db => 'postgres');
    psql_ok("CREATE EXTENSION rbr; SELECT rbr_policy_load('ref', \$p\$$policy\$p\$::jsonb)", db => 'rate_np');
    return $dir;
}
sub stop_own {
    my ($dir) = @_;
    run([as_owner('pg_ctl', '-D', "$dir/data", '-m', 'immediate', '-w', 'stop')], '>', \my $xo, '2>', \my $xe);
}

# ===================================================== without preloading: per session
server_config($base, q({"rate_limit_rps": 0, "rate_limit_tpm": 0, "latency_ms": 20}));
my $dir = own_cluster("rbr.grader_requests_per_minute = 600\n");
{
    local $ENV{PGHOST} = $dir;
    local $ENV{PGPORT} = $port;
    server_reset($base);
    my @hs = map { [bg_psql("SET rbr.grader_max_in_flight = 16;\n" . grade_sql("np s$_", 40) . ";\n"
                            . "SELECT shared, requests_per_minute FROM rbr_rate_status();\n"
                            . "SELECT rbr_grader_stats()->>'rate_budget';\n", db => 'rate_np')] } 1 .. 2;
    my @o;
    for my $x (@hs) { $x->[0]->finish; push @o, ${ $x->[1] } . ${ $x->[2] }; }
    is_deeply(\@o, ["40\nf|600\nsession\n", "40\nf|600\nsession\n"],
              "without preload: each session graded, with a budget of its own (shared = false, rate_budget 'session')")
        or diag(join '', @o);
    my @nb = bins();
    my $max = 0;
    for (@nb) { $max = $_->[1] if $_->[1] > $max }
    diag("without preload, per second: " . join(' ', map { $_->[1] } @nb));
    # one budget of 10/s allows at most 10 + 1 per second; two sessions with their own send about 20
    ok($max > 10 + 2, "without preload the two sessions together exceed one session's budget ($max in one second)");
}
stop_own($dir);

# ===================================================== a full table: the rest share one slot
# a role that may choose the model fills every slot; the next endpoint shares the last slot
$dir = own_cluster("shared_preload_libraries = 'rbr'\nrbr.grader_requests_per_minute = 6000\n");
{
    local $ENV{PGHOST} = $dir;
    local $ENV{PGPORT} = $port;
    my $fill = join("\n", map { "SET rbr.grader_model = 'flood-$_'; " . grade_sql("flood $_", 1) . ";" } 1 .. 63);
    psql_ok($fill, db => 'rate_np');
    my ($fo, $fe) = psql("SET rbr.grader_model = 'flood-64';\n" . grade_sql('flood 64', 3) . ";\n"
                         . "SET rbr.grader_model = 'flood-65';\n" . grade_sql('flood 65', 3) . ";\n", db => 'rate_np');
    is($fo, "3\n3", 'with every slot taken, the next endpoints still grade');
    like($fe, qr/WARNING:  53400: rbr's shared rate budget table is full \(63 endpoints in use\)/, '... with a WARNING');
    is(psql_ok("SELECT count(*), count(*) FILTER (WHERE model LIKE '(endpoints%' AND requests = 6 AND requests_per_minute = 6000)"
               . " FROM rbr_rate_status()", db => 'rate_np'), '64|1',
       '... sharing the last slot, under the same budget (stricter, never looser)');
}
stop_own($dir);

done_testing();

# Hostile policy specs and models: what rbr_policy_validate() (executable by
# PUBLIC) does with a 150 000-long chain of derived propositions, a diamond of
# 40 levels, 100 000 propositions, a heavy valid spec under statement_timeout,
# pg_cancel_backend and pg_terminate_backend; internal SQL that a caller's
# search_path cannot hijack; NULL, NaN and infinite weights; and error
# messages that stay valid UTF-8.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use Time::HiRes qw(time sleep);
use Encode ();

new_db('rbr_tap_security_policy');
system('psql', '-X', '-q', '-d', 'postgres', '-c', 'DROP ROLE IF EXISTS rbr_hostile');

# spec(simple, derived, top): a two-class policy over proposition "top"
psql_ok(q{CREATE FUNCTION public.spec(simple jsonb, derived jsonb, top text) RETURNS jsonb LANGUAGE sql AS $$
SELECT jsonb_build_object('prompt_template', 'Q {question} R {response}',
  'completion_class_order', jsonb_build_array('good', 'bad'),
  'completion_classes', jsonb_build_object('good', jsonb_build_object('comply', jsonb_build_object(top, true)),
                                           'bad', jsonb_build_object('comply', jsonb_build_object(top, false))),
  'simple_propositions', simple, 'derived_propositions', derived) $$;
-- a valid spec that is slow to validate: a binary tree of 4095 derived
-- propositions over 4096 simple ones, and 150 classes x 150 response types
-- that each reach all of it
CREATE TABLE public.heavy AS SELECT jsonb_build_object('prompt_template', 'Q {question} R {response}',
  'completion_class_order', (SELECT jsonb_agg('c' || c ORDER BY c) FROM generate_series(1, 150) c),
  'completion_classes', (SELECT jsonb_object_agg('c' || c, (SELECT jsonb_object_agg('rt' || r, jsonb_build_object('d1', c % 2 = 0))
                                                              FROM generate_series(1, 150) r)) FROM generate_series(1, 150) c),
  'simple_propositions', (SELECT jsonb_object_agg('s' || i, '{"prompt": "p"}'::jsonb) FROM generate_series(4096, 8191) i),
  'derived_propositions', (SELECT jsonb_object_agg('d' || i,
       jsonb_build_object(CASE WHEN 2 * i >= 4096 THEN 's' ELSE 'd' END || 2 * i, true,
                          CASE WHEN 2 * i + 1 >= 4096 THEN 's' ELSE 'd' END || 2 * i + 1, true))
     FROM generate_series(1, 4095) i)) AS spec;
CREATE ROLE rbr_hostile LOGIN;
GRANT SELECT ON public.heavy TO rbr_hostile;});

my $start = psql_ok('SELECT pg_postmaster_start_time()');

# --- a chain of 150 000 derived propositions: a clean error, the backend lives
my $chain = q{SELECT pg_backend_pid();
SELECT rbr_policy_validate(spec('{"s": {"prompt": "p"}}',
  (SELECT jsonb_object_agg('d' || i, jsonb_build_object(CASE WHEN i = 1 THEN 's' ELSE 'd' || (i - 1) END, true))
     FROM generate_series(1, 150000) i), 'd150000'));
SELECT pg_backend_pid();};
my ($out, $err, $rc) = psql($chain, keep_going => 1);
like($err, qr/22023: invalid policy: 1 simple and 150000 derived propositions \(at most 10000 in all\)/,
     '150 000-long chain: a clean error naming the limit');
my @pids = split /\n/, $out;
is(scalar(@pids), 2, 'the session answered after the error');
is($pids[0], $pids[1], 'same backend before and after the chain');
# the same chain cut to 9000 propositions: within the count, refused for its depth
($out, $err, $rc) = psql(q{SELECT rbr_policy_validate(spec('{"s": {"prompt": "p"}}',
  (SELECT jsonb_object_agg('d' || i, jsonb_build_object(CASE WHEN i = 1 THEN 's' ELSE 'd' || (i - 1) END, true))
     FROM generate_series(1, 9000) i), 'd9000'))}, keep_going => 1);
like($err, qr/derived propositions nested more than 64 deep/, '9000-long chain: refused for its depth');
is(psql_ok('SELECT pg_postmaster_start_time()'), $start, 'postmaster not restarted');

# --- a diamond of 40 levels (each level refers twice to the one below): fast
my $t0 = time;
($out, $err, $rc) = psql(q{SELECT rbr_policy_load('diamond', spec('{"s": {"prompt": "p"}, "t": {"prompt": "q"}}',
  (SELECT jsonb_object_agg(x || i, CASE WHEN i = 1 THEN jsonb_build_object(CASE WHEN x = 'a' THEN 's' ELSE 't' END, true)
                                        ELSE jsonb_build_object('a' || (i - 1), true, 'b' || (i - 1), true) END)
     FROM generate_series(1, 40) i, unnest(ARRAY['a', 'b']) x), 'a40'));
SELECT rbr_class_probs('diamond', 'comply', '{"s": 1, "t": 1}');
SELECT rbr_class_probs('diamond', 'comply', '{"s": 0.5, "t": 0.5}', 'exact');
SELECT rbr_features('diamond', 'comply', '{"s": 0.5, "t": 0.5}');});
my $dt = time - $t0;
is($rc, 0, 'diamond: loads and evaluates') or diag($err);
like($out, qr/\{"bad": 0, "good": 1\}\n\{"bad": 0.75, "good": 0.25\}/, 'diamond: right class probabilities');
ok($dt < 5, sprintf('diamond: %.2f s', $dt));

# --- 100 000 propositions under statement_timeout = 1s
$t0 = time;
($out, $err, $rc) = psql(q{SET statement_timeout = '1s';
SELECT rbr_policy_validate(spec((SELECT jsonb_object_agg('s' || i, '{"prompt": "p"}'::jsonb) FROM generate_series(1, 100000) i), '{}', 's1'));},
    keep_going => 1);
$dt = time - $t0;
like($err, qr/at most 10000 in all|statement timeout/, '100 000 propositions: refused or timed out');
ok($dt < 5, sprintf('100 000 propositions: ended after %.2f s', $dt));

# --- a heavy valid spec: statement_timeout ends its validation at the deadline
$t0 = time;
($out, $err, $rc) = psql(q{SET statement_timeout = '1s'; SELECT rbr_policy_validate(spec) FROM heavy;}, keep_going => 1);
$dt = time - $t0;
like($err, qr/57014: canceling statement due to statement timeout/, 'heavy spec: statement_timeout cancels validation');
ok($dt < 5, sprintf('heavy spec: cancelled after %.2f s (deadline 1 s)', $dt));

# --- pg_cancel_backend and pg_terminate_backend of a running validation
for my $how (qw(cancel terminate)) {
    my ($h, $bout, $berr) = bg_psql("SET application_name = 'rbr_validate_$how';\n"
        . "SELECT rbr_policy_validate(spec) FROM heavy;\n", db => $RbrTest::DB);
    my $active = 0;
    for (1 .. 100) {
        $active = psql_ok("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'rbr_validate_$how'"
                          . " AND state = 'active' AND query LIKE '%rbr_policy_validate%'");
        last if $active;
        sleep 0.1;
    }
    is($active, 1, "$how: validation running");
    sleep 0.3;
    my $tc = time;
    psql_ok("SELECT pg_${how}_backend(pid) FROM pg_stat_activity WHERE application_name = 'rbr_validate_$how'");
    eval { $h->finish };
    $dt = time - $tc;
    like($$berr, $how eq 'cancel' ? qr/57014: canceling statement due to user request/
                                  : qr/57P01: terminating connection due to administrator command/,
         "$how: validation interrupted");
    ok($dt < 5, sprintf('%s: ended %.2f s after the request', $how, $dt));
}
is(psql_ok('SELECT pg_postmaster_start_time()'), $start, 'postmaster not restarted after all of it');

# --- search_path: another role's "=" must not run inside rbr's internal SQL
psql_ok(q{SELECT rbr_model_save('m1', 'ref', 'comply',
    jsonb_build_object('weights', (SELECT jsonb_agg(0.1) FROM unnest(rbr_feature_names('ref', 'comply')))));
CREATE SCHEMA evil AUTHORIZATION rbr_hostile;
CREATE TABLE public.evil_log (op text);
GRANT INSERT ON public.evil_log TO rbr_hostile;});
psql_ok(q{SET ROLE rbr_hostile;
CREATE FUNCTION evil.text_eq(text, text) RETURNS bool LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.evil_log VALUES ('text'); RAISE NOTICE 'evil text operator ran'; RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE FUNCTION evil.int_eq(int, int) RETURNS bool LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.evil_log VALUES ('int'); RAISE NOTICE 'evil int operator ran'; RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.text_eq);
CREATE OPERATOR evil.= (LEFTARG = int, RIGHTARG = int, FUNCTION = evil.int_eq);});
my $features = psql_ok(q{SELECT array_to_string(array_fill(0.5::float8, ARRAY[cardinality(rbr_feature_names('ref', 'comply'))]), ',')});
($out, $err, $rc) = psql(qq{SET search_path = evil, pg_catalog, public;  -- the victim: a superuser whose search_path starts with a schema another role writes
SELECT 'x'::text = 'x'::text AS hijack_works;
SELECT rbr_policy_info('ref')->>'version';
SELECT rbr_policy_info('ref\@1')->>'version';
SELECT rbr_reward('m1', 'comply', '{$features}'::float8[], 1.0) > 1;});
is($rc, 0, 'search_path hijack: rbr functions answer') or diag($err);
is($out, "t\n1\n1\nt", 'search_path hijack: right answers');
is(psql_ok(q{SELECT string_agg(op, ',' ORDER BY op) FROM public.evil_log}), 'text',
   'search_path hijack: only the deliberate comparison ran the evil operator, none of rbr\'s');
like($err, qr/evil text operator ran/, 'the evil operator would have been seen');
is(() = $err =~ /evil .* operator ran/g, 1, 'exactly one evil call');

# --- weights: NULL, NaN and infinities are refused when saved
my $n = psql_ok(q{SELECT cardinality(rbr_feature_names('ref', 'comply'))});
for my $bad ('null', '"NaN"', '"Infinity"', '"-Infinity"') {
    my $w = join(', ', ('0.1') x ($n - 1));
    ($out, $err, $rc) = psql(qq{SELECT rbr_model_save('m2', 'ref', 'comply', '{"weights": [$w, $bad]}')}, keep_going => 1);
    like($err, qr/22023: weight $n of the fit report is .*, not a finite number/, "rbr_model_save refuses a $bad weight");
}
is(psql_ok(q{SELECT count(*) FROM rbr.model WHERE name = 'm2'}), 0, 'none stored');
# a stored row with a NULL or NaN weight (written around rbr_model_save) is an error, never a shifted vector
for my $bad ('NULL', q{'NaN'}) {
    psql_ok(qq{UPDATE rbr.model SET weights[1] = $bad WHERE name = 'm1' AND response_type = 'comply'});
    ($out, $err, $rc) = psql(qq{SELECT rbr_reward('m1', 'comply', '{$features}'::float8[], 1.0)}, keep_going => 1);
    like($err, qr/XX001: model "m1" has unusable weights for response type "comply": (a weight is NULL|weight 1 is nan)/i,
         "a stored $bad weight: a clean error");
}

# --- messages stay valid UTF-8 when they quote a character of a name
($out, $err, $rc) = psql(q{DO $$
DECLARE m text;
BEGIN
  PERFORM rbr_policy_validate(spec('{"caf\u00e9": {"prompt": "p"}}', '{}', 's'));
EXCEPTION WHEN invalid_parameter_value THEN
  GET STACKED DIAGNOSTICS m = MESSAGE_TEXT;
  -- convert_from() checks the bytes
  RAISE NOTICE 'message: % (% bytes)', convert_from(convert_to(m, 'UTF8'), 'UTF8'), octet_length(m);
END $$;});
is($rc, 0, 'the error message is valid UTF-8') or diag($err);
my $msg = $err;
ok(eval { Encode::decode('UTF-8', $msg, Encode::FB_CROAK); 1 }, 'psql received valid UTF-8');
like(Encode::decode('UTF-8', $err), qr/contains "\x{e9}"/, 'the whole character is quoted');

# --- a grader's error message cut to 500 bytes ends at a character boundary
{
    require JSON::PP;
    require File::Temp;
    require IPC::Run;
    my $dir = File::Temp::tempdir(CLEANUP => 1);
    chmod 0755, $dir;
    open my $fh, '>', "$dir/responses.json" or die;
    # 'HTTP 400: ' + 'a' + 2-byte characters: byte 500 falls inside one
    print $fh JSON::PP->new->utf8->encode({ longerr => { status => 400,
        json => { error => { message => 'a' . ("\x{e9}" x 400) } } } });
    close $fh;
    my ($cout, $cerr) = ('', '');
    my $ch = IPC::Run::start(['node', REPO . '/test/grader-server/canned.js', '--port', '0', '--responses',
                              "$dir/responses.json"], '>', \$cout, '2>', \$cerr, IPC::Run::timeout(30));
    IPC::Run::pump($ch) until $cout =~ /listening on 127\.0\.0\.1:(\d+)/;
    $ch->{timeout} = undef;
    my $url = "http://127.0.0.1:$1/v1";
    ($out, $err, $rc) = psql("SET rbr.grader_url = '$url'; SET rbr.grader_max_retries = 0;"
        . " SELECT error, octet_length(error) FROM rbr_grade_many('ref', ARRAY['apology'], ARRAY['\"q\"'::jsonb],"
        . " ARRAY['x [[canned longerr]]'])");
    $ch->signal('TERM');
    eval { $ch->finish };
    is($rc, 0, 'long error message: graded with an error row') or diag($err);
    my $copy = $out;
    ok(eval { Encode::decode('UTF-8', $copy, Encode::FB_CROAK); 1 }, 'long error message: valid UTF-8');
    like($out, qr/^HTTP 400: a(?:\xc3\xa9)+\.{3,}\|(\d+)$/, 'long error message: whole characters, then "..."');
    my ($len) = $out =~ /\|(\d+)$/;
    ok(defined $len && $len <= 503, 'long error message: at most 500 bytes and "..."');
}

drop_db();
system('psql', '-X', '-q', '-d', 'postgres', '-c', 'DROP OWNED BY rbr_hostile CASCADE');
system('psql', '-X', '-q', '-d', 'postgres', '-c', 'DROP ROLE IF EXISTS rbr_hostile');
done_testing();

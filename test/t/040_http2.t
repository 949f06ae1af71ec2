# rbr's HTTPS path: HTTP/2 where the server offers it (many requests
# multiplexed over few connections), certificate verification always on,
# a private CA through rbr.grader_ca_file (superuser only).
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use IPC::Run qw(start pump timeout);
use File::Temp qw(tempdir);
use JSON::PP;

new_db('rbr_tap_http2');
my ($base) = start_server('--labels', REFERENCE . '/gold_train.jsonl');

# a throwaway CA-less certificate for 127.0.0.1, readable by the server's user
my $dir = tempdir('rbr-h2-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;
system('openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '1', '-subj', '/CN=127.0.0.1',
       '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
       '-keyout', "$dir/key.pem", '-out', "$dir/cert.pem") == 0 or die 'openssl failed';
chmod 0644, "$dir/cert.pem", "$dir/key.pem";

my ($fout, $ferr) = ('', '');
my $front = start(['node', RbrTest::REPO . '/test/grader-server/h2front.js', '--port', '0', '--backend', $base,
                   '--cert', "$dir/cert.pem", '--key', "$dir/key.pem"], '>', \$fout, '2>', \$ferr, timeout(30));
pump $front until $fout =~ /listening on 127\.0\.0\.1:(\d+)/;
my $port = $1;
$front->{timeout} = undef;
my $url = "https://127.0.0.1:$port/v1";

# 40 distinct questions in one batch
my $n = 40;
my $batch = "SELECT count(*) FILTER (WHERE status = 'ok') || ' ' || count(*) FILTER (WHERE status = 'error') || ' '"
          . " || coalesce(min(error), '') FROM rbr_grade_many('ref', array_fill('apology'::text, ARRAY[$n]),"
          . " array_fill('\"q\"'::jsonb, ARRAY[$n]), ARRAY(SELECT 'answer ' || g FROM generate_series(1, $n) g))";
my $set = "SET rbr.grader_url = '$url'; SET rbr.grader_max_retries = 0; SET rbr.grader_timeout_ms = 5000;";

# verification stays on: an unknown CA is an error, recorded as such, never an answer
my $r = psql_ok("$set $batch");
like($r, qr/^0 $n .*(certificate|SSL)/i, 'self-signed certificate refused without rbr.grader_ca_file');
is(psql_ok("SELECT count(*) FROM rbr.grade_cache"), 0, 'nothing cached from refused connections');

# with the CA file: every answer arrives, over HTTP/2, on few connections
$r = psql_ok("$set SET rbr.grader_ca_file = '$dir/cert.pem'; $batch;"
           . " SELECT rbr_grader_stats()->>'http2_responses'");
my ($counts, $h2) = split /\n/, $r;
is($counts, "$n 0 ", "all $n answers ok through the TLS front");
is($h2, $n, 'every response came over HTTP/2');
# the front speaks HTTP/2 only, so ask it with curl
my $stats = decode_json(`curl -s --http2 --cacert $dir/cert.pem https://127.0.0.1:$port/front/stats`);
is($stats->{streams}, $n, "the front forwarded $n requests");
cmp_ok($stats->{sessions}, '<=', 8, "multiplexed over few connections ($stats->{sessions} TLS sessions, curl's own included)");

# only a superuser may point rbr at a CA file
psql_ok("CREATE ROLE rbr_h2_user LOGIN");
# (call an rbr function first, so that the library and its settings are loaded)
my ($o, $e) = psql("SET ROLE rbr_h2_user; SELECT rbr_feature_names('ref', 'comply') IS NOT NULL;"
                 . " SET rbr.grader_ca_file = '/tmp/x.pem'", keep_going => 1);
like($e, qr/permission denied to set parameter "rbr.grader_ca_file"/, 'a non-superuser cannot set rbr.grader_ca_file');
psql_ok("DROP ROLE rbr_h2_user");

$front->signal('TERM');
eval { $front->finish };
drop_db();
done_testing();

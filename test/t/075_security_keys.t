# Keys and endpoint settings, tried as an attacker would with a role that can
# log in: on clusters this test starts itself, one without rbr preloaded (key
# in a file, an inline key in postgresql.conf, a key in the server's
# environment) and one with it (inline key and extra headers). Each attack
# must fail safely: no key shown, none sent elsewhere, none in the server log.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use File::Temp qw(tempdir);
use IPC::Run qw(run timeout);

my $root = $> == 0;
my $owner = $root ? 'postgres' : scalar getpwuid($>);
my $port = $ENV{RBR_TEST_PORT} // 55432;

open(my $pfh, '<', REFERENCE . '/policy.json') or die "policy.json: $!";
my $policy = do { local $/; <$pfh> };
close $pfh;

# Run a command as the cluster's owner.
sub as_owner { return $root ? ('runuser', '-u', 'postgres', '--', @_) : @_ }

# initdb + start a cluster in a new directory; returns its description.
sub new_cluster {
    my (%o) = @_;
    my $dir = tempdir('rbr-keys-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    chmod 0755, $dir;
    system('chown', 'postgres:', $dir) if $root;
    my ($o1, $e1, $o2, $e2, $o3, $e3) = ('') x 6;
    run([as_owner('initdb', '-D', "$dir/data", '-U', $owner, '--auth=trust', '-E', 'UTF8', '--locale=C')],
        '>', \$o1, '2>', \$e1) or die "initdb: $e1";
    open my $c, '>>', "$dir/data/postgresql.conf" or die;
    print $c "listen_addresses = ''\nunix_socket_directories = '$dir'\nport = $port\nfsync = off\n"
           . "log_line_prefix = '%m [%p] '\n" . ($o{conf} // '');
    close $c;
    my @env = map { "$_=$o{env}{$_}" } sort keys %{ $o{env} // {} };
    run(['env', @env, as_owner('pg_ctl', '-D', "$dir/data", '-l', "$dir/server.log", '-w', '-t', '60', 'start')],
        '>', \$o2, '2>', \$e2) or die "pg_ctl start: $e2";
    my $cl = { dir => $dir, log => "$dir/server.log" };
    q_ok($cl, 'postgres', "CREATE ROLE alice LOGIN; CREATE DATABASE keys");
    q_ok($cl, 'keys', "CREATE EXTENSION rbr; SELECT rbr_policy_load('ref', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb);"
         . " CREATE FUNCTION grade_as_owner(c text) RETURNS float8 SECURITY DEFINER LANGUAGE sql"
         . " AS \$\$ SELECT public.rbr_grade('ref', 'apology', '\"hi\"', c || ' [[rbr apology=0.8]]') \$\$;"
         . " GRANT EXECUTE ON FUNCTION grade_as_owner(text) TO PUBLIC");
    return $cl;
}

sub stop_cluster {
    my ($cl) = @_;
    run([as_owner('pg_ctl', '-D', "$cl->{dir}/data", '-m', 'immediate', '-w', 'stop')], '>', \my $o, '2>', \my $e);
}

# SQL in one session of a cluster: (stdout, stderr, rc).
sub sq {
    my ($cl, $db, $sql, %o) = @_;
    my ($out, $err) = ('', '');
    local $ENV{PGOPTIONS} = $o{pgoptions} if defined $o{pgoptions};
    run(['psql', '-X', '-q', '-A', '-t', '-v', 'VERBOSITY=verbose', '-h', $cl->{dir}, '-p', $port,
         '-v', 'ON_ERROR_STOP=1', '-U', $o{user} // $owner, '-d', $db], '<', \$sql, '>', \$out, '2>', \$err,
        timeout(120));
    chomp $out;
    return ($out, $err, $? >> 8);
}

sub q_ok {
    my ($out, $err, $rc) = sq(@_);
    die "psql failed: $err\nSQL: $_[2]\n" if $rc;
    return $out;
}

sub slurp { my ($f) = @_; open my $fh, '<', $f or return ''; local $/; return scalar <$fh> }

my $FILE_KEY = 'sk-FILE-KEY-0123456789';
my $GEN_INLINE = 'sk-GEN-INLINE-5555';
my $ENV_KEY = 'sk-ENV-KEY-31415926';
my ($base) = start_server('--api-key', $FILE_KEY);
my ($envbase) = start_server('--api-key', $ENV_KEY);
my ($evil) = start_server();

my $kdir = tempdir('rbr-keyfile-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0700, $kdir;
my $keyfile = "$kdir/grader.key";
open my $kf, '>', $keyfile or die;
print $kf "  $FILE_KEY\n\n";
close $kf;
chmod 0600, $keyfile;
if ($root) { system('chown', '-R', 'postgres:', $kdir) == 0 or die }

# ============================================================ without preload
my $ca = new_cluster(
    conf => "rbr.grader_url = '$base/v1'\nrbr.grader_api_key_file = '$keyfile'\n"
          . "rbr.generator_url = '$base/v1'\nrbr.generator_api_key = '$GEN_INLINE'\n",
    env => { RBR_GRADER_API_KEY => $ENV_KEY });

my ($out, $err, $rc) = sq($ca, 'keys', "SELECT round(rbr_grade('ref', 'apology', '\"hi\"', 'x [[rbr apology=0.8]]')::numeric, 2)");
is($out, '0.80', 'without preload: the key from rbr.grader_api_key_file is sent (the server accepts only it)');

($out, $err, $rc) = sq($ca, 'keys', "SELECT count(*) FROM rbr_generate_many(ARRAY['\"hi\"'::jsonb], ARRAY['be brief'], ARRAY[0])");
isnt($rc, 0, 'without preload: the inline generator key is refused');
like($err, qr/rbr\.generator_api_key is refused because rbr is not in shared_preload_libraries/, '... saying why');
like($err, qr/HINT:.*rbr\.generator_api_key_file.*shared_preload_libraries/, '... and how to fix it');
unlike($err, qr/\Q$GEN_INLINE\E/, '... without the key');

($out, $err) = sq($ca, 'postgres', "SHOW rbr.grader_api_key_file", user => 'alice');
unlike("$out$err", qr/\Q$FILE_KEY\E/, 'SHOW rbr.grader_api_key_file by a non-superuser shows no key');
($out, $err) = sq($ca, 'keys', "SELECT count(*) FROM rbr_check_setup(); SHOW rbr.grader_api_key_file", user => 'alice');
like($err, qr/must be superuser|permission denied/, '... and is refused where rbr is loaded');

($out, $err, $rc) = sq($ca, 'keys', "SELECT item || '|' || ok || '|' || detail FROM rbr_check_setup()", user => 'alice');
is($rc, 0, 'rbr_check_setup() runs for any role');
like($out, qr/^preload\|false\|/m, '... reports the missing preload');
like($out, qr/^grader key\|true\|found in the key file$/m, '... the grader key and its source');
like($out, qr/^generator key\|false\|/m, '... the refused generator key');
unlike($out, qr/\Q$FILE_KEY\E|\Q$GEN_INLINE\E|\Q$keyfile\E|127\.0\.0\.1/, '... and reveals no key, path or URL');

# a non-superuser's session settings cannot redirect requests (PGOPTIONS, SET)
server_reset($evil);
($out, $err) = sq($ca, 'keys', "SELECT round(grade_as_owner('pgopt')::numeric, 2)", user => 'alice',
                 pgoptions => "-c rbr.grader_url=$evil/v1");
is(server_stats($evil)->{chat_requests}, 0, 'PGOPTIONS rbr.grader_url of a non-superuser sends nothing there');
ok($out eq '0.80' || $err =~ /rbr\.grader_url is not set/, '... and no built-in default takes over')
    or diag("$out $err");
($out, $err) = sq($ca, 'keys', "SET rbr.grader_url = '$evil/v1'; SELECT round(grade_as_owner('setbefore')::numeric, 2)", user => 'alice');
is(server_stats($evil)->{chat_requests}, 0, 'SET rbr.grader_url before rbr is loaded sends nothing there');
($out, $err) = sq($ca, 'keys', "SELECT round(grade_as_owner('definer')::numeric, 2)", user => 'alice');
is($out, '0.80', 'the configured endpoint and key serve a SECURITY DEFINER grading function');

# the key file changes: the new content is read; unreadable: a clear error without content
open $kf, '>', $keyfile or die; print $kf "sk-ROTATED-KEY-777\n"; close $kf;
utime(time + 5, time + 5, $keyfile);
($out, $err) = sq($ca, 'keys', "SELECT (SELECT array_agg(status || ':' || coalesce(error, '')) FROM rbr_grade_many('ref', ARRAY['apology'], ARRAY['\"hi\"'::jsonb], ARRAY['rotated [[rbr apology=0.3]]']))");
like("$out\n$err", qr/error:.*(401|unauthorized|Incorrect API key)/i, 'a changed key file is read again (the server refuses the new key)');
unlike("$out\n$err", qr/ROTATED-KEY/, '... and the error does not show it');
chmod 0000, $keyfile unless $root;
unlink $keyfile if $root;
($out, $err, $rc) = sq($ca, 'keys', "SELECT rbr_grade('ref', 'apology', '\"hi\"', 'gone [[rbr apology=0.3]]')");
like($err, qr/could not read the key file "\Q$keyfile\E" named by rbr\.grader_api_key_file/, 'an unreadable key file: error naming the setting and the path');

# no file and no inline key: the server's environment
q_ok($ca, 'keys', "ALTER SYSTEM SET rbr.grader_api_key_file = ''; ALTER SYSTEM SET rbr.grader_url = '$envbase/v1'; SELECT pg_reload_conf()");
sleep 1;
($out, $err) = sq($ca, 'keys', "SELECT round(rbr_grade('ref', 'apology', '\"hi\"', 'env [[rbr apology=0.6]]')::numeric, 2)");
is($out, '0.60', 'the key from RBR_GRADER_API_KEY in the server environment is sent') or diag($err);
($out) = sq($ca, 'keys', "SELECT detail FROM rbr_check_setup() WHERE item = 'grader key'");
is($out, 'found in the environment', 'rbr_check_setup() names the environment as the source');

# no URL: an error with a hint, rbr_grader_request() still works
q_ok($ca, 'keys', "ALTER SYSTEM SET rbr.grader_url = ''; SELECT pg_reload_conf()");
sleep 1;
($out, $err, $rc) = sq($ca, 'keys', "SELECT rbr_grade('ref', 'apology', '\"hi\"', 'nourl [[rbr apology=0.6]]')");
like($err, qr/rbr\.grader_url is not set.*HINT:.*rbr_check_setup/s, 'no URL configured: an error with a hint');
($out, $err, $rc) = sq($ca, 'keys', "SELECT rbr_grader_request('ref', 'apology', '\"hi\"', 'x') ? 'messages'");
is($out, 't', 'rbr_grader_request() needs no URL');
stop_cluster($ca);

# =============================================================== with preload
my $INLINE = 'sk-INLINE-KEY-24680';
my $HDR = 'org-HDR-SECRET-99';
my ($ibase) = start_server('--api-key', $INLINE);
my $cb = new_cluster(conf => "shared_preload_libraries = 'rbr'\nrbr.grader_url = '$ibase/v1'\n"
                          . "rbr.grader_api_key = '$INLINE'\nrbr.grader_extra_headers = 'X-Org: $HDR'\n");
($out, $err) = sq($cb, 'keys', "SELECT round(rbr_grade('ref', 'apology', '\"hi\"', 'x [[rbr apology=0.8]]')::numeric, 2)");
is($out, '0.80', 'with preload: the inline key is honoured') or diag($err);

for my $db ('postgres', 'keys') {
    for my $sql ("SHOW rbr.grader_api_key", "SELECT current_setting('rbr.grader_api_key')",
                 "SHOW rbr.grader_extra_headers", "SELECT current_setting('rbr.grader_extra_headers')",
                 "SELECT setting FROM pg_settings WHERE name ~ '^rbr\\.'", "SHOW ALL",
                 "SELECT current_setting('rbr.grader_url')") {
        ($out, $err) = sq($cb, $db, $sql, user => 'alice');
        unlike("$out\n$err", qr/\Q$INLINE\E|\Q$HDR\E|127\.0\.0\.1/, "with preload, in $db: \"$sql\" by a non-superuser reveals nothing");
    }
}
($out, $err) = sq($cb, 'postgres', "SHOW rbr.grader_api_key", user => 'alice');
like($err, qr/must be superuser|pg_read_all_settings/, 'SHOW of the key is refused where the extension is not installed');

# per-role keys: refused, and not written into the log
($out, $err, $rc) = sq($cb, 'postgres', "ALTER ROLE alice SET rbr.grader_api_key = 'sk-ROLE-KEY-112233'");
isnt($rc, 0, 'ALTER ROLE ... SET rbr.grader_api_key is refused');
like($err, qr/cannot be set per role or per database/, '... saying why');
($out) = sq($cb, 'postgres', "SELECT count(*) FROM pg_db_role_setting WHERE array_to_string(setconfig, ',') ~ 'ROLE-KEY'");
is($out, '0', '... and nothing is stored in pg_db_role_setting');
($out, $err, $rc) = sq($cb, 'postgres', "ALTER DATABASE keys SET rbr.grader_extra_headers = 'X-A: sk-DB-HDR-445566'");
isnt($rc, 0, 'ALTER DATABASE ... SET rbr.grader_extra_headers is refused');

# PGOPTIONS of a non-superuser with rbr preloaded
server_reset($evil);
($out, $err) = sq($cb, 'keys', "SELECT round(grade_as_owner('pgopt2')::numeric, 2)", user => 'alice',
                 pgoptions => "-c rbr.grader_url=$evil/v1");
is(server_stats($evil)->{chat_requests}, 0, 'with preload: PGOPTIONS rbr.grader_url of a non-superuser sends nothing there');
like($err, qr/permission denied to set parameter "rbr\.grader_url"/, '... the connection is refused');

# ALTER SYSTEM with a trailing line break: accepted, trimmed at use, never logged
($out, $err, $rc) = sq($cb, 'postgres', "ALTER SYSTEM SET rbr.grader_api_key = E'$INLINE\\n'; SELECT pg_reload_conf()");
is($rc, 0, 'ALTER SYSTEM SET of a key with a trailing line break is accepted') or diag($err);
sleep 1;
($out, $err) = sq($cb, 'keys', "SELECT round(rbr_grade('ref', 'apology', '\"hi\"', 'nl [[rbr apology=0.7]]')::numeric, 2)");
is($out, '0.70', '... and the key is trimmed at use') or diag($err);
($out, $err, $rc) = sq($cb, 'postgres', "ALTER SYSTEM SET rbr.grader_api_key = E'sk-NL\\nINSIDE-135790'");
like($err, qr/must not contain a line break/, 'ALTER SYSTEM SET of a key with a line break inside is refused');
unlike($err, qr/135790/, '... without showing it');
($out, $err, $rc) = sq($cb, 'postgres', "ALTER SYSTEM SET rbr.grader_api_key = E'sk-CTRL\\x01KEY-998877'; SELECT pg_reload_conf()");
is($rc, 0, 'ALTER SYSTEM SET of a key with a control character does not fail there');
sleep 1;
($out, $err, $rc) = sq($cb, 'keys', "SELECT rbr_grade('ref', 'apology', '\"hi\"', 'ctrl [[rbr apology=0.7]]')");
like($err, qr/API key from rbr\.grader_api_key contains control characters/, '... it is refused at use');
unlike($err, qr/998877/, '... without showing it');
q_ok($cb, 'postgres', "ALTER SYSTEM RESET rbr.grader_api_key; SELECT pg_reload_conf()");
my $log = slurp($cb->{log});
unlike($log, qr/\Q$INLINE\E|998877|135790|ROLE-KEY|DB-HDR|\Q$HDR\E/, 'no key and no header value in the server log');
ok(length($log) > 0, '... (the log was read)');
stop_cluster($cb);

done_testing();

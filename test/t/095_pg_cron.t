# The pg_cron recipe of doc/operations.md ("Keeping a features table
# current"), run as written on a cluster this test starts with rbr and
# pg_cron preloaded: a scheduled CALL rbr_featurize grades the rows that
# arrive between runs. Skips where Debian's postgresql-15-cron is not
# installed.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use File::Temp qw(tempdir);
use IPC::Run qw(run timeout);
use Time::HiRes qw(time sleep);

my $libdir = `pg_config --pkglibdir 2>/dev/null`;
chomp $libdir;
plan skip_all => "pg_cron is not installed (Debian package postgresql-15-cron)"
    unless $libdir && -e "$libdir/pg_cron.so";

my $root = $> == 0;
my $owner = $root ? 'postgres' : scalar getpwuid($>);
my $port = ($ENV{RBR_TEST_PORT} // 55432) + 9;
sub as_owner { return $root ? ('runuser', '-u', 'postgres', '--', @_) : @_ }

my $dir = tempdir('rbr-cron-XXXXXX', TMPDIR => 1, CLEANUP => 1);
chmod 0755, $dir;
system('chown', 'postgres:', $dir) if $root;
my ($o1, $e1, $o2, $e2) = ('') x 4;
run([as_owner('initdb', '-D', "$dir/data", '-U', $owner, '--auth=trust', '-E', 'UTF8', '--locale=C')],
    '>', \$o1, '2>', \$e1) or die "initdb: $e1";
open my $c, '>>', "$dir/data/postgresql.conf" or die;
# the recipe's settings (cron.host: pg_cron connects through this socket)
print $c <<"CONF";
listen_addresses = ''
unix_socket_directories = '$dir'
port = $port
fsync = off
shared_preload_libraries = 'rbr,pg_cron'
cron.database_name = 'rbrcron'
cron.host = '$dir'
CONF
close $c;
run([as_owner('pg_ctl', '-D', "$dir/data", '-l', "$dir/server.log", '-w', '-t', '60', 'start')],
    '>', \$o2, '2>', \$e2) or die "pg_ctl start: $e2";
END { run([as_owner('pg_ctl', '-D', "$dir/data", '-m', 'immediate', '-w', 'stop')], '>', \my $o, '2>', \my $e) if $dir }

sub sq {
    my ($db, $sql) = @_;
    my ($out, $err) = ('', '');
    run(['psql', '-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-h', $dir, '-p', $port, '-U', $owner, '-d', $db],
        '<', \$sql, '>', \$out, '2>', \$err, timeout(120)) or die "psql failed: $err\nSQL: $sql\n";
    chomp $out;
    return $out;
}

my ($base) = start_server();
open(my $pfh, '<', REFERENCE . '/policy.json') or die;
my $policy = do { local $/; <$pfh> };
sq('postgres', "CREATE DATABASE rbrcron");
sq('rbrcron', <<"SQL");
CREATE EXTENSION rbr;
CREATE EXTENSION pg_cron;
ALTER SYSTEM SET rbr.grader_url = '$base/v1';
SELECT pg_reload_conf();
SELECT rbr_policy_load('paper', \$p\$$policy\$p\$::jsonb);
CREATE TABLE completions (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                          prompt jsonb, completion text, response_type text);
INSERT INTO completions (prompt, completion, response_type)
    SELECT '"q"', 'answer ' || g || ' [[rbr *=0.2]]', 'comply' FROM generate_series(1, 5) g;
-- the recipe: grade what is missing every minute
SELECT cron.schedule('rbr-featurize', '* * * * *', \$\$CALL rbr_featurize('completions', 'paper')\$\$);
SQL

# wait for a run that grades the first rows
sub wait_graded {
    my ($n, $limit) = @_;
    my $t0 = time;
    while (time - $t0 < $limit) {
        my $k = sq('rbrcron', "SELECT count(DISTINCT id) FROM completions_grades WHERE status = 'ok'")
            if sq('rbrcron', "SELECT to_regclass('completions_grades') IS NOT NULL") eq 't';
        return 1 if defined $k && $k == $n;
        sleep 1;
    }
    return 0;
}
ok(wait_graded(5, 150), 'a scheduled run graded the first 5 rows');
sq('rbrcron', "INSERT INTO completions (prompt, completion, response_type)"
            . " SELECT '\"q\"', 'late ' || g || ' [[rbr *=0.2]]', 'comply' FROM generate_series(1, 3) g");
ok(wait_graded(8, 150), 'the next scheduled run graded the 3 rows that arrived');
is(sq('rbrcron', "SELECT count(*) FROM cron.job_run_details WHERE status = 'failed'"), 0, 'no failed cron run');
is(sq('rbrcron', "SELECT count(*) FROM rbr.run_progress WHERE state = 'done' AND errors = 0") >= 2 ? 1 : 0, 1,
   'each run is recorded as done, without errors');
sq('rbrcron', "SELECT cron.unschedule('rbr-featurize')");
done_testing();

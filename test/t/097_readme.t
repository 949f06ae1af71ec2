# README.md's first session runs as written: every ```sql block, in order, in
# one psql session from the repository's root, against a fresh database, with
# the test grader started as the README's ```sh block starts it (port 18080,
# the gold labels). Checks that each step left what it promises.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use Cwd qw(getcwd);
use IPC::Run qw(run timeout);

open(my $fh, '<', REPO . '/README.md') or die "README.md: $!";
my $readme = do { local $/; <$fh> };
close $fh;
my @blocks = $readme =~ /^```sql\n(.*?)^```/msg;
ok(@blocks >= 5, scalar(@blocks) . ' sql blocks in README.md');
my ($sh) = $readme =~ /^```sh\n(node test\/grader-server\/server\.js[^\n]*)\n/m;
ok(defined $sh, 'README starts the test grader');
my @args = $sh =~ /--(port|labels) (\S+)/g;
my %a = @args;
is($a{port}, 18080, 'on the port its sql blocks use');

my ($base) = start_server('--port', $a{port}, '--labels', REPO . "/$a{labels}");
is($base, "http://127.0.0.1:$a{port}", 'test grader up');

system('psql', '-X', '-q', '-d', 'postgres', '-c', 'DROP DATABASE IF EXISTS rbr_readme') == 0 or die;
system('psql', '-X', '-q', '-d', 'postgres', '-c', 'CREATE DATABASE rbr_readme') == 0 or die;
my $sql = join("\n", @blocks);
my ($out, $err) = ('', '');
my $cwd = getcwd();
chdir REPO or die;
run(['psql', '-X', '-v', 'ON_ERROR_STOP=1', '-d', 'rbr_readme'], '<', \$sql, '>', \$out, '2>', \$err, timeout(600));
my $rc = $? >> 8;
chdir $cwd;
is($rc, 0, "README's sql blocks run in order without an error") or diag($err);

my %q = (db => 'rbr_readme');
is(psql_ok("SELECT count(*) FROM completions", %q), 240, 'step 2: the sample table has 40 prompts x 6 completions');
is(psql_ok("SELECT state || ' ' || errors FROM rbr.featurize_progress WHERE source = 'completions'::regclass", %q), 'done 0',
   'step 3: graded, no errors');
my $types = psql_ok("SELECT count(DISTINCT response_type) FROM completions", %q);
my $fitted = psql_ok("SELECT count(*) FROM rbr.model WHERE name = 'v1'", %q);
ok($fitted >= 2 && $fitted <= $types, "step 4: a model for each type with pairs ($fitted of $types)");
like($out, qr/not_fitted/, 'step 4: the types without pairs are named');
like($out, qr/reward/, 'step 5: rewards are printed');
my ($mstate, $merr, $mtotal, $mreq) = split /\|/, psql_ok(
    "SELECT state, errors, total, requests FROM rbr.featurize_progress WHERE source = 'more'::regclass ORDER BY run_id DESC LIMIT 1", %q);
ok($mstate eq 'done' && $merr == 0 && $mtotal > 0 && $mreq == $mtotal,
   "step 6: batch mode graded the second table ($mreq requests for $mtotal values)");
is(psql_ok("SELECT count(*) > 0 AND count(*) FILTER (WHERE ideal IS NULL) = 0 FROM more_features"
         . " WHERE rbr_response_type = 'comply'", %q), 't', 'step 6: its comply rows have their classes');
unlike($err, qr/ERROR/, 'no error anywhere');
system('psql', '-X', '-q', '-d', 'postgres', '-c', 'DROP DATABASE rbr_readme WITH (FORCE)');
done_testing();

# The per-backend caches of compiled policies and model weights follow
# changes made by other sessions: a session that has used a policy or a
# model sees a new version as soon as the other session commits.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use IPC::Run qw(start pump finish timeout);

new_db('rbr_tap_cache');

# A long-lived session: send SQL, wait for its marker, return the output before it.
my ($in, $out, $err) = ('', '', '');
my $session = start(['psql', '-X', '-q', '-A', '-t', '-d', $RbrTest::DB], '<', \$in, '>', \$out, '2>', \$err,
                    timeout(60));
my $n = 0;
sub ask {
    my ($sql) = @_;
    $n++;
    $in .= "$sql\n\\echo done-$n\n";
    pump $session until $out =~ /done-$n\n/;
    (my $got = $out) =~ s/done-$n\n//;
    $out = '';
    chomp $got;
    return $got;
}

# policy: the session compiles version 1 (features of comply: the default list)
my $names = "SELECT array_length(rbr_feature_names('ref', 'comply'), 1);";
my $default = ask($names);
ok($default > 3, "session A uses the policy ($default comply features)");

# another session stores version 2 with a three-feature list for comply
psql_ok("SELECT rbr_policy_load('ref', (SELECT spec FROM rbr.policy_version WHERE policy = 'ref' AND version = 1)"
      . " || '{\"features\": {\"comply\": [\"fully_complies\", \"partially_complies\", \"ideal\"]}}', replace => true)");
is(ask($names), 3, 'session A sees the new policy version at its next statement');
is(ask("SELECT array_length(rbr_feature_names('ref\@1', 'comply'), 1);"), $default, 'and can still use version 1');

# inside an open transaction, a concurrent change does not show up half-way
ask("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT rbr_feature_names('ref', 'comply');");
psql_ok("DELETE FROM rbr.policy_version WHERE policy = 'ref' AND version = 2");
is(ask($names), 3, 'within its transaction, session A keeps the version it started with');
ask("COMMIT;");
is(ask($names), $default, 'after commit it sees the deletion (back to version 1)');

# models: session A caches the weights, another session replaces them
psql_ok("SELECT rbr_model_save('m', 'ref', 'comply', jsonb_build_object('weights',"
      . " (SELECT jsonb_agg(1) FROM generate_series(1, $default))))");
my $score = "SELECT rbr_reward('m', 'comply', array_fill(1::float8, ARRAY[$default]), 0);";
is(ask($score), $default, 'session A scores with the stored weights');
psql_ok("SELECT rbr_model_save('m', 'ref', 'comply', jsonb_build_object('weights',"
      . " (SELECT jsonb_agg(2) FROM generate_series(1, $default))))");
is(ask($score), 2 * $default, 'session A scores with the replaced weights at its next statement');
psql_ok("DELETE FROM rbr.model WHERE name = 'm'");
like(ask("SELECT rbr_reward('m', 'comply', array_fill(1::float8, ARRAY[$default]), 0);") . $err,
     qr/model "m" has no weights for response type "comply"/, 'and notices a deleted model');

$in .= "\\q\n";
finish $session;
drop_db();
done_testing();

# ALTER EXTENSION rbr UPDATE from 0.1.0, 0.2.0 and 0.3.0: the updated catalog equals a fresh
# install's (every member object, function definition, column, constraint,
# index, trigger, row-security policy and privilege), stored policies and
# models survive, and the direct grants 0.1.0's docs listed are replaced by
# capabilities.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;

my $snapshot_sql = do { local (@ARGV, $/) = (REPO . '/test/sql/catalog_snapshot.sql'); <> };
my $version = do {
    open(my $fh, '<', REPO . '/rbr.control') or die "rbr.control: $!";
    my ($v) = join('', <$fh>) =~ /default_version\s*=\s*'([^']+)'/;
    $v;
};

# pass when two catalog snapshots are equal, else fail listing what differs
sub same_catalog {
    my ($updated, $fresh, $name) = @_;
    return pass($name) if $updated eq $fresh;
    my %o = map { $_ => 1 } split /\n(?=\S)/, $updated;
    my %n = map { $_ => 1 } split /\n(?=\S)/, $fresh;
    my @only_old = grep { !$n{$_} } sort keys %o;
    my @only_new = grep { !$o{$_} } sort keys %n;
    fail($name);
    diag("only after the update:\n  " . join("\n  ", @only_old[0 .. ($#only_old < 30 ? $#only_old : 30)]));
    diag("only in a fresh install:\n  " . join("\n  ", @only_new[0 .. ($#only_new < 30 ? $#only_new : 30)]));
}

sub fresh_db {
    my ($name) = @_;
    system('psql', '-X', '-q', '-d', 'postgres', '-c', qq{DROP DATABASE IF EXISTS "$name"}) == 0 or die;
    system('psql', '-X', '-q', '-d', 'postgres', '-c', qq{CREATE DATABASE "$name"}) == 0 or die;
}

# --- 0.1.0 with data and the grants its docs listed
fresh_db('rbr_tap_upgrade_old');
open(my $fh, '<', REFERENCE . '/policy.json') or die "policy.json: $!";
my $policy = do { local $/; <$fh> };
close $fh;
psql_ok(<<SQL, db => 'rbr_tap_upgrade_old');
CREATE EXTENSION rbr VERSION '0.1.0';
SELECT rbr_policy_load('ref', \$p\$$policy\$p\$::jsonb);
SELECT rbr_model_save('m1', 'ref', 'comply',
       jsonb_build_object('weights', (SELECT jsonb_agg(0.5) FROM unnest(rbr_feature_names('ref', 'comply')))));
INSERT INTO rbr.featurize_run (source, features_table, grades_table, policy, options, total_values, done_values, state)
    VALUES ('rbr.model'::regclass, 'x_features', 'x_grades', 'ref\@1', '{}', 10, 10, 'done');
SQL
is(psql_ok("SELECT extversion FROM pg_extension WHERE extname = 'rbr'", db => 'rbr_tap_upgrade_old'), '0.1.0',
   'installed 0.1.0');

my ($out, $err, $rc) = psql("ALTER EXTENSION rbr UPDATE", db => 'rbr_tap_upgrade_old');
is($rc, 0, 'ALTER EXTENSION rbr UPDATE succeeds') or diag($err);
is(psql_ok("SELECT extversion FROM pg_extension WHERE extname = 'rbr'", db => 'rbr_tap_upgrade_old'), $version,
   "updated to $version");

# --- a fresh install of the current version
fresh_db('rbr_tap_upgrade_new');
psql_ok("CREATE EXTENSION rbr", db => 'rbr_tap_upgrade_new');

my $old = psql_ok($snapshot_sql, db => 'rbr_tap_upgrade_old');
my $new = psql_ok($snapshot_sql, db => 'rbr_tap_upgrade_new');
ok(length($new) > 10000 && $new =~ /function rbr_grant\(regrole,text\)/, 'the snapshot covers the catalog');
same_catalog($old, $new, 'the updated catalog equals a fresh install');

# --- a 0.1.0 installation with the grants its docs listed
fresh_db('rbr_tap_upgrade_grants');
psql_ok(<<SQL, db => 'rbr_tap_upgrade_grants');
CREATE EXTENSION rbr VERSION '0.1.0';
DROP ROLE IF EXISTS rbr_old_grader;
CREATE ROLE rbr_old_grader;
GRANT EXECUTE ON FUNCTION rbr_grade(text, text, jsonb, text),
                          rbr_grade_many(text, text[], jsonb[], text[]) TO rbr_old_grader;
GRANT EXECUTE ON PROCEDURE rbr_featurize(regclass, text, jsonb) TO rbr_old_grader;
GRANT EXECUTE ON FUNCTION rbr.featurize_start(regclass, text, jsonb),
                          rbr.featurize_chunk(bigint), rbr.featurize_finish(bigint) TO rbr_old_grader;
GRANT SELECT, INSERT ON rbr.grade_cache TO rbr_old_grader;
GRANT SELECT, INSERT, UPDATE ON rbr.featurize_run TO rbr_old_grader;
GRANT USAGE ON SEQUENCE rbr.featurize_run_run_id_seq TO rbr_old_grader;
ALTER EXTENSION rbr UPDATE;
SQL

# --- data survives; the old direct grants are gone, the capability is there
is(psql_ok("SELECT policy || '\@' || version || ' ' || owner FROM rbr.policy_version", db => 'rbr_tap_upgrade_old'),
   'ref@1 ' . $ENV{PGUSER}, 'policies survive, owned by the role that ran the update');
is(psql_ok("SELECT name || ' ' || response_type || ' ' || owner FROM rbr.model", db => 'rbr_tap_upgrade_old'),
   'm1 comply ' . $ENV{PGUSER}, 'models survive, with an owner');
is(psql_ok("SELECT kind || ' ' || state || ' ' || done || '/' || total FROM rbr.run", db => 'rbr_tap_upgrade_old'),
   'featurize done 10/10', 'runs move to rbr.run');
is(psql_ok("SELECT has_table_privilege('rbr_old_grader', 'rbr.grade_cache', 'SELECT')"
         . " OR has_table_privilege('rbr_old_grader', 'rbr.grade_cache', 'INSERT')", db => 'rbr_tap_upgrade_grants'),
   'f', 'the direct grants on the cache are revoked');
is(psql_ok("SELECT string_agg(capability || '=' || granted, ',') FROM rbr_capabilities('rbr_old_grader')",
           db => 'rbr_tap_upgrade_grants'),
   'grade=true,synthesize=false,policies=false,models=false', 'a role that could grade has the grade capability');

# --- from 0.2.0 and from 0.3.0: a database created at that version (with a
# policy, a model and a capability granted) updates to the same catalog as a
# fresh install, and keeps its data
psql_ok("DROP ROLE IF EXISTS rbr_old_grader2; CREATE ROLE rbr_old_grader2", db => 'postgres');
# the same capability in the fresh install, so that the privileges compare
psql_ok("SELECT rbr_grant('rbr_old_grader2', 'grade')", db => 'rbr_tap_upgrade_new');
$new = psql_ok($snapshot_sql, db => 'rbr_tap_upgrade_new');
for my $from ('0.2.0', '0.3.0') {
    (my $db = "rbr_tap_upgrade_$from") =~ s/\.//g;
    fresh_db($db);
    psql_ok(<<SQL, db => $db);
CREATE EXTENSION rbr VERSION '$from';
SELECT rbr_policy_load('ref', \$p\$$policy\$p\$::jsonb);
SELECT rbr_model_save('m1', 'ref', 'comply',
       jsonb_build_object('weights', (SELECT jsonb_agg(0.5) FROM unnest(rbr_feature_names('ref', 'comply')))));
SELECT rbr_grant('rbr_old_grader2', 'grade');
SQL
    ($out, $err, $rc) = psql("ALTER EXTENSION rbr UPDATE", db => $db);
    is($rc, 0, "ALTER EXTENSION rbr UPDATE from $from succeeds") or diag($err);
    same_catalog(psql_ok($snapshot_sql, db => $db), $new, "updated from $from, the catalog equals a fresh install");
    is(psql_ok("SELECT string_agg(capability || '=' || granted, ',') FROM rbr_capabilities('rbr_old_grader2')", db => $db),
       'grade=true,synthesize=false,policies=false,models=false', "capabilities survive the update from $from");
    is(psql_ok("SELECT name || ' ' || response_type FROM rbr.model", db => $db),
       'm1 comply', "models survive the update from $from");
    psql_ok(qq{DROP DATABASE "$db" WITH (FORCE)}, db => 'postgres');
}

psql_ok("DROP DATABASE rbr_tap_upgrade_old WITH (FORCE)", db => 'postgres');
psql_ok("DROP DATABASE rbr_tap_upgrade_new WITH (FORCE)", db => 'postgres');
psql_ok("DROP DATABASE rbr_tap_upgrade_grants WITH (FORCE)", db => 'postgres');
psql_ok("DROP ROLE rbr_old_grader", db => 'postgres');
psql_ok("DROP ROLE rbr_old_grader2", db => 'postgres');
done_testing();

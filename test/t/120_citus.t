# Citus: a coordinator and two workers of this test's own (throwaway
# clusters with shared_preload_libraries = 'citus,rbr', the coordinator on
# RBR_TEST_PORT, the workers on the next two ports, over localhost).
#  - policies and models are copied to the workers when their transaction
#    commits (never on a rollback, never over another role's name there), and
#    by rbr_citus_sync() to a worker added later, only what the caller sees;
#  - rbr_classify and rbr_reward(model, ...) are evaluated on the workers
#    (EXPLAIN) and equal a local table's;
#  - CALL rbr_featurize on a distributed source grades like a local one,
#    into coordinator-local features and grades tables;
#  - rbr_fit / rbr_pair_accuracy grouped by a column other than the
#    distribution column aggregate partially on the workers (EXPLAIN) and
#    equal a local table's; the bytes the workers send are printed;
#  - the workers mirror the coordinator: a superuser's rbr_citus_sync()
#    removes what the coordinator no longer has (waiting for stores in
#    flight; another role's sync copies only and holds no lock), and a
#    TRUNCATE is mirrored at commit only.
# Skipped when citus.so is not installed in the PostgreSQL being tested.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use File::Temp qw(tempdir);
use IPC::Run qw(run start finish timeout);

my $pg_config = $ENV{RBR_PG_CONFIG} // '/usr/lib/postgresql/15/bin/pg_config';
chomp(my $pkglib = `$pg_config --pkglibdir`);
chomp(my $bindir = `$pg_config --bindir`);
plan skip_all => "citus.so is not installed in $pkglib: the Citus tests need Citus 13.2 built against PostgreSQL 15"
    unless -e "$pkglib/citus.so";

my $root = $> == 0;
my $owner = $root ? 'postgres' : scalar getpwuid($>);
my $port = $ENV{RBR_TEST_PORT} // 55432;
my $version = do {
    open(my $fh, '<', REPO . '/rbr.control') or die "rbr.control: $!";
    my ($v) = join('', <$fh>) =~ /default_version\s*=\s*'([^']+)'/;
    $v;
};
my ($C, $W1, $W2) = ($port, $port + 1, $port + 2);
chdir REPO or die;    # test/sample/completions.sql reads ../shared/reference from here

open(my $pfh, '<', REFERENCE . '/policy.json') or die "policy.json: $!";
my $policy = do { local $/; <$pfh> };
close $pfh;
die "unexpected quote tag in policy.json" if $policy =~ /\$rbrpolicy\$/;

sub as_owner { return $root ? ('runuser', '-u', 'postgres', '--', @_) : @_ }

sub slurp { my ($f) = @_; open my $fh, '<', $f or return ''; local $/; return scalar <$fh> }

my @nodes;
# initdb + start a node on a port, with Citus and rbr preloaded.
sub start_node {
    my ($p) = @_;
    my $dir = tempdir('rbr-citus-XXXXXX', TMPDIR => 1, CLEANUP => 1);
    chmod 0755, $dir;
    system('chown', 'postgres:', $dir) if $root;
    my ($o, $e) = ('', '');
    run([as_owner("$bindir/initdb", '-D', "$dir/data", '-U', $owner, '--auth=trust', '-E', 'UTF8', '--locale=C')],
        '>', \$o, '2>', \$e) or die "initdb: $e";
    open my $c, '>>', "$dir/data/postgresql.conf" or die;
    print $c "listen_addresses = 'localhost'\nunix_socket_directories = '$dir'\nport = $p\nfsync = off\n"
           . "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 60\n"
           . "log_line_prefix = '%m [%p] '\nlog_min_messages = warning\n"
           . "shared_preload_libraries = 'citus,rbr'\n";
    close $c;
    # the port may be in use for a moment as the local end of another connection: retry a few times
    for my $try (1 .. 10) {
        last if run([as_owner("$bindir/pg_ctl", '-D', "$dir/data", '-l', "$dir/server.log", '-w', '-t', '60', 'start')],
                    '>', \$o, '2>', \$e);
        my $log = slurp("$dir/server.log");
        die "pg_ctl start on port $p: $e" . ($log =~ s/^/  /mgr)
            if $try == 10 || $log !~ /Address already in use/;
        sleep 1;
    }
    push @nodes, $dir;
}
END {
    for my $dir (@nodes) {
        run([as_owner("$bindir/pg_ctl", '-D', "$dir/data", '-m', 'immediate', '-w', 'stop')], '>', \my $o, '2>', \my $e);
    }
}

# SQL in one session on a node: (stdout, stderr, rc).
sub sq {
    my ($p, $sql, %o) = @_;
    my ($out, $err) = ('', '');
    run(["$bindir/psql", '-X', '-q', '-A', '-t', '-v', 'VERBOSITY=verbose', '-h', 'localhost', '-p', $p,
         '-v', 'ON_ERROR_STOP=1', '-U', $o{user} // $owner, '-d', 'postgres'], '<', \$sql, '>', \$out, '2>', \$err,
        timeout(600));
    chomp $out;
    return ($out, $err, $? >> 8);
}
sub q_ok {
    my ($p, $sql, %o) = @_;
    my ($out, $err, $rc) = sq($p, $sql, %o);
    die "psql on port $p failed: $err\nSQL: $sql\n" if $rc;
    return $out;
}
sub alice { return q_ok($C, $_[0], user => 'alice') }
sub on_workers {
    my ($sql, @w) = @_;
    return join(' / ', map { q_ok($_, $sql) } (@w ? @w : ($W1, $W2)));
}
# pg_size_pretty text back to bytes
sub bytes_of {
    my ($n, $u) = $_[0] =~ /^(\d+)\s*(bytes|kB|MB|GB)$/ or die "size '$_[0]'";
    return $n * { bytes => 1, kB => 1024, MB => 1024**2, GB => 1024**3 }->{$u};
}

start_node($_) for ($C, $W1, $W2);
q_ok($_, 'CREATE EXTENSION citus') for ($C, $W1, $W2);
q_ok($C, "SELECT citus_set_coordinator_host('localhost', $C); SELECT citus_add_node('localhost', $W1)");
q_ok($C, <<"SQL");
CREATE EXTENSION rbr;
CREATE ROLE alice LOGIN;
CREATE ROLE bob LOGIN;
GRANT CREATE ON SCHEMA public TO alice;
SELECT rbr_grant('alice', 'policies'), rbr_grant('alice', 'models'), rbr_grant('alice', 'grade'),
       rbr_grant('bob', 'policies');
SQL
is(q_ok($W1, "SELECT extversion FROM pg_extension WHERE extname = 'rbr'"), $version,
   'CREATE EXTENSION rbr on the coordinator installs it on the worker (Citus)');
is(q_ok($W1, "SELECT count(*) FROM pg_roles WHERE rolname IN ('alice', 'bob')"), 2, 'the roles exist on the worker');
q_ok($C, "CREATE ROLE team NOLOGIN; GRANT team TO alice");
is(q_ok($W1, "SELECT pg_has_role('alice', 'team', 'USAGE')"), 't', 'so do their memberships');

# --- policies and models follow the coordinator at commit
my $load = "SELECT rbr_policy_load('paper', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb)";
alice($load);
is(on_workers("SELECT policy || '\@' || version || ' ' || owner::text FROM rbr.policy_version", $W1), 'paper@1 alice',
   'rbr_policy_load copies the version to the worker, with its owner');
alice("BEGIN; SELECT rbr_policy_load('gone', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb); ROLLBACK");
is(q_ok($W1, "SELECT count(*) FROM rbr.policy_version WHERE policy = 'gone'"), 0,
   'a load that is rolled back is not copied (the copy is made at commit)');
q_ok($C, "SELECT rbr_policy_load('bobs', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb)", user => 'bob');
is(q_ok($W1, "SELECT owner FROM rbr.policy_version WHERE policy = 'bobs'"), 'bob', "bob's policy on the worker is bob's");
q_ok($C, "SELECT rbr_grant('team', 'policies')");
alice("SET ROLE team; SELECT rbr_policy_load('teams', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb)");
is(join(' ', map { q_ok($W1, "SELECT count(*) FROM rbr.policy_version WHERE policy = 'teams'", user => $_) } qw(alice bob)),
   '1 0', "on the worker, a policy of group team is seen by its member alice, not by bob");

# attack: a name another role owns on a worker is never overwritten from the coordinator
q_ok($W1, "INSERT INTO rbr.policy_version (policy, version, spec, owner) "
        . "SELECT 'taken', 1, spec || '{\"rbr_test\": 1}', 'bob' FROM rbr.policy_version WHERE policy = 'paper'");
my ($o, $e, $rc) = sq($C, "SELECT rbr_policy_load('taken', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb)", user => 'alice');
ok($rc != 0 && $e =~ /could not copy policies and models to every Citus worker/ && $e =~ /belongs to another role/,
   "loading a name that another role owns on a worker fails") or diag($e);
is(q_ok($C, "SELECT count(*) FROM rbr.policy_version WHERE policy = 'taken'"), 0, '... and is not stored on the coordinator');
is(q_ok($W1, "SELECT owner::text || ' ' || (spec ? 'rbr_test') FROM rbr.policy_version WHERE policy = 'taken'"), 'bob true',
   "... and the worker's row stays bob's, unchanged");
q_ok($W1, "DELETE FROM rbr.policy_version WHERE policy = 'taken'");

# attack: no role but the extension's owner reaches the copying functions
(undef, $e, $rc) = sq($W1, "SELECT rbr.citus_apply('{\"policy_versions\": []}')", user => 'alice');
like($e, qr/permission denied for function citus_apply/, 'a role cannot call rbr.citus_apply() on a worker');
(undef, $e, $rc) = sq($C, "SELECT * FROM rbr.citus_ship('{}')", user => 'alice');
like($e, qr/permission denied for function citus_ship/, 'a role cannot send rows with rbr.citus_ship()');
(undef, $e, $rc) = sq($C, "CREATE TABLE mine (policy text); CREATE CONSTRAINT TRIGGER t AFTER INSERT ON mine "
                        . "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION rbr.citus_push()", user => 'alice');
like($e, qr/permission denied for function rbr\.citus_push/, 'a role cannot attach rbr.citus_push() to a table of its own');

# --- the sample, graded locally; a model fitted on it
my ($base) = start_server('--labels', REFERENCE . '/gold_train.jsonl');
q_ok($C, "ALTER SYSTEM SET rbr.grader_url = '$base/v1'; SELECT pg_reload_conf()");
alice("\\i test/sample/completions.sql\nSET client_min_messages = warning; CALL rbr_featurize('completions', 'paper')");
my $nrows = alice("SELECT count(*) FROM completions");
my $needed = alice("SELECT total FROM rbr.featurize_progress WHERE source = 'completions'::regclass");
ok($nrows > 100 && $needed > 0, "local sample: $nrows completions, $needed values graded");
# the fitting table: one row per completion with its feature vector (the features row as
# jsonb in a subquery, so that Citus can send it to the workers of a distributed source)
my $fitcols = "c.id, c.prompt_id::text AS prompt_id, c.response_type, c.tier, c.rm, c.labels, "
            . "rbr_feature_vector('paper', c.response_type, f.row) AS features";
sub fit_from { "FROM $_[0] c JOIN (SELECT id, to_jsonb(x) AS row FROM $_[0]_features x) f USING (id)" }
alice(<<"SQL");
CREATE TABLE lfit AS SELECT $fitcols @{[fit_from('completions')]};
SELECT m.response_type FROM (SELECT response_type, rbr_fit(prompt_id, tier, features, rm) AS fit FROM lfit
                              GROUP BY response_type HAVING count(DISTINCT tier) > 1) s,
       LATERAL rbr_model_save('v1', 'paper', s.response_type, s.fit) m;
SQL
my $models = q_ok($C, "SELECT string_agg(response_type || ':' || array_to_string(weights, ','), ' ' ORDER BY response_type) FROM rbr.model");
ok(alice("SELECT count(*) FROM rbr.model") > 0, 'model v1 saved');
is(q_ok($W1, "SELECT string_agg(response_type || ':' || array_to_string(weights, ','), ' ' ORDER BY response_type) FROM rbr.model"),
   $models, 'rbr_model_save copies the model to the worker, weights exact');
alice("SELECT rbr_model_save('scratch', 'paper', response_type, report) FROM rbr.model WHERE name = 'v1'");
is(q_ok($W1, "SELECT count(*) FROM rbr.model WHERE name = 'scratch'"), alice("SELECT count(*) FROM rbr.model WHERE name = 'v1'"),
   'a second model is copied');
alice("DELETE FROM rbr.model WHERE name = 'scratch'");
# attack, for models: a model name bob owns on a worker is not replaced by alice's
q_ok($W1, "INSERT INTO rbr.model (name, response_type, policy, policy_version, feature_names, weights, report, owner) "
        . "SELECT 'mtaken', response_type, policy, policy_version, feature_names, weights, report, 'bob' FROM rbr.model "
        . "WHERE name = 'v1' LIMIT 1");
my $w_before = q_ok($W1, "SELECT weights FROM rbr.model WHERE name = 'mtaken'");
(undef, $e, $rc) = sq($C, "SELECT rbr_model_save('mtaken', 'paper', response_type, '{\"weights\": []}'::jsonb || "
                        . "jsonb_build_object('weights', (SELECT jsonb_agg(0) FROM unnest(weights))) ) FROM rbr.model "
                        . "WHERE name = 'v1' LIMIT 1", user => 'alice');
ok($rc != 0 && $e =~ /model 'mtaken' belongs to another role/, "saving a model name that another role owns on a worker fails")
    or diag($e);
is(q_ok($W1, "SELECT owner::text || ' ' || (weights = '$w_before') FROM rbr.model WHERE name = 'mtaken'"), 'bob true',
   "... and bob's model on the worker is unchanged");
is(q_ok($C, "SELECT count(*) FROM rbr.model WHERE name = 'mtaken'"), 0, '... and nothing is stored on the coordinator');
q_ok($W1, "DELETE FROM rbr.model WHERE name = 'mtaken'");
# a role that exists on the coordinator only: its load fails and says why
q_ok($C, "SET citus.enable_create_role_propagation = off; CREATE ROLE carol LOGIN; RESET citus.enable_create_role_propagation; "
       . "SELECT rbr_grant('carol', 'policies')");
(undef, $e, $rc) = sq($C, "SELECT rbr_policy_load('carols', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb)", user => 'carol');
ok($rc != 0 && $e =~ /role carol of a policy or model of the coordinator does not exist on this node/,
   'a policy of a role missing on a worker is not loaded, and the error says why') or diag($e);
is(q_ok($W1, "SELECT count(*) FROM rbr.model WHERE name = 'scratch'"), 0, 'deleting a model deletes it on the worker');

# --- a worker added later has rbr but none of the rows, until rbr_citus_sync()
q_ok($C, "SELECT citus_add_node('localhost', $W2)");
is(q_ok($W2, "SELECT extversion FROM pg_extension WHERE extname = 'rbr'"), $version, 'the new worker has rbr (Citus)');
is(q_ok($W2, "SELECT (SELECT count(*) FROM rbr.policy_version) + (SELECT count(*) FROM rbr.model)"), 0,
   '... and no policy or model yet');
my $pv_alice = alice("SELECT count(*) FROM rbr.policy_version");
my $md_alice = alice("SELECT count(*) FROM rbr.model");
is(alice("SELECT string_agg(format('%s %s %s %s', port, policy_versions, policy_versions_added, models), '; ' ORDER BY port) FROM rbr_citus_sync()"),
   "$W1 $pv_alice 0 $md_alice; $W2 $pv_alice $pv_alice $md_alice",
   "alice's rbr_citus_sync(): what she sees, added only where missing");
is(q_ok($W2, "SELECT string_agg(DISTINCT owner::text, ',') FROM rbr.policy_version"), 'alice,team',
   "... only the policies alice sees (hers and her group's): bob's is not hers to copy");
is(q_ok($W2, "SELECT string_agg(response_type || ':' || array_to_string(weights, ','), ' ' ORDER BY response_type) FROM rbr.model"),
   $models, '... and her model, weights exact');
is(alice("SELECT string_agg(format('%s %s %s', policy_versions_added, models_changed, removed), '; ') FROM rbr_citus_sync()"), '0 0 0; 0 0 0',
   'rbr_citus_sync() again changes nothing');
q_ok($C, "SELECT count(*) FROM rbr_citus_sync()");
is(q_ok($W2, "SELECT owner FROM rbr.policy_version WHERE policy = 'bobs'"), 'bob', "the superuser's sync copies bob's too");

# --- (b) a distributed source (by its key) grades like a local one
alice(<<'SQL');
CREATE TABLE dcomp AS SELECT * FROM completions;
ALTER TABLE dcomp ADD PRIMARY KEY (id);
SET client_min_messages = warning;
SELECT create_distributed_table('dcomp', 'id');
SELECT truncate_local_data_after_distributing_table('dcomp');
SQL
is(q_ok($C, "SELECT count(DISTINCT nodeport) FROM citus_shards WHERE table_name = 'dcomp'::regclass"), 2,
   'dcomp has shards on both workers');
server_reset($base);
alice("SET rbr.grader_model = 'm-dist'; SET client_min_messages = warning; CALL rbr_featurize('dcomp', 'paper', '{\"chunk_rows\": 50}')");
my ($state, $done, $errors, $total, $requests) = split /\|/,
    alice("SELECT state, done, errors, total, requests FROM rbr.featurize_progress WHERE source = 'dcomp'::regclass");
is("$state $done $errors $total", "done $needed 0 $needed", 'distributed source: every needed value graded');
is(server_stats($base)->{chat_requests}, $requests, "... by requests to the grader ($requests; another model name: no cache)");
is(alice(<<'SQL'), 0, '... the same features as the local table');
SELECT count(*) FROM completions_features l FULL JOIN dcomp_features d USING (id)
 WHERE l.id IS NULL OR d.id IS NULL OR (to_jsonb(l) - 'id') IS DISTINCT FROM (to_jsonb(d) - 'id')
SQL
is(q_ok($C, "SELECT count(*) FROM pg_dist_partition WHERE logicalrelid IN ('dcomp_features'::regclass, 'dcomp_grades'::regclass)"),
   0, '... in coordinator-local features and grades tables');
server_reset($base);
alice("SET rbr.grader_model = 'm-dist'; SET client_min_messages = warning; CALL rbr_featurize('dcomp', 'paper')");
is(server_stats($base)->{chat_requests}, 0, 'a rerun on the complete distributed source sends nothing');

# --- (c) scoring pushed down: rbr_classify, rbr_reward with the stored model
alice(<<"SQL");
CREATE TABLE dfit AS SELECT $fitcols @{[fit_from('dcomp')]};
SET client_min_messages = warning;
SELECT create_distributed_table('dfit', 'prompt_id');
SELECT truncate_local_data_after_distributing_table('dfit');
SQL
# the response types the model has weights for (those with more than one tier)
my $rts = alice("SELECT string_agg(quote_literal(response_type), ', ') FROM "
              . "(SELECT response_type FROM lfit GROUP BY 1 HAVING count(DISTINCT tier) > 1) s");
my $plan = alice("SET citus.explain_all_tasks = on; EXPLAIN (VERBOSE, COSTS OFF) "
               . "SELECT id, rbr_reward('v1', response_type, features, rm) FROM dfit WHERE response_type IN ($rts)");
like($plan, qr/Query: SELECT .*public\.rbr_reward\('v1'::text/, 'rbr_reward(model, ...) is in the query sent to the workers');
ok($plan =~ /port=$W1/ && $plan =~ /port=$W2/, '... on both workers');
like($plan, qr/->\s+Seq Scan on public\.dfit_\d+ dfit\s+Output: .*rbr_reward\('v1'::text/s, '... evaluated in the worker\'s scan');
my $scored = alice("SELECT count(*) FROM dfit WHERE response_type IN ($rts)");
ok($scored > 0, "$scored rows scored");
is(alice(<<"SQL"), "0|$scored", 'rbr_reward on the distributed table equals the local table\'s, exactly');
WITH d AS (SELECT id, rbr_reward('v1', response_type, features, rm) AS r FROM dfit WHERE response_type IN ($rts)),
     l AS (SELECT id, rbr_reward('v1', response_type, features, rm) AS r FROM lfit WHERE response_type IN ($rts))
SELECT count(*) FILTER (WHERE d.r IS DISTINCT FROM l.r), count(*) FROM d FULL JOIN l USING (id)
SQL
$plan = alice("SET citus.explain_all_tasks = on; EXPLAIN (VERBOSE, COSTS OFF) "
            . "SELECT id, rbr_classify('paper', response_type, labels) FROM dcomp");
like($plan, qr/Query: SELECT .*public\.rbr_classify\('paper'::text/, 'rbr_classify is in the query sent to the workers');
ok($plan =~ /port=$W1/ && $plan =~ /port=$W2/, '... on both workers (the second one synced)');
is(alice(<<'SQL'), "0|$nrows", 'rbr_classify on the distributed table equals the local table\'s');
WITH d AS (SELECT id, rbr_classify('paper', response_type, labels) AS k FROM dcomp),
     l AS (SELECT id, rbr_classify('paper', response_type, labels) AS k FROM completions)
SELECT count(*) FILTER (WHERE d.k IS DISTINCT FROM l.k), count(*) FROM d FULL JOIN l USING (id)
SQL
(undef, $e, $rc) = sq($C, "SELECT count(rbr_classify('paper', response_type, labels)) FROM dcomp", user => 'bob');
like($e, qr/permission denied for table dcomp/, "bob cannot read alice's table (and would not see her policy on the workers)");
q_ok($C, "GRANT SELECT ON dcomp TO bob");
(undef, $e, $rc) = sq($C, "SELECT count(rbr_classify('paper', response_type, labels)) FROM dcomp", user => 'bob');
like($e, qr/policy "paper" does not exist/, "row security holds on the workers: bob's query there does not see alice's policy");

# --- (a) fitting and evaluation grouped by a column other than the distribution column
q_ok($C, <<'SQL');
SELECT setseed(0.1);
CREATE TABLE comp AS
SELECT g::text AS prompt, CASE WHEN g % 2 = 0 THEN 'hard_refuse' ELSE 'comply' END AS rt, c AS tier,
       ARRAY[least(1, (c = 0)::int * 0.7 + random() * 0.3), least(1, (c = 2)::int * 0.6 + random() * 0.4),
             random()]::float8[] AS f,
       (c = 2)::int * 0.8 + random() AS rm
  FROM generate_series(1, 4000) g, generate_series(0, 2) c, generate_series(1, 3) k;
CREATE TABLE dcompfit AS SELECT * FROM comp;
SET client_min_messages = warning;
SELECT create_distributed_table('dcompfit', 'prompt');
SELECT truncate_local_data_after_distributing_table('dcompfit');
SQL
my $fitq = "SELECT rt, rbr_fit(prompt, tier, f, rm) AS r FROM %s GROUP BY rt";
my $accq = "SELECT rt, rbr_pair_accuracy(prompt, tier, rm) AS r FROM %s GROUP BY rt";
for my $case (['rbr_fit', $fitq], ['rbr_pair_accuracy', $accq]) {
    my ($name, $q) = @$case;
    is(q_ok($C, sprintf("SELECT (SELECT jsonb_object_agg(rt, r) FROM ($q) s) = (SELECT jsonb_object_agg(rt, r) FROM ($q) s)",
                        'dcompfit', 'comp')),
       't', "$name GROUP BY rt: the distributed table gives the local table's result");
    my $explain = q_ok($C, "SET citus.explain_all_tasks = on; EXPLAIN (VERBOSE, COSTS OFF) " . sprintf($q, 'dcompfit'));
    # what the workers send: each task's query run on its node, its rows in text form
    # (EXPLAIN ANALYZE of Citus 13.2 fails on worker_partial_agg's cstring column)
    my ($sent, $tasks) = (0, 0);
    while ($explain =~ /Query: (SELECT [^\n]*)\n\s*Node: host=localhost port=(\d+)/g) {
        my ($tq, $tport) = ($1, $2);
        $sent += q_ok($tport, "SELECT COALESCE(sum(octet_length(t::text)), 0) FROM ($tq) t");
        $tasks++;
    }
    my ($rows, $raw) = split /\|/, q_ok($C, "SELECT count(*), sum(octet_length(c::text)) FROM comp c");
    my $stype = q_ok($C, "SELECT string_agg(DISTINCT a.aggtranstype::regtype::text, ',') FROM pg_aggregate a "
                         . "JOIN pg_proc p ON p.oid = a.aggfnoid WHERE p.proname = '$name'");
    ok($tasks == 32 && $sent > 0, "$name: $tasks tasks send $sent bytes");
    diag(sprintf("%s GROUP BY rt over %d rows (%d bytes as text) in %d shards, state type %s: the workers send %d bytes "
                 . "(%.1f per row); measured by running each task query of SET citus.explain_all_tasks = on; "
                 . "EXPLAIN (VERBOSE) %s on its worker as SELECT sum(octet_length(t::text)) FROM (<task query>) t",
                 $name, $rows, $raw, $tasks, $stype, $sent, $sent / $rows, sprintf($q, 'dcompfit')));
    is($stype, 'rbr.fit_rows', "$name: the state type has text I/O, so Citus can ship it");
    like($explain, qr/Query: SELECT .*worker_partial_agg\(/, "$name GROUP BY rt: partial aggregation on the workers (EXPLAIN)");
    like($explain, qr/coord_combine_agg\(/, "$name GROUP BY rt: the coordinator combines the partial states");
}

# two-level pair accuracy: rbr_pair_counts grouped by the distribution column runs whole on the workers
is(q_ok($C, "SELECT (SELECT jsonb_object_agg(rt, a) FROM (SELECT rt, sum((c).correct)::float8 / sum((c).pairs) AS a"
          . " FROM (SELECT rt, rbr_pair_counts(prompt, tier, rm) AS c FROM dcompfit GROUP BY rt, prompt) s GROUP BY rt) x)"
          . " = (SELECT jsonb_object_agg(rt, r) FROM (" . sprintf($accq, 'comp') . ") y)"),
   't', 'rbr_pair_counts by prompt on the workers, summed: equals rbr_pair_accuracy of the local table');
# rbr_fit_table over the distributed table: the optimum of rbr_fit on the local table, without gathering
my $ft = q_ok($C, "SELECT rbr_fit_table('dcompfit', 'prompt', 'tier', 'f', 'rm', '{}', 'rt', 'comply')");
my $fl = q_ok($C, "SELECT r FROM (" . sprintf($fitq, 'comp') . ") s WHERE rt = 'comply'");
my ($ot) = $ft =~ /"objective": ([-0-9.e]+)/;
my ($ol) = $fl =~ /"objective": ([-0-9.e]+)/;
ok(defined $ot && defined $ol && abs($ot - $ol) <= 1e-6 * abs($ol) + 1e-9,
   "rbr_fit_table over the distributed table reaches rbr_fit's optimum ($ot against $ol)") or diag("$ft\n$fl");
like($ft, qr/"converged": true/, 'rbr_fit_table on Citus: converged with a certified gap');
my $pq = q_ok($C, "SELECT rbr.fit_table_pass_query('dcompfit', 'prompt', 'tier', 'f', 'rm', '{}', 'rt', 'comply')");
my $pe = q_ok($C, "PREPARE p(float8[], text) AS $pq; SET citus.explain_all_tasks = on;"
               . " EXPLAIN (VERBOSE, COSTS OFF) EXECUTE p('{}', 'comply')");
like($pe, qr/Task Count: 32/, 'a pass of rbr_fit_table runs on the shards (one task per shard)') or diag($pe);

# --- a worker that is down: the load fails; a worker that kept the failed load's version gets
# the coordinator's next one (same name and number, another spec) in its place
my $w2dir = $nodes[2];
my ($so, $se) = ('', '');
run([as_owner("$bindir/pg_ctl", '-D', "$w2dir/data", '-m', 'fast', '-w', 'stop')], '>', \$so, '2>', \$se) or die $se;
(undef, $e, $rc) = sq($C, "SELECT rbr_policy_load('down', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb)", user => 'alice');
ok($rc != 0 && $e =~ /could not copy policies and models to every Citus worker/ && $e =~ /$W2/,
   'with a worker down the load fails, naming the worker') or diag($e);
is(q_ok($C, "SELECT count(*) FROM rbr.policy_version WHERE policy = 'down'"), 0, '... and the coordinator has no such policy');
is(q_ok($W1, "SELECT count(*) FROM rbr.policy_version WHERE policy = 'down'"), 1, '... though the worker that was up kept it');
run([as_owner("$bindir/pg_ctl", '-D', "$w2dir/data", '-l', "$w2dir/server.log", '-w', '-t', '60', 'start')],
    '>', \$so, '2>', \$se) or die $se;
alice("SELECT rbr_policy_load('down', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb || '{\"features\": {\"comply\": [\"apology\", \"ideal\"]}}')");
my $spec_c = q_ok($C, "SELECT md5(spec::text) FROM rbr.policy_version WHERE policy = 'down' AND version = 1");
is(on_workers("SELECT md5(spec::text) FROM rbr.policy_version WHERE policy = 'down'"), "$spec_c / $spec_c",
   "once the worker is back, both workers have the coordinator's version 1 (the kept one replaced)");

# --- the workers mirror the coordinator
# rows the coordinator no longer has (deleted while a worker was down, say), made here on a worker
my $mk_stale = "INSERT INTO rbr.policy_version (policy, version, spec, owner) SELECT 'stale_' || o, 1, spec, o::regrole "
             . "FROM rbr.policy_version, (VALUES ('alice'), ('bob')) r(o) WHERE policy = 'paper' AND version = 1; "
             . "INSERT INTO rbr.model (name, response_type, policy, policy_version, feature_names, weights, report, owner) "
             . "SELECT 'stale_' || o, response_type, policy, policy_version, feature_names, weights, report, o::regrole "
             . "FROM rbr.model, (VALUES ('alice'), ('bob')) r(o) WHERE name = 'v1'";
q_ok($W2, $mk_stale);
my $nrt = alice("SELECT count(*) FROM rbr.model WHERE name = 'v1'");
my $stale = "SELECT string_agg(DISTINCT owner::text, ',' ORDER BY owner::text) FROM "
          . "(SELECT owner FROM rbr.policy_version WHERE policy LIKE 'stale%' UNION ALL SELECT owner FROM rbr.model WHERE name LIKE 'stale%') s";
is(alice("SELECT string_agg(format('%s %s', port, removed), '; ' ORDER BY port) FROM rbr_citus_sync()"),
   "$W1 0; $W2 0", "alice's rbr_citus_sync() copies but removes nothing (only a superuser's mirrors)");
is(q_ok($W2, $stale), 'alice,bob', '... so the stale rows stay');
is(q_ok($C, "SELECT string_agg(format('%s %s', port, removed), '; ' ORDER BY port) FROM rbr_citus_sync()"),
   "$W1 0; $W2 " . (2 + 2 * $nrt), "the superuser's sync removes every stale version and model from the worker");
is(q_ok($W2, $stale) // '', '', '... alice\'s and bob\'s');
my $all_c = "SELECT (SELECT count(*) FROM rbr.policy_version) || ' ' || (SELECT count(*) FROM rbr.model)";
my $counts = q_ok($C, $all_c);
is(on_workers($all_c), "$counts / $counts", '... and every row the coordinator has stays on the workers');

# a policy being stored in another transaction: the mirror waits for it (its copy at commit
# would race the mirror's removal), and then carries it
my ($bo, $be) = ('', '');
my $bsql = "BEGIN; SELECT rbr_policy_load('held', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb); SELECT pg_sleep(3); COMMIT;";
my $bg = start(["$bindir/psql", '-X', '-q', '-A', '-t', '-h', 'localhost', '-p', $C, '-v', 'ON_ERROR_STOP=1',
                '-U', 'alice', '-d', 'postgres', '-c', $bsql], '>', \$bo, '2>', \$be, timeout(120));
my $held = 0;
for (1 .. 100) {
    $held = q_ok($C, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'alice' "
                   . "AND l.relation = 'rbr.policy_version'::regclass AND l.mode = 'RowExclusiveLock' AND l.granted");
    last if $held;
    select(undef, undef, undef, 0.05);
}
ok($held, 'a load is in flight');
(undef, $e, $rc) = sq($C, "SET lock_timeout = '300ms'; SELECT count(*) FROM rbr_citus_sync()");
ok($rc != 0 && $e =~ /lock timeout/, 'rbr_citus_sync() waits for it (here: until lock_timeout)') or diag($e);
finish($bg) or diag("background load: $be");
q_ok($C, "SELECT count(*) FROM rbr_citus_sync()");
is(on_workers("SELECT count(*) FROM rbr.policy_version WHERE policy = 'held'"), '1 / 1',
   '... and once it committed, both workers have it');

# attack: a role that keeps its transaction open after rbr_citus_sync() holds no lock
# that would stop other roles' loads
($bo, $be) = ('', '');
$bsql = "BEGIN; SELECT count(*) FROM rbr_citus_sync(); SELECT pg_sleep(3); COMMIT;";
$bg = start(["$bindir/psql", '-X', '-q', '-A', '-t', '-h', 'localhost', '-p', $C, '-v', 'ON_ERROR_STOP=1',
             '-U', 'alice', '-d', 'postgres', '-c', $bsql], '>', \$bo, '2>', \$be, timeout(120));
for (1 .. 100) {
    last if q_ok($C, "SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice' AND query LIKE '%pg_sleep%' AND state = 'active'");
    select(undef, undef, undef, 0.05);
}
(undef, $e, $rc) = sq($C, "SET lock_timeout = '500ms'; SELECT rbr_policy_load('bobs_next', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb)",
                      user => 'bob');
is($rc, 0, "bob loads a policy while alice's transaction with rbr_citus_sync() is still open") or diag($e);
finish($bg) or diag("alice's open sync: $be");

# TRUNCATE: mirrored at commit, and not at all when rolled back
q_ok($C, "BEGIN; TRUNCATE rbr.model; ROLLBACK");
is(on_workers("SELECT count(*) FROM rbr.model"), join(' / ', (q_ok($C, "SELECT count(*) FROM rbr.model")) x 2),
   'a TRUNCATE of rbr.model that is rolled back leaves the workers as they were');
q_ok($C, "BEGIN; TRUNCATE rbr.model; TRUNCATE rbr.model; COMMIT");
is(on_workers("SELECT count(*) FROM rbr.model"), '0 / 0', 'a committed TRUNCATE of rbr.model empties it on the workers');
is(on_workers("SELECT count(*) FROM rbr.policy_version"), join(' / ', (q_ok($C, "SELECT count(*) FROM rbr.policy_version")) x 2),
   "... and leaves the policy versions");
q_ok($C, "TRUNCATE rbr.policy_version CASCADE");
is(on_workers("SELECT count(*) FROM rbr.policy_version"), '0 / 0', 'TRUNCATE rbr.policy_version CASCADE: the workers have none');
is(q_ok($C, "SELECT count(*) FROM rbr.citus_resync"), 0, 'no mirror request is left behind');
(undef, $e, $rc) = sq($C, "INSERT INTO rbr.citus_resync DEFAULT VALUES", user => 'alice');
like($e, qr/permission denied for table citus_resync/, 'a role cannot ask for a mirror by writing rbr.citus_resync');

done_testing();

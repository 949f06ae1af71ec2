# Helpers for rbr's integration tests: a scratch database on the cluster of
# test/run.sh (PGHOST/PGPORT/PGUSER), psql, and the test grader server.
package RbrTest;
use strict;
use warnings;
use IPC::Run qw(start finish pump timeout);
use HTTP::Tiny;
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use Time::HiRes qw(time sleep);
use Exporter 'import';
our @EXPORT = qw(psql psql_ok start_server stop_server server_stats server_reset server_config
                 new_db drop_db bg_psql mk_prompts synth_run_row REPO REFERENCE);

use constant REPO => abs_path(dirname(__FILE__) . '/../..');
use constant REFERENCE => abs_path(REPO . '/../shared/reference') // '/work/shared/reference';

our $DB;
my @servers;

# Create a scratch database with rbr and the reference policy loaded as 'ref'.
sub new_db {
    my ($name) = @_;
    $DB = $name;
    system('psql', '-X', '-q', '-d', 'postgres', '-c', qq{DROP DATABASE IF EXISTS "$name"}) == 0 or die;
    system('psql', '-X', '-q', '-d', 'postgres', '-c', qq{CREATE DATABASE "$name"}) == 0 or die;
    # read the policy here (the server's user may not be able to traverse the checkout)
    open(my $fh, '<', REFERENCE . '/policy.json') or die "policy.json: $!";
    my $policy = do { local $/; <$fh> };
    close $fh;
    die "unexpected quote tag in policy.json" if $policy =~ /\$rbrpolicy\$/;
    psql_ok(qq{CREATE EXTENSION rbr; SELECT rbr_policy_load('ref', \$rbrpolicy\$$policy\$rbrpolicy\$::jsonb)});
}

sub drop_db {
    system('psql', '-X', '-q', '-d', 'postgres', '-c', qq{DROP DATABASE IF EXISTS "$DB" WITH (FORCE)}) if $DB;
}

# Run SQL in one session; returns (stdout, stderr, exit code). Unaligned, tuples only.
sub psql {
    my ($sql, %o) = @_;
    my ($out, $err) = ('', '');
    my @cmd = ('psql', '-X', '-q', '-A', '-t', '-v', 'VERBOSITY=verbose', '-d', $o{db} // $DB);
    push @cmd, '-v', 'ON_ERROR_STOP=1' unless $o{keep_going};
    IPC::Run::run(\@cmd, '<', \$sql, '>', \$out, '2>', \$err, timeout($o{timeout} // 300));
    my $rc = $? >> 8;
    chomp $out;
    return wantarray ? ($out, $err, $rc) : $out;
}

# Like psql, but die with the error output on failure.
sub psql_ok {
    my ($sql, %o) = @_;
    my ($out, $err, $rc) = psql($sql, %o);
    die "psql failed ($rc): $err\nSQL: $sql\n" if $rc != 0;
    return $out;
}

# A psql session in the background: returns the IPC::Run harness and refs to its output.
sub bg_psql {
    my ($sql, %o) = @_;
    my ($out, $err) = ('', '');
    require File::Temp;
    my $f = File::Temp->new(SUFFIX => '.sql');
    print $f $sql;
    close $f;
    my @cmd = ('psql', '-X', '-q', '-A', '-t', '-v', 'VERBOSITY=verbose', '-d', $o{db} // $DB, '-f', $f->filename);
    my $h = start(\@cmd, '<', \undef, '>', \$out, '2>', \$err, timeout($o{timeout} // 300));
    $h->{rbr_tmp} = $f;
    return ($h, \$out, \$err);
}

# A prompts table $t of $n rows (id int, prompt jsonb, response_type text):
# one user message "$text <id>" each, response types in turn.
my @PROMPT_TYPES = ('hard_refuse', 'comply', 'Safe Refuse 1', 'safe_refuse_2');
sub mk_prompts {
    my ($t, $n, $text) = @_;
    $text //= 'question';
    my $rows = join(', ', map {
        my $rt = $PROMPT_TYPES[($_ - 1) % 4];
        "($_, '[{\"role\": \"user\", \"content\": \"$text $_\"}]', '$rt')"
    } 1 .. $n);
    psql_ok("CREATE TABLE $t (id int PRIMARY KEY, prompt jsonb, response_type text); INSERT INTO $t VALUES $rows");
}

# The given columns of the latest rbr.synth_progress row of table $t, as a list.
sub synth_run_row {
    my ($t, $cols) = @_;
    return split /\|/, psql_ok("SELECT $cols FROM rbr.synth_progress WHERE source = '$t'::regclass ORDER BY run_id DESC LIMIT 1");
}

# Start the test grader on a free 127.0.0.1 port; returns its base URL (.../v1).
sub start_server {
    my (@args) = @_;
    my ($out, $err) = ('', '');
    my $js = REPO . '/test/grader-server/server.js';
    my $h = start(['node', $js, '--port', '0', @args], '>', \$out, '2>', \$err, timeout(30));
    pump $h until $out =~ /listening on 127\.0\.0\.1:(\d+)/;
    my $port = $1;
    $h->{timeout} = undef;
    push @servers, $h;
    return ("http://127.0.0.1:$port", $h);
}

sub stop_server {
    my ($h) = @_;
    $h->signal('TERM');
    eval { finish $h };
    @servers = grep { $_ != $h } @servers;
}

my $http = HTTP::Tiny->new(timeout => 10);

sub server_stats {
    my ($base) = @_;
    my $r = $http->get("$base/admin/stats");
    die "stats: $r->{status}" unless $r->{success};
    require JSON::PP;
    return JSON::PP::decode_json($r->{content});
}

sub server_reset {
    my ($base) = @_;
    $http->post("$base/admin/reset", { content => '{}' });
}

sub server_config {
    my ($base, $json) = @_;
    my $r = $http->post("$base/admin/config", { content => $json, headers => { 'content-type' => 'application/json' } });
    die "config: $r->{content}" unless $r->{success};
}

END {
    for my $h (@servers) { $h->signal('TERM'); eval { $h->finish }; }
}

1;

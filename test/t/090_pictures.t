# The SVG pictures in a browser: rbr_reward_figure_svg, rbr_reliability_svg
# and rbr_histogram_svg are well-formed XML with a viewBox, and headless
# Chromium renders each to a PNG of the picture's size that is not blank and
# shows the picture's own colours. Without chromium (test/setup.sh installs
# it) or xmllint (libxml2-utils) the checks that need them are skipped, saying why.
use strict;
use warnings;
use FindBin;
use lib $FindBin::Bin;
use RbrTest;
use Test::More;
use File::Temp qw(tempdir);
use Compress::Zlib qw(uncompress);
use IPC::Run qw(run timeout);

new_db('rbr_tap_pictures');
# RBR_PICTURES_OUT=dir keeps the SVG and PNG files there to look at
my $dir = $ENV{RBR_PICTURES_OUT} || tempdir(CLEANUP => 1);

# Three response types, 30 prompts each with one completion per class; the
# RBR term separates the classes, the RM term prefers the worse ones.
psql_ok(q{
CREATE TABLE scored AS
SELECT p::text AS prompt, rt, label, tier,
       0.4 * tier + 0.3 * sin(p * 7 + tier) AS rm,
       -1.5 * tier + 0.5 * cos(p * 3 + tier * 5) AS rbr
  FROM generate_series(1, 30) p,
       (VALUES ('comply', 'ideal', 0), ('comply', 'minimum_acceptable_style', 1),
               ('comply', 'unacceptable_completion', 2), ('comply', 'illogical_completion', 3),
               ('hard_refuse', 'ideal', 0), ('hard_refuse', 'unacceptable_completion', 2),
               ('hard_refuse', 'disallowed_completion', 4),
               ('Safe <&> "type"', 'ideal', 0), ('Safe <&> "type"', 'a & b < c', 1)) c(rt, label, tier);
-- a grader with graded confidence: P(yes) spread over the bins
CREATE TABLE graded AS
SELECT jsonb_build_object('apology', g % 3 = 0, 'judgement', g % 5 = 0, 'x<y', g % 2 = 0) AS labels,
       jsonb_build_object('apology', least(0.99, (g % 3 = 0)::int * 0.6 + (g % 7) / 16.0),
                          'judgement', (g % 11) / 11.0, 'x<y', CASE WHEN g % 2 = 0 THEN 0.97 ELSE 0.02 END) AS probs
  FROM generate_series(1, 400) g;
});

my %pictures = (
    reward_figure => ["SELECT rbr_reward_figure_svg(array_agg(prompt), array_agg(rt), array_agg(label), array_agg(tier),"
                      . " array_agg(rm), array_agg(rbr)) FROM scored",
                      [[26, 152, 80], [103, 0, 31]]],       # best class green, worst class dark red
    reliability   => ["SELECT rbr_reliability_svg(rbr_grader_report(array_agg(labels), array_agg(probs))) FROM graded",
                      [[69, 117, 180]]],                    # the blue count bars
    histogram     => ["SELECT rbr_histogram_svg(array_agg(label ORDER BY tier), array_agg(rm + rbr ORDER BY tier)) FROM scored WHERE rt = 'comply'",
                      [[27, 158, 119]]],                    # the first label's swatch
);

my $xmllint = `command -v xmllint 2>/dev/null`;
chomp $xmllint;
my $chromium = '';
for my $c (qw(chromium chromium-browser google-chrome)) {
    my $p = `command -v $c 2>/dev/null`;
    chomp $p;
    if ($p) { $chromium = $p; last; }
}

for my $name (sort keys %pictures) {
    my ($sql, $colours) = @{ $pictures{$name} };
    my $svg = psql_ok($sql);
    my $file = "$dir/$name.svg";
    open(my $fh, '>', $file) or die "$file: $!";
    print $fh $svg;
    close $fh;

    like($svg, qr/^<svg xmlns="http:\/\/www\.w3\.org\/2000\/svg"/, "$name: an SVG document");
    unlike($svg, qr/<&>|"type""/, "$name: labels are escaped");
    my ($w, $h) = $svg =~ /viewBox="0 0 (\d+) (\d+)"/;
    $w //= 0; $h //= 0;
    ok($w >= 400 && $h >= 300, "$name: a viewBox of a readable size (${w}x$h)");
    SKIP: {
        skip "$name: xmllint not installed (Debian package libxml2-utils), XML not checked", 1 unless $xmllint;
        my ($out, $err) = ('', '');
        run([$xmllint, '--noout', $file], '>', \$out, '2>', \$err);
        is($? >> 8, 0, "$name: well-formed XML") or diag($err);
    }
    SKIP: {
        skip "$name: chromium not installed (test/setup.sh installs it), not rendered", 4 unless $chromium;
        my $png = "$dir/$name.png";
        my ($out, $err) = ('', '');
        run([$chromium, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', '--mute-audio',
             "--user-data-dir=$dir/profile", "--window-size=$w,$h", "--screenshot=$png", "file://$file"],
            '<', \undef, '>', \$out, '2>', \$err, timeout(180));
        ok(-s $png && -s $png > 10_000, "$name: rendered to a PNG of " . (-s $png // 0) . ' bytes') or diag($err);
        my $img = eval { read_png($png) };
        ok($img, "$name: the PNG decodes") or diag($@);
        $img //= { width => 0, height => 0, pixels => {} , ink => 0 };
        is("$img->{width}x$img->{height}", "${w}x$h", "$name: the picture's size");
        my $distinct = keys %{ $img->{pixels} };
        my $ink = $img->{ink} / ($img->{width} * $img->{height} || 1);
        my @missing = grep { !$img->{pixels}{ join(',', @$_) } } @$colours;
        ok($distinct >= 20 && $ink > 0.02 && !@missing,
           sprintf("%s: not blank (%d colours, %.1f%% non-white, its own colours %s)", $name, $distinct, 100 * $ink,
                   @missing ? 'missing: ' . join(' ', map { '(' . join(',', @$_) . ')' } @missing) : 'present'));
    }
}

# A tiny PNG decoder (8-bit RGB or RGBA, not interlaced): the size, the
# distinct colours and the count of pixels that are not white.
sub read_png {
    my ($file) = @_;
    open(my $fh, '<:raw', $file) or die "$file: $!";
    my $data = do { local $/; <$fh> };
    close $fh;
    die "not a PNG\n" unless substr($data, 0, 8) eq "\x89PNG\r\n\x1a\n";
    my ($pos, $idat, $w, $h, $depth, $type, $interlace) = (8, '');
    while ($pos < length $data) {
        my ($len, $tag) = unpack('Na4', substr($data, $pos, 8));
        my $body = substr($data, $pos + 8, $len);
        $pos += 12 + $len;
        if ($tag eq 'IHDR') { ($w, $h, $depth, $type, undef, undef, $interlace) = unpack('NNCCCCC', $body) }
        elsif ($tag eq 'IDAT') { $idat .= $body }
        elsif ($tag eq 'IEND') { last }
    }
    die "unsupported PNG (depth $depth, colour type $type, interlace $interlace)\n"
        unless $depth == 8 && ($type == 2 || $type == 6) && !$interlace;
    my $bpp = $type == 6 ? 4 : 3;
    my $raw = uncompress($idat) // die "bad IDAT\n";
    my $stride = $w * $bpp;
    my (%pixels, $ink);
    my @prev = (0) x $stride;
    for my $y (0 .. $h - 1) {
        my $filter = ord substr($raw, $y * ($stride + 1), 1);
        my @cur = unpack('C*', substr($raw, $y * ($stride + 1) + 1, $stride));
        for my $i (0 .. $stride - 1) {
            my $a = $i >= $bpp ? $cur[$i - $bpp] : 0;
            my $b = $prev[$i];
            my $c = $i >= $bpp ? $prev[$i - $bpp] : 0;
            my $add = $filter == 0 ? 0 : $filter == 1 ? $a : $filter == 2 ? $b : $filter == 3 ? ($a + $b) >> 1
                    : do { my $p = $a + $b - $c; my ($pa, $pb, $pc) = (abs($p - $a), abs($p - $b), abs($p - $c));
                           $pa <= $pb && $pa <= $pc ? $a : $pb <= $pc ? $b : $c };
            $cur[$i] = ($cur[$i] + $add) & 255;
        }
        for (my $i = 0; $i < $stride; $i += $bpp) {
            my $key = "$cur[$i],$cur[$i + 1],$cur[$i + 2]";
            $pixels{$key}++;
            $ink++ if $key ne '255,255,255';
        }
        @prev = @cur;
    }
    return { width => $w, height => $h, pixels => \%pixels, ink => $ink // 0 };
}

drop_db();
done_testing();

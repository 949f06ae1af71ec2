-- rbr 0.1.0 -> 0.2.0 (ALTER EXTENSION rbr UPDATE TO '0.2.0').
--
-- After this script the catalog equals a fresh install of 0.2.0
-- (sql/rbr--0.2.0.sql); test/t/015_upgrade.t compares the two.
\echo Use "ALTER EXTENSION rbr UPDATE TO '0.2.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Privileges, owners and the run mechanism
-------------------------------------------------------------------------------

-- (end of privileges, owners and the run mechanism)

-------------------------------------------------------------------------------
-- Policies and models: hostile input
-------------------------------------------------------------------------------

-- (end of policies and models)

-------------------------------------------------------------------------------
-- Graders: request settings, answer reading, failures
-------------------------------------------------------------------------------

-- (end of graders)

-------------------------------------------------------------------------------
-- Keys and endpoint settings
-------------------------------------------------------------------------------

-- (end of keys)

-------------------------------------------------------------------------------
-- Pictures
-------------------------------------------------------------------------------
-- Plain SVG text (viewBox, fixed font sizes, escaped labels) that opens in a
-- browser; save one with
--   psql -XAtc "SELECT rbr_reward_figure_svg(...) FROM ..." -o rewards.svg

-- Text escaped for SVG/XML character data and attribute values.
CREATE FUNCTION rbr.svg_escape(t text) RETURNS text
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
SELECT pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
           coalesce(t, ''), '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), '"', '&quot;'), '''', '&#39;')
$$;

-- Axis ticks over [lo, hi]: about n round values (1, 2 or 5 times a power of
-- ten apart) that cover the range, as numerics of the step's precision.
CREATE FUNCTION rbr.svg_ticks(lo float8, hi float8, n int DEFAULT 6) RETURNS numeric[]
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    raw float8;  mag float8;  step float8;  digits int;  a float8;  b float8;
BEGIN
    IF hi <= lo THEN
        lo := lo - 0.5;  hi := hi + 0.5;
    END IF;
    raw := (hi - lo) / greatest(n - 1, 1);
    mag := power(10::float8, floor(log(raw)));
    step := CASE WHEN raw / mag <= 1 THEN 1 WHEN raw / mag <= 2 THEN 2 WHEN raw / mag <= 5 THEN 5 ELSE 10 END * mag;
    digits := greatest(0, -floor(log(step))::int);
    a := floor(lo / step + 1e-9) * step;
    b := ceil(hi / step - 1e-9) * step;
    RETURN ARRAY(SELECT round((a + k * step)::numeric, digits)
                   FROM generate_series(0, round((b - a) / step)::int) AS k);
END
$$;

-- The paper's reward-distribution figure: for each response type a row of
-- three panels (RM only, RM + RBR, RBR only), in each panel one histogram row
-- per class, best tier first. Every reward is centred on its prompt: minus
-- the mean reward of the prompt's best-tier completions (the lowest tier
-- among that prompt's rows), so 0 = as good as the prompt's best. One array
-- element per completion; call it with array_agg:
--   SELECT rbr_reward_figure_svg(array_agg(prompt_id::text), array_agg(response_type),
--                                array_agg(label), array_agg(tier), array_agg(rm), array_agg(rbr))
--     FROM scored;
-- Rows with a NULL or non-finite (NaN, infinite) input are left out, and
-- counted in the picture's footnote.
CREATE FUNCTION @extschema@.rbr_reward_figure_svg(prompt_ids text[], response_types text[], labels text[],
                                                  tiers int[], rm float8[], rbr float8[], bins int DEFAULT 24,
                                                  title text DEFAULT 'Reward per completion class: RM only, RM + RBR, RBR only')
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    -- green (best class) to red (worst class)
    colors constant text[] := ARRAY['#1a9850', '#91cf60', '#d9ef8b', '#fee08b', '#fc8d59', '#d73027', '#a50026', '#67001f'];
    signals constant text[] := ARRAY['RM only', 'RM + RBR', 'RBR only'];
    margin constant int := 20;  lab_w constant int := 210;  panel_w constant int := 250;  gap constant int := 30;
    row_h constant int := 30;  head_h constant int := 48;  axis_h constant int := 50;  top_h constant int := 112;
    n_in int;  n_ok int;  w int;  h int;  y0 int;  x0 int;  py int;  i int;  sig int;  col int;
    v_rt text[];  v_lab text[];  v_tier int[];  v_sig int[];  v_val float8[];
    grp record;  cls record;  b record;  lo float8;  hi float8;  ticks numeric[];  tk numeric;  px float8;  top float8;
    svg text;  body text := '';
BEGIN
    IF bins IS NULL OR bins < 1 OR bins > 200 THEN
        RAISE EXCEPTION 'bins must be between 1 and 200' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    n_in := coalesce(cardinality(prompt_ids), 0);
    IF coalesce(cardinality(response_types), 0) <> n_in OR coalesce(cardinality(labels), 0) <> n_in
       OR coalesce(cardinality(tiers), 0) <> n_in OR coalesce(cardinality(rm), 0) <> n_in
       OR coalesce(cardinality(rbr), 0) <> n_in THEN
        RAISE EXCEPTION 'the six arrays have different lengths'
            USING ERRCODE = 'array_subscript_error',
                  HINT = 'Aggregate all of them in one pass: rbr_reward_figure_svg(array_agg(prompt_id::text), array_agg(response_type), array_agg(label), array_agg(tier), array_agg(rm), array_agg(rbr)).';
    END IF;

    -- one element per (usable completion, signal): the centred reward
    WITH u AS (
        SELECT x.p, x.rt, coalesce(x.l, '(no class)') AS l, x.t, x.rm, x.rbr
          FROM unnest(prompt_ids, response_types, labels, tiers, rm, rbr) AS x(p, rt, l, t, rm, rbr)
         WHERE x.p IS NOT NULL AND x.rt IS NOT NULL AND x.t IS NOT NULL AND x.rm IS NOT NULL AND x.rbr IS NOT NULL
           AND x.rm NOT IN ('NaN', 'Infinity', '-Infinity') AND x.rbr NOT IN ('NaN', 'Infinity', '-Infinity')
    ), sv AS (
        SELECT u.p, u.rt, u.l, u.t, g.s, CASE g.s WHEN 1 THEN u.rm WHEN 2 THEN u.rm + u.rbr ELSE u.rbr END AS v,
               min(u.t) OVER (PARTITION BY u.rt, u.p) AS best
          FROM u CROSS JOIN generate_series(1, 3) AS g(s)
    ), c AS (
        SELECT rt, l, t, s, v - avg(v) FILTER (WHERE t = best) OVER (PARTITION BY rt, p, s) AS cv FROM sv
    )
    SELECT array_agg(rt), array_agg(l), array_agg(t), array_agg(s), array_agg(cv)
      INTO v_rt, v_lab, v_tier, v_sig, v_val FROM c;
    n_ok := coalesce(cardinality(v_val), 0) / 3;
    IF n_ok = 0 THEN
        RAISE EXCEPTION 'no completions to draw'
            USING ERRCODE = 'no_data_found',
                  DETAIL = format('%s rows given, none with a prompt, response type, tier and finite rm and rbr.', n_in);
    END IF;

    w := 2 * margin + lab_w + 3 * panel_w + 2 * gap;
    y0 := top_h;
    FOR grp IN SELECT x.rt, count(DISTINCT x.l) AS ncls, count(*) / 3 AS n
                FROM unnest(v_rt, v_lab) AS x(rt, l) GROUP BY x.rt ORDER BY x.rt LOOP
        body := body || format('<text x="%s" y="%s" font-size="15" font-weight="bold">%s</text>', margin, y0 + 18,
                               rbr.svg_escape(grp.rt))
                     || format('<text x="%s" y="%s" font-size="12" fill="#555">%s completions, %s classes</text>',
                               margin, y0 + 36, grp.n, grp.ncls);
        FOR sig IN 1..3 LOOP
            x0 := margin + lab_w + (sig - 1) * (panel_w + gap);
            SELECT min(x.v), max(x.v) INTO lo, hi FROM unnest(v_rt, v_sig, v_val) AS x(rt, s, v)
             WHERE x.rt = grp.rt AND x.s = sig;
            ticks := rbr.svg_ticks(least(lo, 0), greatest(hi, 0), 6);
            lo := ticks[1];  hi := ticks[cardinality(ticks)];
            body := body || format('<text x="%s" y="%s" font-size="13" font-weight="bold" text-anchor="middle">%s</text>',
                                   x0 + panel_w / 2, y0 + 36, signals[sig])
                         || format('<rect x="%s" y="%s" width="%s" height="%s" fill="#f7f7f7" stroke="#ccc"/>',
                                   x0, y0 + head_h - 4, panel_w, grp.ncls * row_h + 4);
            -- grid lines, ticks and tick labels
            FOREACH tk IN ARRAY ticks LOOP
                px := round((x0 + (tk - lo) / (hi - lo) * panel_w)::numeric, 1);
                body := body || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s"%s/>', px, y0 + head_h - 4, px,
                                       y0 + head_h + grp.ncls * row_h,
                                       CASE WHEN tk = 0 THEN '#333' ELSE '#ddd' END,
                                       CASE WHEN tk = 0 THEN ' stroke-dasharray="4 3"' ELSE '' END)
                             || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', px,
                                       y0 + head_h + grp.ncls * row_h, px, y0 + head_h + grp.ncls * row_h + 5)
                             || format('<text x="%s" y="%s" font-size="11" text-anchor="middle">%s</text>', px,
                                       y0 + head_h + grp.ncls * row_h + 18, tk);
            END LOOP;
            body := body || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', x0, y0 + head_h + grp.ncls * row_h,
                                   x0 + panel_w, y0 + head_h + grp.ncls * row_h)
                         || format('<text x="%s" y="%s" font-size="11" text-anchor="middle" fill="#333">%s</text>',
                                   x0 + panel_w / 2, y0 + head_h + grp.ncls * row_h + 34,
                                   CASE sig WHEN 1 THEN 'RM reward' WHEN 2 THEN 'RM + RBR reward' ELSE 'RBR reward' END
                                   || ' minus prompt''s best (0 = best)');
            -- one row per class, best tier first
            i := 0;
            FOR cls IN SELECT x.l, min(x.t) AS tier, count(*) AS n, avg(x.v) AS mean
                         FROM unnest(v_rt, v_lab, v_tier, v_sig, v_val) AS x(rt, l, t, s, v)
                        WHERE x.rt = grp.rt AND x.s = sig GROUP BY x.l ORDER BY min(x.t), x.l LOOP
                i := i + 1;
                py := y0 + head_h + i * row_h;   -- the row's baseline
                -- spread the classes over the palette: first green, last red
                col := CASE WHEN grp.ncls = 1 THEN 1 ELSE 1 + round((i - 1) * 7.0 / (grp.ncls - 1))::int END;
                IF sig = 1 THEN
                    body := body || format('<rect x="%s" y="%s" width="12" height="12" fill="%s" stroke="#333" stroke-width="0.5"/>',
                                           margin, py - 25, colors[col])
                                 || format('<text x="%s" y="%s" font-size="12">%s</text>', margin + 18, py - 15,
                                           rbr.svg_escape(cls.l))
                                 || format('<text x="%s" y="%s" font-size="10" fill="#555">tier %s, %s completions</text>',
                                           margin + 18, py - 3, cls.tier, cls.n);
                END IF;
                SELECT max(cnt) INTO top FROM (
                    SELECT count(*) AS cnt FROM unnest(v_rt, v_lab, v_sig, v_val) AS x(rt, l, s, v)
                     WHERE x.rt = grp.rt AND x.l = cls.l AND x.s = sig
                     GROUP BY least(greatest(width_bucket(x.v, lo, hi, bins), 1), bins)) q;
                FOR b IN SELECT least(greatest(width_bucket(x.v, lo, hi, bins), 1), bins) AS k, count(*) AS cnt
                           FROM unnest(v_rt, v_lab, v_sig, v_val) AS x(rt, l, s, v)
                          WHERE x.rt = grp.rt AND x.l = cls.l AND x.s = sig GROUP BY 1 ORDER BY 1 LOOP
                    body := body || format('<rect x="%s" y="%s" width="%s" height="%s" fill="%s" stroke="#333" stroke-width="0.4"/>',
                                           round((x0 + (b.k - 1)::float8 / bins * panel_w)::numeric, 1),
                                           round((py - b.cnt / top * (row_h - 6))::numeric, 1),
                                           round((panel_w::float8 / bins)::numeric, 1),
                                           round((b.cnt / top * (row_h - 6))::numeric, 1), colors[col]);
                END LOOP;
                px := round((x0 + (cls.mean - lo) / (hi - lo) * panel_w)::numeric, 1);
                body := body || format('<path d="M%s %s l-4 -6 h8 z" fill="black"><title>mean %s</title></path>',
                                       px, py, trim_scale(round(cls.mean::numeric, 3)))
                             || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#bbb"/>', x0, py, x0 + panel_w, py);
            END LOOP;
        END LOOP;
        y0 := y0 + head_h + grp.ncls * row_h + axis_h + 10;
    END LOOP;
    h := y0 + 30;
    svg := format('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %s %s" width="%s" height="%s" font-family="DejaVu Sans, Arial, sans-serif">',
                  w, h, w, h)
        || format('<rect width="%s" height="%s" fill="white"/>', w, h)
        || format('<text x="%s" y="28" font-size="18" font-weight="bold">%s</text>', margin, rbr.svg_escape(title))
        || format('<text x="%s" y="50" font-size="12">x: a completion''s reward minus the mean reward of the best-tier completions of its prompt (0 = as good as the prompt''s best, below 0 = worse).</text>', margin)
        || format('<text x="%s" y="66" font-size="12">One row per class, in quality order: best tier at the top (green) to worst at the bottom (red). Bars: completions of the class per bin,</text>', margin)
        || format('<text x="%s" y="82" font-size="12">each row scaled to its own tallest bar; &#9660; = the class''s mean. A good reward keeps the top class at 0 and pushes worse classes left.</text>', margin)
        || body
        || format('<text x="%s" y="%s" font-size="11" fill="#555">%s completions drawn%s; %s bins per panel.</text>', margin, h - 12,
                  n_ok, CASE WHEN n_in > n_ok THEN format(', %s left out (NULL or non-finite input)', n_in - n_ok) ELSE '' END, bins);
    RETURN svg || '</svg>';
END
$$;

-- Reliability diagrams of a grader report (rbr_grader_report()): one panel
-- for all propositions, then one per proposition (all of them, or those
-- named), each with the mean P(yes) of a bin against the share labelled yes,
-- the diagonal of a calibrated grader, points sized by the bin's answers and a
-- strip of answers per bin. A panel whose answers fill at most two bins says
-- so: a grader with P(yes) near 0 or 1 has points only at the ends.
CREATE FUNCTION @extschema@.rbr_reliability_svg(report jsonb, propositions text[] DEFAULT NULL, columns int DEFAULT 4,
                                                title text DEFAULT 'Grader calibration per proposition')
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    cell_w constant int := 290;  cell_h constant int := 350;  plot constant int := 200;  pl constant int := 56;
    pt constant int := 42;  strip constant int := 34;  margin constant int := 20;  top_h constant int := 112;
    names text[];  name text;  part jsonb;  b jsonb;  i int := 0;  cx int;  cy int;  w int;  h int;  nrows int;
    maxc float8;  used int;  nbins int;  x float8;  y float8;  r float8;  pts text;  body text := '';  t float8;  skipped text;  note text;  note2 text;
BEGIN
    IF report IS NULL THEN
        RAISE EXCEPTION 'no report to draw' USING ERRCODE = 'no_data_found';
    END IF;
    IF jsonb_typeof(report -> 'all') IS DISTINCT FROM 'object' OR jsonb_typeof(report -> 'by_proposition') IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'not a grader report' USING ERRCODE = 'invalid_parameter_value',
            HINT = 'Pass the jsonb that rbr_grader_report() returned.';
    END IF;
    IF columns IS NULL OR columns < 1 OR columns > 20 THEN
        RAISE EXCEPTION 'columns must be between 1 and 20' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF propositions IS NOT NULL THEN
        FOREACH name IN ARRAY propositions LOOP
            IF name IS NULL OR NOT (report -> 'by_proposition') ? name THEN
                RAISE EXCEPTION 'the report has no proposition %', coalesce(quote_literal(name), 'NULL')
                    USING ERRCODE = 'invalid_parameter_value';
            END IF;
        END LOOP;
    END IF;
    -- unless named, propositions without graded answers get no panel, only a footnote
    names := ARRAY[NULL::text] || coalesce(propositions,
                                           ARRAY(SELECT e.key FROM jsonb_each(report -> 'by_proposition') e
                                                  WHERE coalesce((e.value ->> 'n')::int, 0) > 0 ORDER BY e.key));
    IF propositions IS NULL THEN
        SELECT string_agg(e.key, ', ' ORDER BY e.key) INTO skipped FROM jsonb_each(report -> 'by_proposition') e
         WHERE coalesce((e.value ->> 'n')::int, 0) = 0;
    END IF;
    SELECT count(*) FILTER (WHERE (e ->> 'count')::int > 0) INTO used
      FROM jsonb_array_elements(coalesce(report -> 'all' -> 'calibration', '[]')) e;
    IF used BETWEEN 1 AND 2 THEN
        note := 'Every answer of this grader has P(yes) near 0 or 1 (a grader that answers without spread, such as a test grader answering from labels),';
        note2 := 'so each curve has points only at the two ends; a grader with graded confidence fills the middle bins.';
    END IF;
    nrows := (cardinality(names) + columns - 1) / columns;
    w := 2 * margin + least(columns, cardinality(names)) * cell_w;
    h := top_h + nrows * cell_h + CASE WHEN skipped IS NULL THEN 10 ELSE 30 END;
    FOREACH name IN ARRAY names LOOP
        part := CASE WHEN name IS NULL THEN report -> 'all' ELSE report -> 'by_proposition' -> name END;
        cx := margin + (i % columns) * cell_w;
        cy := top_h + (i / columns) * cell_h;
        i := i + 1;
        SELECT max((e ->> 'count')::float8), count(*) FILTER (WHERE (e ->> 'count')::int > 0), count(*)
          INTO maxc, used, nbins FROM jsonb_array_elements(coalesce(part -> 'calibration', '[]')) e;
        body := body
            || format('<text x="%s" y="%s" font-size="13" font-weight="bold">%s</text>', cx + 8, cy + 16,
                      rbr.svg_escape(coalesce(name, 'all propositions')))
            || format('<text x="%s" y="%s" font-size="11" fill="#555">%s answers, ECE %s</text>', cx + 8, cy + 31,
                      coalesce(part ->> 'n', '0'), coalesce(round((part ->> 'ece')::numeric, 3)::text, '-'))
            || format('<rect x="%s" y="%s" width="%s" height="%s" fill="#f7f7f7" stroke="#999"/>', cx + pl, cy + pt, plot, plot)
            || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#888" stroke-dasharray="4 3"/>',
                      cx + pl, cy + pt + plot, cx + pl + plot, cy + pt);
        FOREACH t IN ARRAY ARRAY[0, 0.25, 0.5, 0.75, 1]::float8[] LOOP
            body := body
                || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', cx + pl + t * plot, cy + pt + plot,
                          cx + pl + t * plot, cy + pt + plot + 4)
                || format('<text x="%s" y="%s" font-size="10" text-anchor="middle">%s</text>', cx + pl + t * plot,
                          cy + pt + plot + 15, t)
                || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', cx + pl - 4, cy + pt + plot - t * plot,
                          cx + pl, cy + pt + plot - t * plot)
                || format('<text x="%s" y="%s" font-size="10" text-anchor="end">%s</text>', cx + pl - 6,
                          cy + pt + plot - t * plot + 4, t);
        END LOOP;
        body := body
            || format('<text x="%s" y="%s" font-size="11" text-anchor="middle" transform="rotate(-90 %s %s)">share labelled yes</text>',
                      cx + pl - 32, cy + pt + plot / 2, cx + pl - 32, cy + pt + plot / 2);
        -- the strip of answers per bin, under the x axis
        body := body || format('<text x="%s" y="%s" font-size="10" text-anchor="end" fill="#555">answers</text>',
                               cx + pl - 4, cy + pt + plot + 22 + strip / 2 + 4);
        pts := '';
        FOR b IN SELECT value FROM jsonb_array_elements(coalesce(part -> 'calibration', '[]'))
                  ORDER BY (value ->> 'bin')::int LOOP
            IF (b ->> 'count')::int > 0 THEN
                x := cx + pl + (b ->> 'low')::float8 * plot;
                y := (b ->> 'count')::float8 / maxc * strip;
                body := body
                    || format('<rect x="%s" y="%s" width="%s" height="%s" fill="#4575b4"/>', round((x + 1)::numeric, 1),
                              round((cy + pt + plot + 22 + strip - y)::numeric, 1),
                              round((((b ->> 'high')::float8 - (b ->> 'low')::float8) * plot - 2)::numeric, 1), round(y::numeric, 1))
                    || format('<text x="%s" y="%s" font-size="9" text-anchor="middle">%s</text>',
                              round((cx + pl + ((b ->> 'low')::float8 + (b ->> 'high')::float8) / 2 * plot)::numeric, 1),
                              cy + pt + plot + 22 + strip + 11, b ->> 'count');
                x := round((cx + pl + (b ->> 'mean_predicted')::float8 * plot)::numeric, 1);
                y := round((cy + pt + plot - (b ->> 'observed_rate')::float8 * plot)::numeric, 1);
                r := round((2.5 + 6 * sqrt((b ->> 'count')::float8 / maxc))::numeric, 1);
                pts := pts || format('%s,%s ', x, y);
                body := body || format('<circle cx="%s" cy="%s" r="%s" fill="#d73027" fill-opacity="0.75" stroke="#67001f"><title>%s answers, observed %s</title></circle>',
                                       x, y, r, b ->> 'count', round((b ->> 'observed_rate')::numeric, 3));
            END IF;
        END LOOP;
        IF pts <> '' THEN
            body := body || format('<polyline fill="none" stroke="#d73027" stroke-width="1.5" points="%s"/>', btrim(pts));
        END IF;
        body := body || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#999"/>', cx + pl, cy + pt + plot + 22 + strip,
                               cx + pl + plot, cy + pt + plot + 22 + strip)
                     || format('<text x="%s" y="%s" font-size="11" text-anchor="middle">mean P(yes) in the bin</text>',
                               cx + pl + plot / 2, cy + pt + plot + 22 + strip + 26);
        IF coalesce(used, 0) = 0 THEN
            body := body || format('<text x="%s" y="%s" font-size="11" text-anchor="middle" fill="#b35806">no graded answers</text>',
                                   cx + pl + plot / 2, cy + pt + plot / 2);
        ELSIF used <= 2 THEN
            body := body
                || format('<rect x="%s" y="%s" width="%s" height="46" fill="white" fill-opacity="0.85"/>', cx + pl + 10, cy + pt + plot / 2 - 19, plot - 20)
                || format('<text x="%s" y="%s" font-size="10" text-anchor="middle" fill="#b35806">only %s of %s bins have answers:</text>',
                          cx + pl + plot / 2, cy + pt + plot / 2 - 6, used, nbins)
                || format('<text x="%s" y="%s" font-size="10" text-anchor="middle" fill="#b35806">P(yes) is near 0 or 1, so the</text>',
                          cx + pl + plot / 2, cy + pt + plot / 2 + 8)
                || format('<text x="%s" y="%s" font-size="10" text-anchor="middle" fill="#b35806">curve has points only at the ends</text>',
                          cx + pl + plot / 2, cy + pt + plot / 2 + 22);
        END IF;
    END LOOP;
    RETURN format('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %s %s" width="%s" height="%s" font-family="DejaVu Sans, Arial, sans-serif">',
                  w, h, w, h)
        || format('<rect width="%s" height="%s" fill="white"/>', w, h)
        || format('<text x="%s" y="28" font-size="18" font-weight="bold">%s</text>', margin, rbr.svg_escape(title))
        || format('<text x="%s" y="50" font-size="12">x: mean P(yes) of the answers in a bin of P(yes); y: share of them labelled yes. Dashed diagonal = a calibrated grader.</text>', margin)
        || format('<text x="%s" y="66" font-size="12">Point area and the blue bars under each panel: answers in the bin. %s bins of width %s.</text>',
                  margin, coalesce(report ->> 'bins', '?'), coalesce(round(1.0 / nullif((report ->> 'bins')::numeric, 0), 3)::text, '?'))
        || CASE WHEN note IS NULL THEN '' ELSE
               format('<text x="%s" y="82" font-size="12" fill="#b35806">%s</text>', margin, note)
            || format('<text x="%s" y="96" font-size="12" fill="#b35806">%s</text>', margin, note2) END
        || body
        || CASE WHEN skipped IS NULL THEN '' ELSE
               format('<text x="%s" y="%s" font-size="11" fill="#555">No graded answers, not drawn: %s.</text>', margin, h - 14,
                      rbr.svg_escape(skipped)) END
        || '</svg>';
END
$$;

-- The same histogram as an SVG picture: per label a step line over a
-- translucent fill of the share of the label's values per bin, a dashed line
-- at 0, round ticks on both axes, and a legend in the order the labels first
-- appear in the input (aggregate with ORDER BY tier for quality order):
--   psql -XAtc "SELECT rbr_histogram_svg(array_agg(label ORDER BY tier), array_agg(x ORDER BY tier)) FROM ..." -o rewards.svg
-- For the paper's figure (three reward signals, classes in rows) see
-- rbr_reward_figure_svg.
CREATE OR REPLACE FUNCTION @extschema@.rbr_histogram_svg(labels text[], vals float8[], bins int DEFAULT 40,
                                              title text DEFAULT 'reward minus the prompt''s mean tier-0 reward')
    RETURNS text
    LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    w int;  h constant int := 400;  right_m int;  pw int;  ph int;  base float8;  xt numeric[];  yt numeric[];  t numeric;
    left_m constant int := 70;  top_m constant int := 44;  bottom_m constant int := 56;  lx float8;  ly float8;
    colors constant text[] := ARRAY['#1b9e77', '#d95f02', '#7570b3', '#e7298a', '#66a61e', '#e6ab02', '#a6761d', '#666666'];
    lo float8;  hi float8;  top float8;  col text;
    svg text;  pts text;  lab record;  i int := 0;  x float8;  y float8;  px float8;
BEGIN
    IF bins IS NULL OR bins < 1 OR bins > 1000 THEN
        RAISE EXCEPTION 'bins must be between 1 and 1000' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT min(low), max(high), max(share), max(length(label)) INTO lo, hi, top, right_m
      FROM @extschema@.rbr_histogram(labels, vals, bins);
    IF lo IS NULL THEN
        RAISE EXCEPTION 'no values to draw' USING ERRCODE = 'no_data_found';
    END IF;
    -- room for the legend: its longest label and count
    right_m := greatest(160, 90 + 8 * right_m);
    w := 600 + right_m;
    pw := w - left_m - right_m;
    ph := h - top_m - bottom_m;
    base := h - bottom_m;
    xt := ARRAY(SELECT v FROM unnest(rbr.svg_ticks(lo, hi, 7)) v WHERE v >= lo - 1e-9 AND v <= hi + 1e-9);
    yt := ARRAY(SELECT v FROM unnest(rbr.svg_ticks(0, top, 5)) v WHERE v <= top + 1e-9);
    svg := format('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 %s %s" width="%s" height="%s" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
                  w, h, w, h)
        || format('<rect width="%s" height="%s" fill="white"/>', w, h)
        || format('<text x="%s" y="24" font-size="15" font-weight="bold">%s</text>', left_m, rbr.svg_escape(title))
        || format('<text x="%s" y="%s" text-anchor="middle">value (bins of width %s)</text>', left_m + pw / 2, h - 12,
                  trim_scale(round(((hi - lo) / bins)::numeric, 4)))
        || format('<text x="16" y="%s" transform="rotate(-90 16 %s)" text-anchor="middle">share of the label''s values in the bin</text>',
                  top_m + ph / 2, top_m + ph / 2);
    FOREACH t IN ARRAY xt LOOP
        px := round((left_m + (t - lo) / (hi - lo) * pw)::numeric, 1);
        svg := svg || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s"%s/>', px, top_m, px, base,
                             CASE WHEN t = 0 THEN '#555' ELSE '#e5e5e5' END, CASE WHEN t = 0 THEN ' stroke-dasharray="4 3"' ELSE '' END)
                   || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', px, base, px, base + 5)
                   || format('<text x="%s" y="%s" text-anchor="middle">%s</text>', px, base + 18, t);
    END LOOP;
    FOREACH t IN ARRAY yt LOOP
        y := round((base - t / top * ph)::numeric, 1);
        svg := svg || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s"/>', left_m, y, left_m + pw, y, '#e5e5e5')
                   || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', left_m - 5, y, left_m, y)
                   || format('<text x="%s" y="%s" text-anchor="end">%s</text>', left_m - 8, y + 4, t);
    END LOOP;
    svg := svg || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', left_m, base, left_m + pw, base)
               || format('<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="black"/>', left_m, top_m, left_m, base);
    -- labels in the order of their first appearance in the input
    FOR lab IN SELECT hh.label, sum(hh.count) AS n
                 FROM @extschema@.rbr_histogram(labels, vals, bins) hh
                 LEFT JOIN (SELECT coalesce(u.l, '(none)') AS l, min(u.o) AS first
                              FROM unnest(labels, vals) WITH ORDINALITY AS u(l, x, o) WHERE u.x IS NOT NULL GROUP BY 1) f
                   ON f.l = hh.label
                GROUP BY hh.label, f.first ORDER BY f.first, hh.label LOOP
        i := i + 1;
        col := colors[1 + (i - 1) % 8];
        pts := format('%s,%s ', left_m, base);
        FOR x, y, px IN SELECT low, share, high FROM @extschema@.rbr_histogram(labels, vals, bins) hh WHERE hh.label = lab.label ORDER BY bin LOOP
            lx := round((left_m + (x - lo) / (hi - lo) * pw)::numeric, 1);
            ly := round((base - y / top * ph)::numeric, 1);
            pts := pts || format('%s,%s %s,%s ', lx, ly, round((left_m + (px - lo) / (hi - lo) * pw)::numeric, 1), ly);
        END LOOP;
        pts := pts || format('%s,%s', left_m + pw, base);
        svg := svg || format('<polyline fill="%s" fill-opacity="0.18" stroke-width="2" stroke="%s" points="%s"/>', col, col, pts)
                   || format('<rect x="%s" y="%s" width="12" height="12" fill="%s"/>', w - right_m + 16, top_m + (i - 1) * 20, col)
                   || format('<text x="%s" y="%s">%s (%s)</text>', w - right_m + 34, top_m + (i - 1) * 20 + 11,
                             rbr.svg_escape(lab.label), lab.n);
    END LOOP;
    RETURN svg || '</svg>';
END
$$;

-- (end of pictures)

-------------------------------------------------------------------------------
-- Scoring in ETL, setup check
-------------------------------------------------------------------------------

-- (end of scoring in ETL)

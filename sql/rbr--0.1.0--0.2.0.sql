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
-- Where requests go (rbr.grader_url, rbr.generator_url) and with which key
-- (a key file, the inline setting with rbr preloaded, or the server's
-- environment): doc/configuration.md. The settings are superuser-only.

-- What grading and generating still need, in plain words: preload, URLs,
-- where each key is found. Reveals no key, no file content, no URL.
CREATE OR REPLACE FUNCTION @extschema@.rbr_check_setup(OUT item text, OUT ok boolean, OUT detail text)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_check_setup'
    LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-- (end of keys)

-------------------------------------------------------------------------------
-- Pictures
-------------------------------------------------------------------------------

-- (end of pictures)

-------------------------------------------------------------------------------
-- Scoring in ETL, setup check
-------------------------------------------------------------------------------

-- (end of scoring in ETL)

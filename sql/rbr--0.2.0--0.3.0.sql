-- rbr 0.2.0 -> 0.3.0 (ALTER EXTENSION rbr UPDATE TO '0.3.0').
--
-- After this script the catalog equals a fresh install of 0.3.0
-- (sql/rbr--0.3.0.sql); test/t/015_upgrade.t compares the two.
\echo Use "ALTER EXTENSION rbr UPDATE TO '0.3.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Fitting at scale: the aggregate state type and the scale-out fit
-------------------------------------------------------------------------------
-- (section: fitting)

-------------------------------------------------------------------------------
-- Batch mode: the provider's Batch API
-------------------------------------------------------------------------------
-- (section: batch)

-------------------------------------------------------------------------------
-- Rate budget shared by the cluster
-------------------------------------------------------------------------------
-- (section: rate)
-- The endpoints' rate budgets: shared by every session when rbr is
-- preloaded (shared = true), this session's otherwise. The endpoint's host
-- is shown to superusers and members of pg_read_all_settings only.
CREATE FUNCTION @extschema@.rbr_rate_status(
        OUT slot int, OUT kind text, OUT endpoint text, OUT model text, OUT shared boolean,
        OUT requests_per_minute float8, OUT tokens_per_minute float8, OUT "window" float8,
        OUT in_flight int, OUT requests bigint, OUT ok bigint, OUT throttled bigint,
        OUT waits bigint, OUT remaining_requests bigint, OUT remaining_tokens bigint,
        OUT last_used timestamptz)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_rate_status'
    LANGUAGE C VOLATILE PARALLEL RESTRICTED;

-------------------------------------------------------------------------------
-- Cost before and after: dry runs, budgets, prompt caching
-------------------------------------------------------------------------------
-- (section: cost)

-------------------------------------------------------------------------------
-- Citus: policies and models on every node
-------------------------------------------------------------------------------
-- (section: citus)

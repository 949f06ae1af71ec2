-- Citus support without Citus: the copying to workers does nothing, and only
-- the extension's owner can reach its internal functions.
SELECT rbr.citus_coordinator() AS coordinator;
SELECT count(*) AS workers FROM rbr_citus_sync();
-- policies and models still load and save (their deferred triggers find no Citus)
\set spec `cat ../shared/reference/policy.json`
SELECT rbr_policy_load('citus_p', :'spec'::jsonb) AS version;
SELECT count(*) AS rows_sent FROM rbr.citus_ship(rbr.citus_payload());
CREATE ROLE rbr_citus_r;
SET ROLE rbr_citus_r;
SELECT count(*) FROM rbr_citus_sync();
SELECT rbr.citus_payload() AS what_a_role_without_policies_sees;
SELECT * FROM rbr.citus_ship('{}');
SELECT rbr.citus_apply('{}');
-- nor the TRUNCATE bookkeeping
INSERT INTO rbr.citus_resync DEFAULT VALUES;
SELECT count(*) FROM rbr.citus_resync;
DELETE FROM rbr.citus_resync;
SELECT rbr.citus_resync_push();
SELECT rbr.citus_truncated();
-- its sync only copies (no mirror, no lock): it may run in any transaction
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT count(*) FROM rbr_citus_sync();
ROLLBACK;
RESET ROLE;
DROP ROLE rbr_citus_r;
-- a superuser's sync mirrors, and a mirror must see every committed row: not in a transaction snapshot
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT count(*) FROM rbr_citus_sync();
ROLLBACK;
-- a TRUNCATE without Citus asks for nothing
BEGIN;
TRUNCATE rbr.policy_version CASCADE;
SELECT count(*) AS resync_requests FROM rbr.citus_resync;
ROLLBACK;
SELECT count(*) > 0 AS versions_back FROM rbr.policy_version WHERE policy = 'citus_p';
SELECT tgname, tgdeferrable, tginitdeferred FROM pg_trigger
 WHERE tgrelid IN ('rbr.policy_version'::regclass, 'rbr.model'::regclass) AND tgname LIKE '%to_workers' ORDER BY 1;

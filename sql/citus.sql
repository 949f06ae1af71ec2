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
RESET ROLE;
DROP ROLE rbr_citus_r;
SELECT tgname, tgdeferrable, tginitdeferred FROM pg_trigger
 WHERE tgrelid IN ('rbr.policy_version'::regclass, 'rbr.model'::regclass) AND tgname LIKE '%to_workers' ORDER BY 1;

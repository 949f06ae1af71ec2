-- rbr 0.3.0 -> 0.4.0 (ALTER EXTENSION rbr UPDATE TO '0.4.0').
--
-- After this script the catalog equals a fresh install of 0.4.0
-- (sql/rbr--0.4.0.sql); test/t/015_upgrade.t compares the two.
\echo Use "ALTER EXTENSION rbr UPDATE TO '0.4.0'" to load this file. \quit

-------------------------------------------------------------------------------
-- Citus: the workers mirror the coordinator's policies and models
-------------------------------------------------------------------------------
-- rbr_citus_sync() of a superuser or the extension's owner also removes from
-- the workers the rows the coordinator no longer has, and reports them in a
-- new column, removed; a TRUNCATE of rbr.policy_version or rbr.model on the
-- coordinator is mirrored to the workers at commit.

-- On a worker: store the policy versions and models the coordinator sent
-- (rows as to_jsonb() of rbr.policy_version / rbr.model, roles by name) and
-- remove the deleted ones (named, or for a mirror every row the payload
-- lacks); returns what it sent and what changed here.
-- Idempotent. A name owned here by another role is refused (the owner
-- guard), so no role's policy or model replaces another's. Called by
-- rbr.citus_ship() as the extension's owner; no other role may call it.
CREATE OR REPLACE FUNCTION rbr.citus_apply(payload jsonb) RETURNS jsonb
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    p jsonb;
    row_pv rbr.policy_version;
    cur rbr.policy_version;
    row_m rbr.model;
    n int;
    pv int := 0;
    pv_added int := 0;
    md int := 0;
    md_changed int := 0;
    removed int := 0;
BEGIN
    FOR p IN SELECT e.value FROM jsonb_array_elements(COALESCE(payload -> 'policy_versions', '[]')) e LOOP
        PERFORM rbr.citus_role(p ->> 'owner');
        row_pv := jsonb_populate_record(NULL::rbr.policy_version, p);
        PERFORM pg_advisory_xact_lock(hashtext('rbr.policy_version'), hashtext(row_pv.policy));
        pv := pv + 1;
        SELECT * INTO cur FROM rbr.policy_version v
         WHERE v.policy = row_pv.policy AND v.version = row_pv.version;
        IF FOUND AND cur.owner = row_pv.owner AND cur.spec = row_pv.spec THEN
            CONTINUE;
        END IF;
        IF FOUND AND cur.owner = row_pv.owner THEN
            -- kept from a load whose transaction the coordinator rolled back:
            -- the coordinator's version replaces it (and models on it here)
            DELETE FROM rbr.model m WHERE m.policy = cur.policy AND m.policy_version = cur.version;
            DELETE FROM rbr.policy_version v WHERE v.policy = cur.policy AND v.version = cur.version;
        END IF;
        -- the owner guard refuses a name that another role owns on this node
        INSERT INTO rbr.policy_version SELECT row_pv.*;
        pv_added := pv_added + 1;
    END LOOP;
    FOR p IN SELECT e.value FROM jsonb_array_elements(COALESCE(payload -> 'models', '[]')) e LOOP
        PERFORM rbr.citus_role(p ->> 'owner');
        row_m := jsonb_populate_record(NULL::rbr.model, p);
        md := md + 1;
        -- owner is set too, so that the owner guard refuses another role's row
        INSERT INTO rbr.model AS m SELECT row_m.*
        ON CONFLICT ON CONSTRAINT model_pkey DO UPDATE
           SET policy = EXCLUDED.policy, policy_version = EXCLUDED.policy_version,
               feature_names = EXCLUDED.feature_names, weights = EXCLUDED.weights,
               report = EXCLUDED.report, created_at = EXCLUDED.created_at,
               created_by = EXCLUDED.created_by, owner = EXCLUDED.owner
         WHERE (m.policy, m.policy_version, m.feature_names, m.weights, m.report, m.created_at, m.created_by, m.owner)
               IS DISTINCT FROM (EXCLUDED.policy, EXCLUDED.policy_version, EXCLUDED.feature_names, EXCLUDED.weights,
                                 EXCLUDED.report, EXCLUDED.created_at, EXCLUDED.created_by, EXCLUDED.owner);
        GET DIAGNOSTICS n = ROW_COUNT;
        md_changed := md_changed + n;
    END LOOP;
    FOR p IN SELECT e.value FROM jsonb_array_elements(COALESCE(payload -> 'deleted_models', '[]')) e LOOP
        DELETE FROM rbr.model m
         WHERE m.name = p ->> 'name' AND m.response_type = p ->> 'response_type'
           AND m.owner = rbr.citus_role(p ->> 'owner');
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
    END LOOP;
    FOR p IN SELECT e.value FROM jsonb_array_elements(COALESCE(payload -> 'deleted_policy_versions', '[]')) e LOOP
        DELETE FROM rbr.policy_version v
         WHERE v.policy = p ->> 'policy' AND v.version = (p ->> 'version')::int
           AND v.owner = rbr.citus_role(p ->> 'owner');
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
    END LOOP;
    -- a mirror (a superuser's rbr_citus_sync(), or a TRUNCATE on the
    -- coordinator): the payload holds every row of the coordinator, so the
    -- rows it lacks were deleted there (while this node was down, or by
    -- TRUNCATE) and go here too; a version a model here still uses stays
    IF (payload ->> 'mirror')::boolean IS TRUE THEN
        DELETE FROM rbr.model m
         WHERE NOT EXISTS (SELECT 1 FROM jsonb_array_elements(COALESCE(payload -> 'models', '[]')) e
                            WHERE e.value ->> 'name' = m.name AND e.value ->> 'response_type' = m.response_type);
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
        DELETE FROM rbr.policy_version v
         WHERE NOT EXISTS (SELECT 1 FROM jsonb_array_elements(COALESCE(payload -> 'policy_versions', '[]')) e
                            WHERE e.value ->> 'policy' = v.policy AND (e.value ->> 'version')::int = v.version)
           AND NOT EXISTS (SELECT 1 FROM rbr.model m WHERE m.policy = v.policy AND m.policy_version = v.version);
        GET DIAGNOSTICS n = ROW_COUNT;
        removed := removed + n;
    END IF;
    RETURN jsonb_build_object('policy_versions', pv, 'policy_versions_added', pv_added,
                              'models', md, 'models_changed', md_changed, 'removed', removed);
END
$$;

-- A TRUNCATE of rbr.policy_version or rbr.model on the coordinator leaves a
-- row in rbr.citus_resync; at commit its deferred trigger mirrors every row
-- to the workers, so a rolled-back TRUNCATE sends nothing. Written only by
-- these triggers.
CREATE TABLE rbr.citus_resync (
    requested_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE rbr.citus_resync IS
    'TRUNCATEs of rbr.policy_version / rbr.model waiting for commit, to be mirrored to the Citus workers';
REVOKE ALL ON rbr.citus_resync FROM PUBLIC;

-- Statement trigger of TRUNCATE on rbr.policy_version and rbr.model: ask
-- for a mirror at commit (on a Citus coordinator).
CREATE FUNCTION rbr.citus_truncated() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    IF rbr.citus_coordinator() THEN
        INSERT INTO rbr.citus_resync DEFAULT VALUES;
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.citus_truncated() FROM PUBLIC;
CREATE TRIGGER policy_version_truncate_to_workers
    AFTER TRUNCATE ON rbr.policy_version
    FOR EACH STATEMENT EXECUTE FUNCTION rbr.citus_truncated();
CREATE TRIGGER model_truncate_to_workers
    AFTER TRUNCATE ON rbr.model
    FOR EACH STATEMENT EXECUTE FUNCTION rbr.citus_truncated();

-- Deferred row trigger of rbr.citus_resync: at commit, once per
-- transaction, mirror every policy version and model (read as the
-- extension's owner, who sees them all) to every worker.
CREATE FUNCTION rbr.citus_resync_push() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
BEGIN
    DELETE FROM rbr.citus_resync;
    IF FOUND THEN
        PERFORM rbr.citus_ship(rbr.citus_payload() OPERATOR(pg_catalog.||) '{"mirror": true}'::jsonb);
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.citus_resync_push() FROM PUBLIC;
CREATE CONSTRAINT TRIGGER resync_to_workers
    AFTER INSERT ON rbr.citus_resync
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION rbr.citus_resync_push();

DROP FUNCTION @extschema@.rbr_citus_sync();

-- Copy every policy version and model the caller sees to every Citus worker
-- (e.g. after citus_add_node, or after a worker was down); called by a
-- superuser or the extension's owner, also remove what the coordinator no
-- longer has (a mirror, rbr.citus_sync()). One row per worker with the
-- counts sent, changed and removed there. Idempotent; nothing without Citus
-- or on a worker.
CREATE FUNCTION @extschema@.rbr_citus_sync(OUT node text, OUT port int, OUT policy_versions int,
                                           OUT policy_versions_added int, OUT models int, OUT models_changed int,
                                           OUT removed int)
    RETURNS SETOF record
    LANGUAGE sql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT s.node, s.port, (s.result ->> 'policy_versions')::int, (s.result ->> 'policy_versions_added')::int,
           (s.result ->> 'models')::int, (s.result ->> 'models_changed')::int, (s.result ->> 'removed')::int
      FROM rbr.citus_sync() s
$$;

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

-------------------------------------------------------------------------------
-- Cost before and after: dry runs, budgets, prompt caching
-------------------------------------------------------------------------------
-- (section: cost)

-------------------------------------------------------------------------------
-- Citus: policies and models on every node
-------------------------------------------------------------------------------
-- (section: citus)

-- rbr's tables are local to each node. On a Citus coordinator, every policy
-- version and model stored (rbr_policy_load, rbr_model_save, or a direct
-- INSERT/UPDATE/DELETE) is copied to every worker when its transaction
-- commits, so that queries Citus pushes down to the workers find them;
-- rbr_citus_sync() copies them to workers added later. Citus's catalogs and
-- functions are reached by name, only when the citus extension is installed:
-- without it these functions do nothing.

-- Whether this database is a Citus coordinator (citus installed, this node's
-- group 0); false without Citus and on workers.
CREATE FUNCTION rbr.citus_coordinator() RETURNS boolean
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    grp int;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_extension e WHERE e.extname = 'citus') THEN
        RETURN false;
    END IF;
    EXECUTE 'SELECT g.groupid FROM pg_catalog.pg_dist_local_group g' INTO grp;
    RETURN grp IS NOT DISTINCT FROM 0;
END
$$;

-- A role of a copied row on this node: it must exist here (by name).
CREATE FUNCTION rbr.citus_role(name text) RETURNS regrole
    LANGUAGE plpgsql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    r regrole := to_regrole(name);
BEGIN
    IF r IS NULL THEN
        RAISE EXCEPTION 'role % of a policy or model of the coordinator does not exist on this node', name
            USING ERRCODE = 'undefined_object',
                  HINT = 'Create the role on every node (Citus does when citus.enable_create_role_propagation is on), then run SELECT * FROM rbr_citus_sync() on the coordinator.';
    END IF;
    RETURN r;
END
$$;

-- On a worker: store the policy versions and models the coordinator sent
-- (rows as to_jsonb() of rbr.policy_version / rbr.model, roles by name) and
-- remove the deleted ones; returns what it sent and what changed here.
-- Idempotent. A name owned here by another role is refused (the owner
-- guard), so no role's policy or model replaces another's. Called by
-- rbr.citus_ship() as the extension's owner; no other role may call it.
CREATE FUNCTION rbr.citus_apply(payload jsonb) RETURNS jsonb
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
    IF rbr.citus_coordinator() THEN
        RAISE EXCEPTION 'rbr.citus_apply() runs on Citus workers, not on the coordinator'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
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
    RETURN jsonb_build_object('policy_versions', pv, 'policy_versions_added', pv_added,
                              'models', md, 'models_changed', md_changed, 'removed', removed);
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.citus_apply(jsonb) FROM PUBLIC;

-- On the coordinator: send a payload of rbr.citus_apply() to every active
-- primary worker (pg_dist_node) over Citus's connections, as the current
-- role (the extension's owner: callers are rbr.citus_push() and
-- rbr_citus_sync()); one row per worker with what it reports. An ERROR when
-- a worker failed. Nothing without Citus or on a worker.
CREATE FUNCTION rbr.citus_ship(payload jsonb, OUT node text, OUT port int, OUT result jsonb)
    RETURNS SETOF record
    LANGUAGE plpgsql
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    names text[];
    ports int[];
    cmd text;
    r record;
    failed text;
BEGIN
    IF NOT rbr.citus_coordinator() THEN
        RETURN;
    END IF;
    EXECUTE 'SELECT pg_catalog.array_agg(n.nodename ORDER BY n.nodeid), pg_catalog.array_agg(n.nodeport ORDER BY n.nodeid)
               FROM pg_catalog.pg_dist_node n
              WHERE n.isactive AND n.noderole OPERATOR(pg_catalog.=) ''primary''
                AND n.groupid OPERATOR(pg_catalog.<>) 0
                AND n.nodecluster OPERATOR(pg_catalog.=) pg_catalog.current_setting(''citus.cluster_name'')'
        INTO names, ports;
    IF names IS NULL THEN
        RETURN;
    END IF;
    cmd := format('SELECT rbr.citus_apply(%L::jsonb)', payload);
    FOR r IN EXECUTE 'SELECT m.node_name, m.node_port, m.success, m.result
                        FROM pg_catalog.master_run_on_worker($1, $2, $3, true) m'
             USING names, ports, array_fill(cmd, ARRAY[cardinality(names)]) LOOP
        IF r.success THEN
            node := r.node_name;
            port := r.node_port;
            result := r.result::jsonb;
            RETURN NEXT;
        ELSE
            failed := concat_ws('; ', failed, format('%s:%s: %s', r.node_name, r.node_port, r.result));
        END IF;
    END LOOP;
    IF failed IS NOT NULL THEN
        RAISE EXCEPTION 'could not copy policies and models to every Citus worker'
            USING ERRCODE = 'connection_failure',
                  DETAIL = failed,
                  HINT = 'Fix the worker (or remove it with citus_remove_node / citus_disable_node) and retry; SELECT * FROM rbr_citus_sync() copies everything again.';
    END IF;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.citus_ship(jsonb) FROM PUBLIC;

-- Deferred row trigger of rbr.policy_version and rbr.model: at commit, send
-- the stored (or deleted) row to every worker; a model goes with its policy
-- version, which the worker's foreign key needs. It runs as the extension's
-- owner: the rows are the ones just written, which row security and the
-- owner guard have checked.
CREATE FUNCTION rbr.citus_push() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
    AS $$
DECLARE
    payload jsonb;
BEGIN
    IF NOT rbr.citus_coordinator() THEN
        RETURN NULL;
    END IF;
    IF TG_TABLE_NAME = 'policy_version' THEN
        payload := CASE TG_OP
            WHEN 'DELETE' THEN jsonb_build_object('deleted_policy_versions', jsonb_build_array(
                jsonb_build_object('policy', OLD.policy, 'version', OLD.version, 'owner', OLD.owner::text)))
            ELSE jsonb_build_object('policy_versions', jsonb_build_array(to_jsonb(NEW))) END;
    ELSIF TG_OP = 'DELETE' THEN
        payload := jsonb_build_object('deleted_models', jsonb_build_array(
            jsonb_build_object('name', OLD.name, 'response_type', OLD.response_type, 'owner', OLD.owner::text)));
    ELSE
        payload := jsonb_build_object(
            'policy_versions', (SELECT jsonb_agg(to_jsonb(v)) FROM rbr.policy_version v
                                 WHERE v.policy = NEW.policy AND v.version = NEW.policy_version),
            'models', jsonb_build_array(to_jsonb(NEW)));
    END IF;
    PERFORM rbr.citus_ship(payload);
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION rbr.citus_push() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER policy_version_to_workers
    AFTER INSERT OR DELETE ON rbr.policy_version
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION rbr.citus_push();
CREATE CONSTRAINT TRIGGER model_to_workers
    AFTER INSERT OR UPDATE OR DELETE ON rbr.model
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION rbr.citus_push();

-- Every policy version and model the caller sees (row security), as a
-- payload of rbr.citus_apply().
CREATE FUNCTION rbr.citus_payload() RETURNS jsonb
    LANGUAGE sql STABLE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT jsonb_build_object(
        'policy_versions', COALESCE((SELECT jsonb_agg(to_jsonb(v) ORDER BY v.policy, v.version)
                                       FROM rbr.policy_version v), '[]'),
        'models', COALESCE((SELECT jsonb_agg(to_jsonb(m) ORDER BY m.name, m.response_type)
                              FROM rbr.model m), '[]'))
$$;

-- The C part of rbr_citus_sync(): rbr.citus_payload() as the caller, then
-- rbr.citus_ship() of it as the extension's owner.
CREATE FUNCTION rbr.citus_sync(OUT node text, OUT port int, OUT result jsonb)
    RETURNS SETOF record
    AS 'MODULE_PATHNAME', 'rbr_citus_sync'
    LANGUAGE C VOLATILE;

-- Copy every policy version and model the caller sees to every Citus worker
-- (e.g. after citus_add_node); one row per worker with the counts sent and
-- changed there. Idempotent; nothing without Citus or on a worker.
CREATE FUNCTION @extschema@.rbr_citus_sync(OUT node text, OUT port int, OUT policy_versions int,
                                           OUT policy_versions_added int, OUT models int, OUT models_changed int)
    RETURNS SETOF record
    LANGUAGE sql VOLATILE
    SET search_path = pg_catalog, pg_temp
    AS $$
    SELECT s.node, s.port, (s.result ->> 'policy_versions')::int, (s.result ->> 'policy_versions_added')::int,
           (s.result ->> 'models')::int, (s.result ->> 'models_changed')::int
      FROM rbr.citus_sync() s
$$;

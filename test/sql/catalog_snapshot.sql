-- Everything the rbr extension defines, one line per property, sorted: the
-- upgrade test compares this between an updated and a fresh installation.
WITH ext AS (
    SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname = 'rbr'
), members AS (
    SELECT d.classid, d.objid
      FROM pg_catalog.pg_depend d, ext
     WHERE d.refclassid = 'pg_catalog.pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
), lines AS (
    -- every member object
    SELECT 'object ' || pg_catalog.pg_describe_object(m.classid, m.objid, 0) AS line FROM members m
    UNION ALL
    -- functions: whole definition and privileges
    SELECT 'function ' || p.oid::regprocedure::text || E'\n' || pg_catalog.pg_get_functiondef(p.oid)
           || E'\nacl ' || COALESCE(p.proacl::text, 'default')
      FROM members m JOIN pg_catalog.pg_proc p ON p.oid = m.objid
     WHERE m.classid = 'pg_catalog.pg_proc'::regclass AND p.prokind <> 'a'
    UNION ALL
    SELECT 'aggregate ' || a.aggfnoid::regprocedure::text || ' ' || a.aggtransfn::text || ' '
           || a.aggfinalfn::text || ' ' || a.aggcombinefn::text || ' ' || a.aggserialfn::text || ' '
           || a.aggdeserialfn::text || ' ' || a.aggtranstype::regtype::text || ' '
           || COALESCE(p.proacl::text, 'default')
      FROM members m JOIN pg_catalog.pg_aggregate a ON a.aggfnoid = m.objid
      JOIN pg_catalog.pg_proc p ON p.oid = a.aggfnoid
     WHERE m.classid = 'pg_catalog.pg_proc'::regclass
    UNION ALL
    -- relations: kind, options, privileges, row security, columns, view text
    SELECT 'relation ' || c.oid::regclass::text || ' kind=' || c.relkind::text || ' rls=' || c.relrowsecurity
           || ' options=' || COALESCE(c.reloptions::text, '') || ' acl=' || COALESCE(c.relacl::text, 'default')
      FROM members m JOIN pg_catalog.pg_class c ON c.oid = m.objid WHERE m.classid = 'pg_catalog.pg_class'::regclass
    UNION ALL
    SELECT 'column ' || c.oid::regclass::text || '.' || a.attname || ' #' || a.attnum || ' '
           || pg_catalog.format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || COALESCE(' default ' || pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), '')
      FROM members m JOIN pg_catalog.pg_class c ON c.oid = m.objid
      JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
     WHERE m.classid = 'pg_catalog.pg_class'::regclass AND c.relkind IN ('r', 'v', 'p')
    UNION ALL
    SELECT 'view ' || c.oid::regclass::text || E'\n' || pg_catalog.pg_get_viewdef(c.oid)
      FROM members m JOIN pg_catalog.pg_class c ON c.oid = m.objid
     WHERE m.classid = 'pg_catalog.pg_class'::regclass AND c.relkind = 'v'
    UNION ALL
    SELECT 'constraint ' || c.oid::regclass::text || ' ' || k.conname || ' ' || pg_catalog.pg_get_constraintdef(k.oid)
      FROM members m JOIN pg_catalog.pg_class c ON c.oid = m.objid JOIN pg_catalog.pg_constraint k ON k.conrelid = c.oid
     WHERE m.classid = 'pg_catalog.pg_class'::regclass
    UNION ALL
    SELECT 'index ' || pg_catalog.pg_get_indexdef(i.indexrelid)
      FROM members m JOIN pg_catalog.pg_index i ON i.indrelid = m.objid WHERE m.classid = 'pg_catalog.pg_class'::regclass
    UNION ALL
    SELECT 'trigger ' || pg_catalog.pg_get_triggerdef(t.oid)
      FROM members m JOIN pg_catalog.pg_trigger t ON t.tgrelid = m.objid
     WHERE m.classid = 'pg_catalog.pg_class'::regclass AND NOT t.tgisinternal
    UNION ALL
    SELECT 'policy ' || p.schemaname || '.' || p.tablename || ' ' || p.policyname || ' ' || p.cmd || ' '
           || p.roles::text || ' using ' || COALESCE(p.qual, '') || ' check ' || COALESCE(p.with_check, '')
      FROM pg_catalog.pg_policies p
     WHERE (p.schemaname || '.' || p.tablename)::regclass IN
           (SELECT m.objid FROM members m WHERE m.classid = 'pg_catalog.pg_class'::regclass)
    UNION ALL
    SELECT 'schema ' || n.nspname || ' acl=' || COALESCE(n.nspacl::text, 'default')
      FROM members m JOIN pg_catalog.pg_namespace n ON n.oid = m.objid
     WHERE m.classid = 'pg_catalog.pg_namespace'::regclass
    UNION ALL
    SELECT 'config ' || c.oid::regclass::text || ' ' || COALESCE(e.extcondition[i], '')
      FROM pg_catalog.pg_extension e, ext, pg_catalog.generate_subscripts(e.extconfig, 1) i,
           LATERAL (SELECT e.extconfig[i] AS oid) c
     WHERE e.oid = ext.oid
)
SELECT line FROM lines ORDER BY line;

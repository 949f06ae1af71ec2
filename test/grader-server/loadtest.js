#!/usr/bin/env node
'use strict';
/*
 * Tiny keep-alive load generator for the rbr test grader (Node built-ins only).
 *
 *   node test/grader-server/loadtest.js --port 18080 [--n 20000] [--c 256] [--workers 1]
 *        [--host 127.0.0.1] [--path /v1/chat/completions] [--api-key K] [--azure-key K]
 *        [--policy FILE] [--gold FILE.jsonl] [--bodies 2000]
 *
 * Builds request bodies the way rbr does (policy template x gold completions x propositions),
 * then sends --n requests keeping --c in flight over keep-alive connections, split across
 * --workers worker threads, and prints requests/second, latency percentiles and status counts.
 */

const http = require('http');
const fs = require('fs');
const path = require('path');
const { Worker, isMainThread, parentPort, workerData } = require('worker_threads');

function parseArgs(argv) {
  const o = {};
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    if (!a.startsWith('--')) throw new Error(`unexpected argument ${a}`);
    a = a.slice(2);
    const eq = a.indexOf('=');
    if (eq >= 0) o[a.slice(0, eq)] = a.slice(eq + 1); else o[a] = argv[++i];
  }
  return o;
}

/** The request bodies, built the way rbr builds them. */
function buildBodies(opts) {
  const policy = JSON.parse(fs.readFileSync(opts.policy, 'utf8'));
  const rows = fs.readFileSync(opts.gold, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
  const props = Object.keys(policy.simple_propositions);
  const bodies = [];
  for (let i = 0; bodies.length < opts.bodies; i++) {
    const row = rows[i % rows.length];
    const prop = props[Math.floor(i / rows.length + i) % props.length];
    const completion = row.completion[0].content;
    let longest = 0;
    for (const run of completion.match(/`+/g) || []) longest = Math.max(longest, run.length);
    const fence = '`'.repeat(Math.max(3, longest + 1));
    const system = policy.prompt_template
      .replace('```\nASSISTANT: {response}\n```', `${fence}\nASSISTANT: {response}\n${fence}`)
      .replace('{question}', () => policy.simple_propositions[prop].prompt)
      .replace('{response}', () => completion);
    const transcript = row.prompt.map((m) => `${m.role.toUpperCase()}: ${m.content}`).join('\n\n') +
      `\n\nASSISTANT: ${completion}`;
    bodies.push(Buffer.from(JSON.stringify({
      model: 'rbr-test-grader', temperature: 0, logprobs: true, top_logprobs: 20, max_completion_tokens: 1,
      messages: [{ role: 'system', content: system }, { role: 'user', content: transcript }],
    })));
  }
  return bodies;
}

/** Send n requests with c in flight; resolves to { statuses, errors, latencies }. */
function run({ host, port, reqPath, headers, bodies, n, c, offset }) {
  return new Promise((resolve) => {
    const agent = new http.Agent({ keepAlive: true, maxSockets: c, maxFreeSockets: c });
    const statuses = {};
    const latencies = new Float64Array(n);
    let sent = 0, done = 0, errors = 0;
    const fire = () => {
      if (sent >= n) return;
      const i = sent++;
      const body = bodies[(offset + i) % bodies.length];
      const t0 = process.hrtime.bigint();
      const req = http.request({
        host, port, method: 'POST', path: reqPath, agent,
        headers: { ...headers, 'content-type': 'application/json', 'content-length': body.length },
      }, (res) => {
        res.on('data', () => {});
        res.on('end', () => {
          latencies[i] = Number(process.hrtime.bigint() - t0) / 1e6;
          statuses[res.statusCode] = (statuses[res.statusCode] || 0) + 1;
          finish();
        });
      });
      req.on('error', () => { errors++; latencies[i] = NaN; finish(); });
      req.end(body);
    };
    const finish = () => {
      done++;
      if (done === n) { agent.destroy(); resolve({ statuses, errors, latencies: Array.from(latencies) }); } else fire();
    };
    for (let k = 0; k < Math.min(c, n); k++) fire();
  });
}

if (!isMainThread) {
  run(workerData).then((r) => parentPort.postMessage(r));
} else {
  (async () => {
    const a = parseArgs(process.argv.slice(2));
    const opts = {
      host: a.host || '127.0.0.1',
      port: Number(a.port || 18080),
      n: Number(a.n || 20000),
      c: Number(a.c || 256),
      workers: Math.max(1, Number(a.workers || 1)),
      reqPath: a.path || '/v1/chat/completions',
      policy: a.policy || path.resolve(__dirname, '../../../shared/reference/policy.json'),
      gold: a.gold || path.resolve(__dirname, '../../../shared/reference/gold_train.jsonl'),
      bodies: Number(a.bodies || 2000),
    };
    const headers = {};
    if (a['api-key']) headers.authorization = `Bearer ${a['api-key']}`;
    if (a['azure-key']) headers['api-key'] = a['azure-key'];
    const bodies = buildBodies(opts);
    const avgBytes = Math.round(bodies.reduce((s, b) => s + b.length, 0) / bodies.length);

    // Warm up the connections and the server's JIT a little.
    await run({ ...opts, headers, bodies, n: Math.min(opts.c * 2, 2000), c: opts.c, offset: 0 });

    const t0 = process.hrtime.bigint();
    const shares = [];
    for (let w = 0; w < opts.workers; w++) {
      const n = Math.floor(opts.n / opts.workers) + (w < opts.n % opts.workers ? 1 : 0);
      const c = Math.max(1, Math.floor(opts.c / opts.workers) + (w < opts.c % opts.workers ? 1 : 0));
      shares.push({ host: opts.host, port: opts.port, reqPath: opts.reqPath, headers, bodies, n, c, offset: w * 7919 });
    }
    const results = opts.workers === 1
      ? [await run(shares[0])]
      : await Promise.all(shares.map((s) => new Promise((resolve, reject) => {
        const w = new Worker(__filename, { workerData: s });
        w.once('message', resolve);
        w.once('error', reject);
      })));
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;

    const statuses = {};
    let errors = 0;
    const lat = [];
    for (const r of results) {
      errors += r.errors;
      for (const [k, v] of Object.entries(r.statuses)) statuses[k] = (statuses[k] || 0) + v;
      for (const x of r.latencies) if (!Number.isNaN(x)) lat.push(x);
    }
    lat.sort((x, y) => x - y);
    const pct = (q) => (lat.length ? lat[Math.min(lat.length - 1, Math.floor(q * lat.length))].toFixed(1) : '-');
    console.log(`requests ${opts.n}  in flight ${opts.c}  workers ${opts.workers}  body ~${avgBytes} B`);
    console.log(`elapsed ${secs.toFixed(2)} s  ${(opts.n / secs).toFixed(0)} requests/s`);
    console.log(`latency ms p50 ${pct(0.5)}  p90 ${pct(0.9)}  p99 ${pct(0.99)}  max ${pct(1)}`);
    console.log(`status ${JSON.stringify(statuses)}  errors ${errors}`);
    process.exit(errors ? 1 : 0);
  })().catch((e) => { console.error(e.stack || String(e)); process.exit(2); });
}

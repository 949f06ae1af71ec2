#!/usr/bin/env node
// The client a user would write: the official openai package, a concurrency
// limit, the same request bodies rbr sends (one JSON object per line, e.g.
// from rbr_grader_request()). Prints one line:
//   peer openai@VERSION in_flight C requests N seconds S req/s R cpu_ms_per_req X errors E
//
//   node test/bench/peer/peer.mjs --base-url http://127.0.0.1:PORT/v1 --bodies FILE --c 64 [--n N]
import fs from 'node:fs';
import OpenAI from 'openai';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) =>
  (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
const bodies = fs.readFileSync(args.bodies, 'utf8').split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l));
const c = Number(args.c || 64);
const n = Number(args.n || bodies.length);
const version = JSON.parse(fs.readFileSync(new URL('./node_modules/openai/package.json', import.meta.url), 'utf8')).version;

const client = new OpenAI({ baseURL: args['base-url'], apiKey: args['api-key'] || 'sk-bench', maxRetries: 2 });

let next = 0;
let errors = 0;
let yes = 0;
async function lane() {
  while (next < n) {
    const body = bodies[next++ % bodies.length];
    try {
      const r = await client.chat.completions.create(body);
      // read P(yes) the way rbr does, so the work per answer is comparable
      const top = r.choices[0].logprobs?.content?.[0]?.top_logprobs ?? [];
      let y = 0, no = 0;
      for (const t of top) {
        const w = t.token.replace(/^[\s\u0120\u2581]+/, '').trim().toLowerCase();
        if (w === 'yes') y += Math.exp(t.logprob); else if (w === 'no') no += Math.exp(t.logprob);
      }
      if (y + no > 0) yes += y / (y + no);
    } catch (e) {
      errors++;
      if (errors === 1) console.error(`peer: first error: ${e.message}`);
    }
  }
}

const cpu0 = process.cpuUsage();
const t0 = process.hrtime.bigint();
await Promise.all(Array.from({ length: Math.min(c, n) }, lane));
const secs = Number(process.hrtime.bigint() - t0) / 1e9;
const cpu = process.cpuUsage(cpu0);
console.log(`peer openai@${version} in_flight ${c} requests ${n} seconds ${secs.toFixed(3)} ` +
  `req/s ${(n / secs).toFixed(1)} cpu_ms_per_req ${((cpu.user + cpu.system) / 1000 / n).toFixed(3)} errors ${errors}`);

// canned.js: a tiny HTTP server for rbr's hardening tests that answers every
// POST with a canned response chosen by a marker "[[canned NAME]]" found in
// the request body: exact status, headers and body bytes (including invalid
// JSON, invalid UTF-8, NaN logprobs), which the deterministic test grader
// (server.js) never sends. Node 20, built-in modules only, 127.0.0.1 only.
//
//   node canned.js --port 0 --responses FILE.json [--log FILE]
//
// FILE.json: {"NAME": {"status": 200, "headers": {"retry-after": "5"},
//              "body": "text" | "body_b64": "base64 bytes" | "json": {...},
//              "delay_ms": 0}, ...}; re-read on every request. A request
// without a known marker gets 404. --log appends one line per request:
// {"name": ..., "headers": {...}} (request headers, to check what was sent).
'use strict';
const http = require('http');
const fs = require('fs');

const args = process.argv.slice(2);
const opt = (name, dflt) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : dflt; };
const port = Number(opt('--port', '0'));
const file = opt('--responses');
const log = opt('--log');

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => {
    const body = Buffer.concat(chunks).toString('utf8');
    const m = /\[\[canned ([A-Za-z0-9_-]+)\]\]/.exec(body);
    const name = m ? m[1] : null;
    if (log) fs.appendFileSync(log, JSON.stringify({ name, url: req.url, headers: req.headers }) + '\n');
    let table = {};
    try { table = JSON.parse(fs.readFileSync(file, 'utf8')); } catch (e) { /* empty table */ }
    const r = name && table[name];
    if (!r) { res.writeHead(404, { 'content-type': 'text/plain' }); res.end('no such canned response'); return; }
    const send = () => {
      let buf;
      if (r.body_b64 !== undefined) buf = Buffer.from(r.body_b64, 'base64');
      else if (r.json !== undefined) buf = Buffer.from(JSON.stringify(r.json), 'utf8');
      else buf = Buffer.from(r.body || '', 'utf8');
      res.writeHead(r.status || 200, Object.assign({ 'content-type': 'application/json',
                                                     'content-length': buf.length }, r.headers || {}));
      res.end(buf);
    };
    if (r.delay_ms) setTimeout(send, r.delay_ms); else send();
  });
});
server.listen(port, '127.0.0.1', () => {
  console.log(`rbr canned server listening on 127.0.0.1:${server.address().port}`);
});
const stop = () => { server.close(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

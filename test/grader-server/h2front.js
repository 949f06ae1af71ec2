// An HTTP/2-over-TLS front for the test grader server, for tests of rbr's
// HTTP/2 path: it terminates TLS with the certificate it is given, speaks
// HTTP/2 only (no HTTP/1.1 fallback), and forwards every request to the
// plain-HTTP test server behind it.
//
//   node h2front.js --port 0 --backend http://127.0.0.1:PORT --cert cert.pem --key key.pem
//
// Prints "rbr h2 front listening on 127.0.0.1:PORT" when ready. GET
// /front/stats answers {"sessions": N, "streams": N}: TLS connections
// (HTTP/2 sessions) opened and requests forwarded, so a test can see that
// many requests shared few connections.
'use strict';
const fs = require('fs');
const http = require('http');
const http2 = require('http2');

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
for (const a of ['backend', 'cert', 'key']) {
  if (!args[a]) { console.error(`h2front: --${a} is required`); process.exit(2); }
}
const backend = new URL(args.backend);
const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });
// headers HTTP/2 forbids, which the HTTP/1.1 backend may send
const hopByHop = new Set(['connection', 'keep-alive', 'transfer-encoding', 'upgrade', 'proxy-connection']);
let sessions = 0;
let streams = 0;

const server = http2.createSecureServer({
  cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key), allowHTTP1: false,
});
server.on('session', () => { sessions++; });
server.on('stream', (stream, headers) => {
  const path = headers[':path'];
  if (path === '/front/stats') {
    stream.respond({ ':status': 200, 'content-type': 'application/json' });
    stream.end(JSON.stringify({ sessions, streams }));
    return;
  }
  streams++;
  const fwd = {};
  for (const [k, v] of Object.entries(headers)) if (!k.startsWith(':')) fwd[k] = v;
  const req = http.request({
    host: backend.hostname, port: backend.port, method: headers[':method'], path, headers: fwd, agent,
  }, (res) => {
    const out = { ':status': res.statusCode };
    for (const [k, v] of Object.entries(res.headers)) if (!hopByHop.has(k)) out[k] = v;
    if (stream.destroyed) { res.resume(); return; }
    stream.respond(out);
    res.pipe(stream);
  });
  req.on('error', () => {
    if (!stream.destroyed) stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
  });
  stream.on('error', () => req.destroy());
  stream.pipe(req);
});
server.listen(Number(args.port || 0), '127.0.0.1', () => {
  console.log(`rbr h2 front listening on 127.0.0.1:${server.address().port}`);
});
const stop = () => { server.close(); process.exit(0); };
process.on('SIGTERM', stop);
process.on('SIGINT', stop);

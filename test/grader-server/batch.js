'use strict';
/*
 * The Batch API of the rbr test grader (required by server.js): files and batches in
 * OpenAI's form (/v1/files, /v1/batches) and Azure OpenAI's (/openai/files and
 * /openai/batches with ?api-version=..., /openai/v1/files and /openai/v1/batches).
 *
 *   POST /v1/files                     multipart: purpose=batch, file=<JSONL>
 *   GET  /v1/files/{id}, /v1/files/{id}/content
 *   POST /v1/batches                   {input_file_id, endpoint, completion_window, metadata}
 *   GET  /v1/batches[?limit=N&after=ID], GET /v1/batches/{id}, POST /v1/batches/{id}/cancel
 *
 * Each line of a batch is answered exactly as the online endpoint answers the same body
 * (server.js's handleChat: same deterministic answers, directives and faults); a 200 goes
 * to the output file, anything else to the error file.  Settings (POST /admin/batch/config):
 *   delay_ms         a batch completes this long after it was created (default 0)
 *   expire_rate      share of questions (by a hash of the request body) whose first submission
 *                    expires: no answer, an error-file line with code batch_expired, and the
 *                    batch ends 'expired' (default 0)
 *   fail_rate        share of questions whose first submission fails with a 500 line (default 0)
 *   create_delay_ms  POST /v1/batches creates the batch at once but answers this late (a client
 *                    killed meanwhile must find the batch in the list, not create another)
 *   list_hidden      true: GET /v1/batches lists nothing (to show what a client without the
 *                    look-up would do)
 * GET /admin/batch: counters (files, batches, lines received; per question, the lines received
 * and answered with 200: a test checks that no question was answered twice); POST
 * /admin/batch/reset clears batches, files and counters.
 */

const crypto = require('crypto');

module.exports = function batchApi(deps) {
  const { handleChat, send, openaiError, readBody, args } = deps;

  const config = { delay_ms: 0, expire_rate: 0, fail_rate: 0, create_delay_ms: 0, list_hidden: false };
  let files, batches, counters, seq;
  function reset() {
    files = new Map();
    batches = new Map();
    seq = 0;
    counters = {
      files_uploaded: 0, batches_created: 0, create_requests: 0, list_requests: 0, get_requests: 0,
      content_requests: 0, cancels: 0, lines_received: 0, lines_answered: 0, lines_expired: 0,
      lines_failed: 0, by_question: {}, answered_by_question: {}, by_custom_id: {},
    };
  }
  reset();

  /** Read a request body of up to 200 MB (the Batch API's file limit). */
  function readFile(req, cb) {
    const chunks = [];
    let len = 0, tooBig = false;
    req.on('data', (c) => { if (tooBig) return; len += c.length; if (len > 200 * 1024 * 1024 + 65536) tooBig = true; else chunks.push(c); });
    req.on('end', () => cb(tooBig ? 'too big' : null, Buffer.concat(chunks, len)));
    req.on('error', () => {});
  }

  const newId = (prefix) => `${prefix}-rbrtest${(++seq).toString(36)}${crypto.randomBytes(3).toString('hex')}`;
  const now = () => Math.floor(Date.now() / 1000);
  const qhash = (body) => crypto.createHash('sha256').update(JSON.stringify(body)).digest('hex').slice(0, 16);
  const share = (h, salt) => parseInt(crypto.createHash('sha256').update(salt + h).digest('hex').slice(0, 8), 16) / 4294967296;

  /** Answer one request body as the online endpoint does: resolves {status, text}. */
  function answerLine(body, api) {
    return new Promise((resolve) => {
      let settled = false, guard = null;
      const done = (status, text) => {
        if (settled) return;
        settled = true;
        if (guard) clearTimeout(guard);
        resolve({ status, text });
      };
      const req = { headers: {}, method: 'POST', socket: { destroy() { done(502, ''); } } };
      const res = {
        statusCode: 200, destroyed: false, writableEnded: false, writableFinished: false,
        writeHead(status) { this.statusCode = status; },
        end(text) { this.writableEnded = true; done(this.statusCode, text === undefined ? '' : String(text)); },
        on() {},
      };
      guard = setTimeout(() => done(504, ''), 5000);   // a [[fault timeout]] never answers
      try {
        handleChat(req, res, Buffer.from(JSON.stringify(body)), 'rbr-test-grader', {}, api);
      } catch (e) {
        done(500, openaiError(String(e), 'server_error'));
      }
    });
  }

  function batchView(b) {
    const view = {};
    for (const [k, v] of Object.entries(b)) if (!k.startsWith('_')) view[k] = v;
    return JSON.stringify(view);
  }

  /** Work through a batch: answer every line, then after delay_ms end it. */
  async function run(b) {
    b.status = 'in_progress';
    b.in_progress_at = now();
    const file = files.get(b.input_file_id);
    const out = [], errs = [];
    let expired = false;
    for (const line of file.lines) {
      const q = qhash(line.body);
      counters.lines_received++;
      counters.by_question[q] = (counters.by_question[q] || 0) + 1;
      counters.by_custom_id[line.custom_id] = (counters.by_custom_id[line.custom_id] || 0) + 1;
      const first = counters.by_question[q] === 1;
      if (line.url !== b.endpoint) {
        errs.push({ id: newId('batch_req'), custom_id: line.custom_id, response: { status_code: 400, request_id: newId('req'),
          body: JSON.parse(openaiError(`The url ${line.url} does not match the batch's endpoint ${b.endpoint}.`, 'invalid_request_error', 'url')) }, error: null });
        continue;
      }
      if (first && config.expire_rate > 0 && share(q, 'expire') < config.expire_rate) {
        counters.lines_expired++;
        expired = true;
        errs.push({ id: newId('batch_req'), custom_id: line.custom_id, response: null,
          error: { code: 'batch_expired', message: 'This request could not be executed before the completion window expired.' } });
        continue;
      }
      if (first && config.fail_rate > 0 && share(q, 'fail') < config.fail_rate) {
        counters.lines_failed++;
        errs.push({ id: newId('batch_req'), custom_id: line.custom_id, response: { status_code: 500, request_id: newId('req'),
          body: JSON.parse(openaiError('The server had an error while processing your request. Sorry about that!', 'server_error')) }, error: null });
        continue;
      }
      const api = /\/responses$/.test(line.url) ? 'responses' : 'chat';
      const a = await answerLine(line.body, api);
      let parsed;
      try { parsed = JSON.parse(a.text); } catch (e) { parsed = a.text; }
      const entry = { id: newId('batch_req'), custom_id: line.custom_id,
        response: { status_code: a.status, request_id: newId('req'), body: parsed }, error: null };
      if (a.status === 200) {
        counters.lines_answered++;
        counters.answered_by_question[q] = (counters.answered_by_question[q] || 0) + 1;
        out.push(entry);
      } else errs.push(entry);
    }
    const finish = () => {
      if (b._ended) return;
      b._ended = true;
      if (b.status === 'cancelled' || b.status === 'cancelling') {
        b.status = 'cancelled';
        b.cancelled_at = now();
      } else {
        b.status = expired ? 'expired' : 'completed';
        b[expired ? 'expired_at' : 'completed_at'] = now();
      }
      b.request_counts = { total: file.lines.length, completed: out.length, failed: errs.length };
      if (out.length) b.output_file_id = addFile(out.map((o) => JSON.stringify(o)).join('\n') + '\n', 'batch_output').id;
      if (errs.length) b.error_file_id = addFile(errs.map((o) => JSON.stringify(o)).join('\n') + '\n', 'batch_output').id;
    };
    b._finish = finish;
    if (b.status === 'cancelling') finish();
    else if (config.delay_ms > 0) b._timer = setTimeout(finish, config.delay_ms);
    else finish();
  }

  function addFile(content, purpose, filename) {
    const id = newId('file');
    const f = { id, object: 'file', bytes: Buffer.byteLength(content), created_at: now(),
      filename: filename || `${id}.jsonl`, purpose, content, lines: null };
    files.set(id, f);
    return f;
  }

  /** The parts of a multipart/form-data body: [{name, filename, data}]. */
  function multipart(buf, ctype) {
    const m = /boundary=(?:"([^"]+)"|([^;]+))/i.exec(ctype || '');
    if (!m) return null;
    const boundary = Buffer.from('--' + (m[1] || m[2]));
    const parts = [];
    let pos = buf.indexOf(boundary);
    while (pos >= 0) {
      const start = pos + boundary.length;
      if (buf.slice(start, start + 2).toString() === '--') break;
      const next = buf.indexOf(boundary, start);
      if (next < 0) break;
      const part = buf.slice(start + 2, next - 2);   // after CRLF, before CRLF
      const sep = part.indexOf('\r\n\r\n');
      if (sep >= 0) {
        const head = part.slice(0, sep).toString();
        const name = /name="([^"]*)"/i.exec(head);
        const fn = /filename="([^"]*)"/i.exec(head);
        parts.push({ name: name ? name[1] : '', filename: fn ? fn[1] : null, data: part.slice(sep + 4) });
      }
      pos = next;
    }
    return parts;
  }

  function authorized(req, azure) {
    if (azure) return !args['azure-key'] || req.headers['api-key'] === args['azure-key'] || req.headers.authorization === 'Bearer ' + args['azure-key'];
    return !args['api-key'] || req.headers.authorization === 'Bearer ' + args['api-key'];
  }

  /** Handle a Batch API or /admin/batch request; false when the path is not one. */
  function handle(req, res, pathname, url) {
    if (pathname === '/admin/batch' && req.method === 'GET') { send(res, 200, JSON.stringify({ ...counters, config })); return true; }
    if (pathname === '/admin/batch/reset' && req.method === 'POST') { readBody(req, () => { reset(); send(res, 200, '{"ok":true}'); }); return true; }
    if (pathname === '/admin/batch/config' && req.method === 'POST') {
      readBody(req, (err, buf) => {
        let obj;
        try { obj = JSON.parse(buf.toString('utf8') || '{}'); } catch (e) { obj = null; }
        if (!obj || typeof obj !== 'object') return send(res, 400, JSON.stringify({ error: 'body must be a JSON object' }));
        for (const [k, v] of Object.entries(obj)) {
          if (!(k in config)) return send(res, 400, JSON.stringify({ error: `unknown setting ${k}` }));
          if (typeof v !== typeof config[k]) return send(res, 400, JSON.stringify({ error: `${k} must be a ${typeof config[k]}` }));
        }
        Object.assign(config, obj);
        send(res, 200, JSON.stringify(config));
      });
      return true;
    }
    let rest, azure = false;
    const query = new URLSearchParams(url.indexOf('?') >= 0 ? url.slice(url.indexOf('?') + 1) : '');
    if (pathname.startsWith('/v1/files') || pathname.startsWith('/v1/batches')) rest = pathname.slice(3);
    else if (pathname.startsWith('/openai/v1/files') || pathname.startsWith('/openai/v1/batches')) { rest = pathname.slice(10); azure = true; }
    else if (pathname.startsWith('/openai/files') || pathname.startsWith('/openai/batches')) {
      rest = pathname.slice(7); azure = true;
      if (!query.get('api-version')) {
        send(res, 404, JSON.stringify({ error: { code: '404', message: 'Resource not found (api-version query parameter missing)' } }));
        return true;
      }
    } else return false;
    if (!authorized(req, azure)) {
      send(res, 401, openaiError('Incorrect API key provided.', 'invalid_request_error', null, 'invalid_api_key'));
      return true;
    }
    const seg = rest.split('/').filter(Boolean);   // files | files,ID | files,ID,content | batches ...
    const notFound = () => send(res, 404, openaiError(`No such object: ${rest}`, 'invalid_request_error', 'id', 'not_found'));

    if (seg[0] === 'files') {
      if (seg.length === 1 && req.method === 'POST') {
        readFile(req, (err, buf) => {
          if (err) return send(res, 413, openaiError('File too large.', 'invalid_request_error'));
          const parts = multipart(buf, req.headers['content-type']);
          const purpose = parts && parts.find((p) => p.name === 'purpose');
          const file = parts && parts.find((p) => p.name === 'file');
          if (!purpose || !file) return send(res, 400, openaiError("Missing required parameter: 'file' or 'purpose'.", 'invalid_request_error', 'file'));
          if (purpose.data.toString() !== 'batch') return send(res, 400, openaiError('purpose must be batch', 'invalid_request_error', 'purpose'));
          const text = file.data.toString('utf8');
          const lines = [];
          for (const l of text.split('\n')) {
            if (!l.trim()) continue;
            let o;
            try { o = JSON.parse(l); } catch (e) { return send(res, 400, openaiError('The file is not valid JSONL.', 'invalid_request_error', 'file')); }
            if (typeof o.custom_id !== 'string' || o.method !== 'POST' || typeof o.url !== 'string' || !o.body) {
              return send(res, 400, openaiError('Each line needs custom_id, method POST, url and body.', 'invalid_request_error', 'file'));
            }
            lines.push(o);
          }
          if (new Set(lines.map((l) => l.custom_id)).size !== lines.length) {
            return send(res, 400, openaiError('custom_id values must be unique within a file.', 'invalid_request_error', 'file'));
          }
          const f = addFile(text, 'batch', file.filename);
          f.lines = lines;
          counters.files_uploaded++;
          const { content, lines: ls, ...meta } = f;
          void content; void ls;
          send(res, 200, JSON.stringify({ ...meta, status: 'processed' }));
        });
        return true;
      }
      const f = files.get(seg[1]);
      if (!f) { notFound(); return true; }
      if (seg.length === 2 && req.method === 'GET') {
        const { content, lines, ...meta } = f;
        void content; void lines;
        send(res, 200, JSON.stringify(meta));
        return true;
      }
      if (seg.length === 3 && seg[2] === 'content' && req.method === 'GET') {
        counters.content_requests++;
        send(res, 200, f.content, { 'content-type': 'application/jsonl' });
        return true;
      }
      notFound();
      return true;
    }

    // batches
    if (seg.length === 1 && req.method === 'POST') {
      counters.create_requests++;
      readBody(req, (err, buf) => {
        let body;
        try { body = JSON.parse(buf.toString('utf8')); } catch (e) { body = null; }
        if (!body || typeof body !== 'object') return send(res, 400, openaiError('Body must be a JSON object.', 'invalid_request_error'));
        const f = files.get(body.input_file_id);
        if (!f || !f.lines) return send(res, 400, openaiError(`No such file: ${body.input_file_id}`, 'invalid_request_error', 'input_file_id'));
        if (body.completion_window !== '24h') return send(res, 400, openaiError('completion_window must be 24h', 'invalid_request_error', 'completion_window'));
        const ok = azure ? ['/chat/completions', '/responses', '/v1/chat/completions'] : ['/v1/chat/completions', '/v1/responses', '/v1/completions'];
        if (!ok.includes(body.endpoint)) return send(res, 400, openaiError(`Unsupported endpoint ${body.endpoint}`, 'invalid_request_error', 'endpoint'));
        const b = { id: newId('batch'), object: 'batch', endpoint: body.endpoint, errors: null,
          input_file_id: body.input_file_id, completion_window: '24h', status: 'validating',
          output_file_id: null, error_file_id: null, created_at: now(), in_progress_at: null,
          expires_at: now() + 86400, completed_at: null, failed_at: null, expired_at: null,
          cancelled_at: null, request_counts: { total: f.lines.length, completed: 0, failed: 0 },
          metadata: body.metadata || null };
        batches.set(b.id, b);
        counters.batches_created++;
        setImmediate(() => run(b));
        const reply = () => send(res, 200, batchView(b));
        if (config.create_delay_ms > 0) setTimeout(reply, config.create_delay_ms); else reply();
      });
      return true;
    }
    if (seg.length === 1 && req.method === 'GET') {
      counters.list_requests++;
      let all = config.list_hidden ? [] : [...batches.values()].reverse();   // newest first
      const after = query.get('after');
      if (after) { const i = all.findIndex((b) => b.id === after); all = i >= 0 ? all.slice(i + 1) : []; }
      const limit = Math.max(1, Math.min(100, Number(query.get('limit')) || 20));
      const page = all.slice(0, limit);
      send(res, 200, JSON.stringify({ object: 'list', data: page.map((b) => JSON.parse(batchView(b))),
        first_id: page.length ? page[0].id : null, last_id: page.length ? page[page.length - 1].id : null,
        has_more: all.length > limit }));
      return true;
    }
    const b = batches.get(seg[1]);
    if (!b) { notFound(); return true; }
    if (seg.length === 2 && req.method === 'GET') { counters.get_requests++; send(res, 200, batchView(b)); return true; }
    if (seg.length === 3 && seg[2] === 'cancel' && req.method === 'POST') {
      counters.cancels++;
      if (b.status === 'validating' || b.status === 'in_progress') {
        b.status = 'cancelling';   // ends 'cancelled' at once, with the lines answered so far
        if (b._finish) { clearTimeout(b._timer); setImmediate(b._finish); }
      }
      send(res, 200, batchView(b));
      return true;
    }
    notFound();
    return true;
  }

  return { handle };
};

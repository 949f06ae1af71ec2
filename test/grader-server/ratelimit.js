'use strict';
/*
 * ratelimit.js: the provider's rate limit of the rbr test grader (server.js), across ALL
 * connections: R requests per second (rate_limit_rps) and optionally T tokens per minute
 * (rate_limit_tpm), each a token bucket that holds one second's worth and starts full.
 * A request's tokens are what its answer's usage reports (server.js): a quarter of the
 * characters of its messages' contents (at least 1), plus one for the answer.
 *
 *  - every API answer carries OpenAI's headers: x-ratelimit-limit-requests (per minute),
 *    x-ratelimit-remaining-requests, x-ratelimit-reset-requests (time until the bucket is
 *    full again, written as OpenAI does: "20ms", "1.5s", "6m0s"), and the -tokens ones when
 *    a token limit is set;
 *  - a request above the rate is answered 429 rate_limit_exceeded with retry-after-ms (time
 *    until it would be admitted) and retry-after (the same, whole seconds, rounded up);
 *  - admitted requests and 429s are counted per wall-clock second (the second the body was
 *    read), for GET /admin/stats: rate_limit.per_second = [[unix_second, admitted, limited,
 *    tokens], ...] (the last hour), plus totals.
 * rate_limit_headers false: no x-ratelimit-* header (a provider that does not send them);
 * "remaining": only x-ratelimit-remaining-* (as Azure OpenAI sends them).
 * Off (0) by default: then no header is added and nothing is refused (requests are counted).
 */

const KEYS = ['rate_limit_rps', 'rate_limit_tpm', 'rate_limit_headers'];

/** The tokens of a request body, as server.js reports them in usage. */
function tokensOf(buf) {
  let chars = 0;
  try {
    const body = JSON.parse(buf.toString('utf8'));
    const msgs = body.messages || body.input;
    if (Array.isArray(msgs)) {
      for (const m of msgs) {
        const c = m && m.content;
        if (typeof c === 'string') chars += c.length;
        else if (Array.isArray(c)) for (const p of c) chars += p && typeof p.text === 'string' ? p.text.length : 0;
      }
    }
  } catch (e) {
    chars = buf.length;
  }
  return Math.max(1, Math.round(chars / 4)) + 1;
}

/** Format seconds as OpenAI's x-ratelimit-reset-* values. */
function duration(s) {
  if (s <= 0) return '0s';
  if (s < 1) return `${Math.max(1, Math.ceil(s * 1000))}ms`;
  if (s < 60) return `${Number(s.toFixed(3))}s`;
  const m = Math.floor(s / 60);
  return `${m}m${Math.round(s - 60 * m)}s`;
}

function create() {
  const cfg = { rate_limit_rps: 0, rate_limit_tpm: 0, rate_limit_headers: true };
  let reqBucket, tokBucket, bins, totals;

  const now = () => Number(process.hrtime.bigint() / 1000n) / 1e6; // seconds, monotonic
  const refill = (b, rate, cap, t) => {
    b.level = Math.min(cap, b.level + (t - b.at) * rate);
    b.at = t;
  };

  function reset() {
    const t = now();
    reqBucket = { level: Math.max(1, cfg.rate_limit_rps), at: t };
    tokBucket = { level: cfg.rate_limit_tpm / 60, at: t };
    bins = new Map();
    totals = { admitted: 0, limited: 0, tokens: 0 };
  }
  reset();

  /** Is key one of ours? */
  const owns = (key) => KEYS.includes(key);

  /** An error string for a bad value, or null. */
  function validate(key, v) {
    if (key === 'rate_limit_headers') {
      return typeof v === 'boolean' || v === 'remaining' ? null : `${key} must be a boolean or "remaining"`;
    }
    if (typeof v !== 'number' || !(v >= 0) || !Number.isFinite(v)) return `${key} must be a number >= 0`;
    return null;
  }

  /** Apply validated settings; the buckets start full again. */
  function apply(obj) {
    if (!Object.keys(obj).length) return;
    Object.assign(cfg, obj);
    const t = now();
    reqBucket = { level: Math.max(1, cfg.rate_limit_rps), at: t };
    tokBucket = { level: cfg.rate_limit_tpm / 60, at: t };
  }

  function bin(sec) {
    let b = bins.get(sec);
    if (!b) {
      b = [sec, 0, 0, 0];
      bins.set(sec, b);
      if (bins.size > 3600) bins.delete(bins.keys().next().value);
    }
    return b;
  }

  /**
   * Admit one API request whose body is buf: set the x-ratelimit-* headers on res; when above
   * the rate answer 429 through send() and return false.
   */
  function gate(res, buf, send, openaiError) {
    const rps = cfg.rate_limit_rps, tpm = cfg.rate_limit_tpm;
    const cost = tpm > 0 ? tokensOf(buf || Buffer.alloc(0)) : 1;
    if (!(rps > 0) && !(tpm > 0)) {
      // no limit: counted all the same
      const b = bin(Math.floor(Date.now() / 1000));
      b[1]++; b[3] += cost;
      totals.admitted++; totals.tokens += cost;
      return true;
    }
    const t = now();
    const rcap = Math.max(1, rps), tcap = tpm / 60;
    let wait = 0, what = 'requests';
    if (rps > 0) {
      refill(reqBucket, rps, rcap, t);
      if (reqBucket.level < 1) wait = (1 - reqBucket.level) / rps;
    }
    if (tpm > 0) {
      refill(tokBucket, tpm / 60, tcap, t);
      const need = Math.min(cost, tcap);
      if (tokBucket.level < need) {
        const w = (need - tokBucket.level) / (tpm / 60);
        if (w > wait) { wait = w; what = 'tokens'; }
      }
    }
    const b = bin(Math.floor(Date.now() / 1000));
    if (wait === 0) {
      if (rps > 0) reqBucket.level -= 1;
      if (tpm > 0) tokBucket.level -= cost;
      b[1]++; b[3] += cost;
      totals.admitted++; totals.tokens += cost;
    } else {
      b[2]++;
      totals.limited++;
    }
    const all = cfg.rate_limit_headers === true;
    if (rps > 0 && cfg.rate_limit_headers) {
      if (all) res.setHeader('x-ratelimit-limit-requests', String(Math.round(rps * 60)));
      res.setHeader('x-ratelimit-remaining-requests', String(Math.max(0, Math.floor(reqBucket.level))));
      if (all) res.setHeader('x-ratelimit-reset-requests', duration((rcap - reqBucket.level) / rps));
    }
    if (tpm > 0 && cfg.rate_limit_headers) {
      if (all) res.setHeader('x-ratelimit-limit-tokens', String(Math.round(tpm)));
      res.setHeader('x-ratelimit-remaining-tokens', String(Math.max(0, Math.floor(tokBucket.level))));
      if (all) res.setHeader('x-ratelimit-reset-tokens', duration((tcap - tokBucket.level) / (tpm / 60)));
    }
    if (wait === 0) return true;
    const ms = Math.max(1, Math.ceil(wait * 1000));
    const limit = what === 'requests' ? `requests per min (RPM): Limit ${Math.round(rps * 60)}`
      : `tokens per min (TPM): Limit ${Math.round(tpm)}, Requested ${cost}`;
    send(res, 429, openaiError(`Rate limit reached for ${limit}. Please try again in ${ms}ms.`,
      what, null, 'rate_limit_exceeded'), { 'retry-after-ms': String(ms), 'retry-after': String(Math.ceil(ms / 1000)) });
    return false;
  }

  function stats() {
    return { ...cfg, ...totals, per_second: [...bins.values()].sort((a, b) => a[0] - b[0]) };
  }

  return { owns, validate, apply, gate, reset, stats, config: () => ({ ...cfg }) };
}

module.exports = { create, duration, tokensOf };

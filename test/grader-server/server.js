#!/usr/bin/env node
'use strict';
/*
 * rbr test grader: a deterministic OpenAI-compatible Chat Completions server for
 * rbr's tests, demo and benchmarks.  Node >= 20, built-in modules only.
 *
 *   node test/grader-server/server.js --port 18080 [--policy FILE] [--labels FILE.jsonl]
 *        [--latency-ms N] [--jitter-ms N] [--noise X] [--pid-file F] [--log FILE]
 *        [--api-key K] [--azure-key K] [--reject-max-tokens]
 *        [--fault-rate X] [--fault-kind K[,K...]] [--seed N]
 *
 * It listens on 127.0.0.1 only and prints "rbr test grader listening on 127.0.0.1:PORT"
 * when ready (--port 0 picks a free port and prints it).  SIGTERM/SIGINT exit cleanly.
 *
 * How a request is read (rbr builds it this way)
 * ----------------------------------------------
 * messages[0].content is the policy's prompt_template with {question} replaced by one
 * simple proposition's grader prompt and {response} by the completion being judged,
 * inside a fenced block:  <fence>\nASSISTANT: <completion>\n<fence>  (fence = 3+ backticks).
 *  - proposition: the simple proposition whose prompt is found where {question} was
 *    (fast path: text between the template's prefix and the template text that follows
 *    {question}, looked up in a map); otherwise the longest policy prompt contained in
 *    the message; otherwise "unknown".
 *  - completion: the text after the "ASSISTANT: " line that opens the fenced block, up to
 *    the next line consisting only of the same fence.  When the template structure is not
 *    found: after the last line starting with "ASSISTANT: " that follows a fence line.
 *
 * How it answers: a P(yes) p for (proposition, completion), by the first rule that applies
 * ----------------------------------------------------------------------------------------
 *  1. Directive in the completion: [[rbr NAME=P NAME2=P2 ...]] sets p for those
 *     propositions (P a number in [0,1], or yes = 0.97, no = 0.03).  [[rbr *=P]] sets all
 *     propositions; an explicit name wins over *; among repeated names the last one wins.
 *  2. Gold labels (--labels, gold_train.jsonl format): if the trimmed completion equals a
 *     row's trimmed completion[0].content, p = 0.95 for a true label and 0.05 for false.
 *     Several rows with the same completion: the first row whose last user message occurs
 *     in the transcript (messages[1..]) wins, else the first row.  With --noise X > 0 a
 *     deterministic share X of (proposition, completion) answers is flipped to the opposite
 *     label, and every label answer is jittered deterministically within +-0.04.
 *  3. Otherwise p = 0.01 + 0.98 * u, u a uniform deterministic hash of (proposition, completion).
 *
 * Rendering: content is "yes" if p >= 0.5 else "no".  logprobs.content[0] is the most likely
 * token of the winning side with top_logprobs (up to the requested count, max 20) sorted by
 * logprob descending: 0.98*p is split over yes variants and 0.98*(1-p) over no variants
 * (the variant set depends on a hash of the proposition name: plain "yes"/"Yes"/" yes", GPT-2
 * style "Ġyes", or SentencePiece style "▁Yes"), 0.015 over filler tokens ("I", "The", ...)
 * that make up 20 entries, 0.005 is left unlisted.  A side whose total mass is < 1e-6 is
 * omitted entirely (a client bounds it by the smallest listed probability).
 *
 * Faults: [[fault ...]] directives in the completion, e.g. [[fault 429 times=2 retry-after=1]],
 * [[fault 503]], [[fault timeout]], [[fault drop]], [[fault malformed]], [[fault nologprobs]],
 * [[fault textbody 502]], [[fault 400]], [[fault retry-after-ms=250 429 times=1]],
 * [[fault latency=2000]], [[fault 500 prop=apology]].  times=N: the first N attempts of this
 * (proposition, completion) fault, later ones succeed; several fault directives consume the
 * attempts in order.  Plus server-wide random faults (--fault-rate/--fault-kind/--seed).
 *
 * Generation mode: a request whose messages[0] starts with "rbr-generate/1" (rbr's generator
 * instruction), or one without logprobs whose max tokens exceed 1, gets a generated completion
 * instead of a yes/no answer: it carries the traits the instruction lists as an
 * [[rbr *=no NAME=yes ...]] directive, so this server's grading rules answer accordingly; with
 * --gen-miss-rate X a deterministic share X of generations (by request and "seed") has one
 * trait flipped.  [[fault ...]] directives in the conversation apply to generation requests.
 * In the conversation, [[gen yes=P no=Q NAME=P]] sets the P(yes) the generated text is graded
 * with, and [[gen-fault ARGS]] makes the generated text carry [[fault ARGS]] (a grading fault).
 * The Batch API (/v1/files, /v1/batches and Azure's forms) is in batch.js.
 * Details: README.md beside this file.
 */

const http = require('http');
const fs = require('fs');
const path = require('path');
const prefixCache = require('./prefixcache');

// ---------------------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------------------

const USAGE = `usage: node server.js --port N [--policy FILE] [--labels FILE.jsonl]
  [--latency-ms N] [--jitter-ms N] [--noise X] [--pid-file F] [--log FILE]
  [--api-key K] [--azure-key K] [--reject-max-tokens]
  [--fault-rate X] [--fault-kind 429|500|503|drop|malformed|timeout|nologprobs|textbody|400[,...]]
  [--seed N] [--gen-miss-rate X] [--rate-limit-rps R] [--rate-limit-tpm T]
  [--profile openai|openai-reasoning|gpt-5.4|azure|vllm-thinking|llama.cpp-old|ollama|no-logprobs|together|groq|quota]`;

const FLAG_SPECS = {
  port: 'int', policy: 'str', labels: 'str', 'latency-ms': 'num', 'jitter-ms': 'num',
  noise: 'num', 'pid-file': 'str', log: 'str', 'api-key': 'str', 'azure-key': 'str',
  'reject-max-tokens': 'bool', 'fault-rate': 'num', 'fault-kind': 'str', seed: 'int', help: 'bool',
  'gen-miss-rate': 'num', profile: 'str', 'rate-limit-rps': 'num', 'rate-limit-tpm': 'num',
};

function die(msg) {
  process.stderr.write(`rbr test grader: ${msg}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i++) {
    let a = argv[i];
    if (!a.startsWith('--')) die(`unexpected argument ${a}\n${USAGE}`);
    a = a.slice(2);
    let val;
    const eq = a.indexOf('=');
    if (eq >= 0) { val = a.slice(eq + 1); a = a.slice(0, eq); }
    const kind = FLAG_SPECS[a];
    if (!kind) die(`unknown flag --${a}\n${USAGE}`);
    if (kind === 'bool') { out[a] = val === undefined ? true : !/^(0|false|no)$/i.test(val); continue; }
    if (val === undefined) {
      if (i + 1 >= argv.length) die(`--${a} needs a value`);
      val = argv[++i];
    }
    if (kind === 'str') out[a] = val;
    else {
      const n = Number(val);
      if (!Number.isFinite(n) || (kind === 'int' && !Number.isInteger(n))) die(`--${a}: bad number ${val}`);
      out[a] = n;
    }
  }
  return out;
}

const args = parseArgs(process.argv.slice(2));
if (args.help) { process.stdout.write(USAGE + '\n'); process.exit(0); }

/*
 * Endpoint profiles: what each family of endpoints accepts, rejects and returns, as its
 * provider documents it (doc/configuration.md, "Compatibility").
 *   openai            gpt-4o / gpt-4.1: everything (the default)
 *   openai-reasoning  o1/o3/o4-mini, gpt-5*: 400 on logprobs/top_logprobs, on a temperature
 *                     other than 1 and on max_tokens; reasoning tokens are spent before the
 *                     answer (fewer than 16 allowed output tokens: empty answer, "length")
 *   gpt-5.4           top_logprobs at most 5 (400 names the limit)
 *   azure             top_logprobs at most 5; the v1 URL form /openai/v1/chat/completions;
 *                     [[filter]]: 400 content_filter, [[filter200]]: 200 content_filter
 *   vllm-thinking     the answer starts with a <think>...</think> block unless
 *                     chat_template_kwargs.enable_thinking is false
 *   llama.cpp-old, ollama  max_completion_tokens ignored (an explanation follows the answer)
 *   no-logprobs       logprobs silently dropped (logprobs: null)
 *   together          completions-style logprobs: tokens, token_logprobs, top_logprobs [{tok: lp}]
 *   groq              400 on logprobs and on n > 1
 *   quota             429 insufficient_quota on every request
 * Sampled answers (n > 1, or temperature > 0 without logprobs): answer i of n is "yes"
 * when i < round(p * n), so the share of yes is exactly round(p * n) / n.
 */
const PROFILES = new Set(['openai', 'openai-reasoning', 'gpt-5.4', 'azure', 'vllm-thinking', 'llama.cpp-old',
  'ollama', 'no-logprobs', 'together', 'groq', 'quota']);
const profile = args.profile || 'openai';
if (!PROFILES.has(profile)) die(`unknown profile ${profile}\n${USAGE}`);

// ---------------------------------------------------------------------------------------
// Run-time configuration (changeable through POST /admin/config)
// ---------------------------------------------------------------------------------------

const FAULT_KINDS = new Set(['429', '500', '503', 'drop', 'malformed', 'timeout', 'nologprobs', 'textbody', '400']);

// the provider's rate limit across all connections (ratelimit.js)
const rateLimit = require('./ratelimit').create();

const config = {
  latency_ms: 0, jitter_ms: 0, noise: 0,
  fault_rate: 0, fault_kind: '500', seed: 0,
  reject_max_tokens: false,
  gen_miss_rate: 0,
};

/** Validate and apply settings; keys may use - or _.  Returns an error string or null. */
function applyConfig(obj) {
  const next = { ...config };
  const nextRate = {};
  for (const [rawKey, v] of Object.entries(obj)) {
    const key = rawKey.replace(/-/g, '_');
    if (rateLimit.owns(key)) {
      const e = rateLimit.validate(key, v);
      if (e) return e;
      nextRate[key] = v;
      continue;
    }
    switch (key) {
      case 'latency_ms': case 'jitter_ms':
        if (typeof v !== 'number' || !(v >= 0)) return `${key} must be a number >= 0`;
        next[key] = v; break;
      case 'noise': case 'fault_rate': case 'gen_miss_rate':
        if (typeof v !== 'number' || !(v >= 0 && v <= 1)) return `${key} must be a number in [0,1]`;
        next[key] = v; break;
      case 'fault_kind': {
        const kinds = String(v).split(',').map((s) => s.trim()).filter(Boolean);
        if (!kinds.length || !kinds.every((k) => FAULT_KINDS.has(k))) {
          return `fault_kind must be one or more (comma separated) of ${[...FAULT_KINDS].join('|')}`;
        }
        next.fault_kind = kinds.join(','); break;
      }
      case 'seed':
        if (!Number.isInteger(v)) return 'seed must be an integer';
        next.seed = v; break;
      case 'reject_max_tokens':
        if (typeof v !== 'boolean') return 'reject_max_tokens must be a boolean';
        next.reject_max_tokens = v; break;
      default: {
        const err = prefixCache.configure(key, v);
        if (err === undefined) return `unknown setting ${rawKey}`;
        if (err) return err;
        break;
      }
    }
  }
  const seedChanged = next.seed !== config.seed;
  Object.assign(config, next);
  rateLimit.apply(nextRate);
  faultKinds = config.fault_kind.split(',');
  if (seedChanged) rng = makeRng(config.seed);
  return null;
}

// ---------------------------------------------------------------------------------------
// Deterministic hashing and pseudo-random numbers
// ---------------------------------------------------------------------------------------

/** cyrb53-style string hash: two 32-bit halves. */
function hashStr(s) {
  let h1 = 0xdeadbeef, h2 = 0x41c6ce57;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 2654435761);
    h2 = Math.imul(h2 ^ c, 1597334677);
  }
  h1 = Math.imul(h1 ^ (h1 >>> 16), 2246822507) ^ Math.imul(h2 ^ (h2 >>> 13), 3266489909);
  h2 = Math.imul(h2 ^ (h2 >>> 16), 2246822507) ^ Math.imul(h1 ^ (h1 >>> 13), 3266489909);
  return [h1 >>> 0, h2 >>> 0];
}

/** 32-bit integer finaliser (lowbias32). */
function mix32(x) {
  x ^= x >>> 16; x = Math.imul(x, 0x7feb352d);
  x ^= x >>> 15; x = Math.imul(x, 0x846ca68b);
  x ^= x >>> 16;
  return x >>> 0;
}

// Salts: one independent uniform per purpose.
const SALT_P = 1, SALT_FLIP = 2, SALT_JITTER_P = 3, SALT_LATENCY = 4, SALT_ID = 5, SALT_MISS = 6, SALT_MISS_WHICH = 7;

/** Uniform in [0,1) from a completion hash, a proposition hash and a salt. */
function unit(hc, hp, salt) {
  const a = mix32(hc[0] ^ mix32((hp + Math.imul(salt, 0x9e3779b9)) >>> 0));
  const b = mix32(hc[1] ^ a);
  return (a * 2097152 + (b >>> 11)) / 9007199254740992; // (a * 2^21 + 21 bits) / 2^53
}

/** mulberry32: the deterministic sequence for server-wide random faults. */
function makeRng(seed) {
  let s = seed >>> 0;
  return function next() {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

let rng = makeRng(0);
let faultKinds = ['500'];

// ---------------------------------------------------------------------------------------
// Policy: proposition lookup and completion extraction (precomputed at start)
// ---------------------------------------------------------------------------------------

const policyFile = args.policy || path.resolve(__dirname, '../../../shared/reference/policy.json');
let policy;
try { policy = JSON.parse(fs.readFileSync(policyFile, 'utf8')); } catch (e) { die(`cannot read policy ${policyFile}: ${e.message}`); }
if (!policy || typeof policy.simple_propositions !== 'object') die(`${policyFile}: no simple_propositions`);

const propNames = Object.keys(policy.simple_propositions);
const promptToProp = new Map();         // grader prompt text (raw and trimmed) -> name
for (const name of propNames) {
  const p = policy.simple_propositions[name] && policy.simple_propositions[name].prompt;
  if (typeof p !== 'string' || !p) continue;
  if (!promptToProp.has(p)) promptToProp.set(p, name);
  if (!promptToProp.has(p.trim())) promptToProp.set(p.trim(), name);
}
// Slow-path candidates, longest prompt first so that a prompt contained in another loses.
const promptsByLength = [...promptToProp.entries()].sort((a, b) => b[0].length - a[0].length);

/**
 * Template anatomy: PRE {question} MID <fence>\n ASSISTANT_PREFIX {response} ...
 * All null when the template does not have that shape (then only slow paths are used).
 */
const tpl = { pre: null, mid: null, assistantPrefix: 'ASSISTANT: ' };
(function analyseTemplate(t) {
  if (typeof t !== 'string') return;
  const iq = t.indexOf('{question}'), ir = t.indexOf('{response}');
  if (iq < 0 || ir < iq) return;
  const lineStart = t.lastIndexOf('\n', ir - 1) + 1;            // start of "ASSISTANT: {response}"
  if (lineStart <= 0) return;
  const fenceStart = t.lastIndexOf('\n', lineStart - 2) + 1;    // start of the fence line
  const fence = t.slice(fenceStart, lineStart - 1);
  if (!/^`{3,}$/.test(fence) || fenceStart < iq + 10) return;
  tpl.pre = t.slice(0, iq);
  tpl.mid = t.slice(iq + '{question}'.length, fenceStart);
  tpl.assistantPrefix = t.slice(lineStart, ir) || 'ASSISTANT: ';
})(policy.prompt_template);

/** Text of a message content: a string or an array of {type:'text', text} parts. */
function textOf(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    let s = '';
    for (const part of content) if (part && typeof part.text === 'string') s += part.text;
    return s;
  }
  return '';
}

/** Length of the backtick run at position i. */
function backticksAt(s, i) {
  let j = i;
  while (s.charCodeAt(j) === 96) j++;
  return j - i;
}

/** Index of the next line (at or after `from`, starting with "\n") that is exactly `fence`, or -1. */
function findFenceLine(s, fence, from) {
  const needle = '\n' + fence;
  let k = s.indexOf(needle, from);
  while (k >= 0) {
    const after = k + needle.length;
    const c = s.charCodeAt(after);
    if (after >= s.length || c === 10 || (c === 13 && (after + 1 >= s.length || s.charCodeAt(after + 1) === 10))) return k;
    k = s.indexOf(needle, k + 1);
  }
  return -1;
}

/** Completion inside the fenced block whose fence starts at fenceAt; null if the shape is wrong. */
function completionAtFence(sys, fenceAt) {
  const n = backticksAt(sys, fenceAt);
  if (n < 3) return null;
  const fence = sys.slice(fenceAt, fenceAt + n);
  let start = fenceAt + n;
  const prefix = tpl.assistantPrefix;
  if (sys.startsWith('\n' + prefix, start)) start += 1 + prefix.length;
  else if (sys.startsWith('\n' + prefix.trimEnd(), start)) start += 1 + prefix.trimEnd().length; // empty completion, trimmed line
  else return null;
  const end = findFenceLine(sys, fence, start);
  return end < 0 ? sys.slice(start) : sys.slice(start, end);
}

/** Generic rule: after the last "ASSISTANT: " line preceded by a fence line, up to that fence again. */
function completionGeneric(sys) {
  const marker = 'ASSISTANT: ';
  let i = sys.lastIndexOf('\n' + marker);
  let lastPlain = -1;
  while (i >= 0) {
    const start = i + 1 + marker.length;
    if (lastPlain < 0) lastPlain = start;
    const fenceLineStart = sys.lastIndexOf('\n', i - 1) + 1;
    const fence = sys.slice(fenceLineStart, i);
    if (/^`{3,}$/.test(fence)) {
      const end = findFenceLine(sys, fence, start);
      return end < 0 ? sys.slice(start) : sys.slice(start, end);
    }
    i = i > 0 ? sys.lastIndexOf('\n' + marker, i - 1) : -1;
  }
  if (lastPlain >= 0) return sys.slice(lastPlain);
  if (sys.startsWith(marker)) return sys.slice(marker.length);
  return sys;
}

/** { prop, completion } of a system message. */
function analyseSystem(sys) {
  let prop = null, completion = null, region = sys;
  if (tpl.pre !== null) {
    let qs = -1;
    if (sys.startsWith(tpl.pre)) qs = tpl.pre.length;
    else { const i = sys.indexOf(tpl.pre); if (i >= 0) qs = i + tpl.pre.length; }
    if (qs >= 0) {
      const qe = sys.indexOf(tpl.mid, qs);
      if (qe >= 0) {
        const q = sys.slice(qs, qe);
        prop = promptToProp.get(q) || promptToProp.get(q.trim()) || null;
        region = q;
        completion = completionAtFence(sys, qe + tpl.mid.length);
      }
    }
  }
  if (prop === null) {
    for (const [text, name] of promptsByLength) if (region.includes(text)) { prop = name; break; }
  }
  if (completion === null) completion = completionGeneric(sys);
  return { prop: prop || 'unknown', completion };
}

// ---------------------------------------------------------------------------------------
// Gold labels
// ---------------------------------------------------------------------------------------

const labels = new Map();  // trimmed completion -> [{ labels, lastUser }]
if (args.labels) {
  let text;
  try { text = fs.readFileSync(args.labels, 'utf8'); } catch (e) { die(`cannot read labels ${args.labels}: ${e.message}`); }
  let lineNo = 0;
  for (const line of text.split('\n')) {
    lineNo++;
    if (!line.trim()) continue;
    let row;
    try { row = JSON.parse(line); } catch (e) { die(`${args.labels}:${lineNo}: ${e.message}`); }
    const c = row.completion && row.completion[0] && row.completion[0].content;
    if (typeof c !== 'string' || !row.propositions) continue;
    const users = (row.prompt || []).filter((m) => m && m.role === 'user');
    const lastUser = users.length ? textOf(users[users.length - 1].content).trim() : '';
    const key = c.trim();
    if (!labels.has(key)) labels.set(key, []);
    labels.get(key).push({ labels: row.propositions, lastUser });
  }
}

/** Label row for a completion, using the transcript to tell duplicates apart. */
function labelRow(completion, messages) {
  const rows = labels.get(completion.trim());
  if (!rows) return null;
  if (rows.length === 1) return rows[0];
  let transcript = '';
  for (let i = 1; i < messages.length; i++) transcript += textOf(messages[i] && messages[i].content) + '\n';
  for (const r of rows) if (r.lastUser && transcript.includes(r.lastUser)) return r;
  return rows[0];
}

// ---------------------------------------------------------------------------------------
// Directives in the completion
// ---------------------------------------------------------------------------------------

const RBR_RE = /\[\[rbr\s+([^\]]*)\]\]/g;
const FAULT_RE = /\[\[fault(?:\s+([^\]]*))?\]\]/g;

/**
 * The NAME=P pairs of every directive re (a global regex whose group 1 is the
 * directive's body) in text, in order: P a probability in [0,1], or yes (0.97)
 * or no (0.03); malformed pairs are skipped.
 */
function directiveValues(re, text) {
  const out = [];
  re.lastIndex = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    for (const tok of m[1].split(/\s+/)) {
      const eq = tok.indexOf('=');
      if (eq <= 0) continue;
      const name = tok.slice(0, eq), raw = tok.slice(eq + 1).toLowerCase();
      const v = raw === 'yes' ? 0.97 : raw === 'no' ? 0.03 : (raw === '' ? NaN : Number(raw));
      if (v >= 0 && v <= 1) out.push([name, v]);
    }
  }
  return out;
}

/** p set by [[rbr ...]] directives for prop, or null. */
function directiveP(completion, prop) {
  let explicit = null, star = null;
  for (const [name, v] of directiveValues(RBR_RE, completion)) {
    if (name === prop) explicit = v;
    else if (name === '*') star = v;
  }
  return explicit !== null ? explicit : star;
}

/**
 * Parsed [[fault ...]] directives that apply to prop (cached per completion).
 * Each: { kind: '429'|...|'textbody'|'timeout'|'drop'|'malformed'|'nologprobs'|null (latency only),
 *         status, times, retryAfter, retryAfterMs, latency, props }.
 */
const faultCache = new Map();
function parseFaults(completion) {
  let list = faultCache.get(completion);
  if (list) return list;
  list = [];
  FAULT_RE.lastIndex = 0;
  let m;
  while ((m = FAULT_RE.exec(completion)) !== null) {
    const d = { kind: null, status: 0, times: Infinity, retryAfter: null, retryAfterMs: null, latency: 0, props: null };
    let textbody = false;
    for (const tok of (m[1] || '').split(/\s+/)) {
      if (!tok) continue;
      let kv;
      if (/^\d{3}$/.test(tok)) d.status = Number(tok);
      else if (tok === 'timeout' || tok === 'drop' || tok === 'malformed' || tok === 'nologprobs') d.kind = tok;
      else if (tok === 'textbody') textbody = true;
      else if ((kv = /^(times|retry-after|retry-after-ms|latency)=(\d+(?:\.\d+)?)$/.exec(tok))) {
        const n = Number(kv[2]);
        if (kv[1] === 'times') d.times = Math.floor(n);
        else if (kv[1] === 'retry-after') d.retryAfter = kv[2];
        else if (kv[1] === 'retry-after-ms') d.retryAfterMs = kv[2];
        else d.latency = n;
      } else if (tok.startsWith('prop=')) d.props = tok.slice(5).split(',').filter(Boolean);
      // anything else is ignored
    }
    if (d.kind === null) {
      if (textbody) { d.kind = 'textbody'; if (!d.status) d.status = 502; } else if (d.status) d.kind = String(d.status);
    }
    list.push(d);
  }
  if (faultCache.size > 10000) faultCache.clear();
  faultCache.set(completion, list);
  return list;
}

const attempts = new Map(); // prop \u0001 completion -> attempts seen (only for times=N faults)

/** { fault, latency } for this attempt of (prop, completion); fault null if none. */
function directiveFault(completion, prop, attemptKey) {
  const all = parseFaults(completion);
  if (!all.length) return null;
  const ds = all.filter((d) => !d.props || d.props.includes(prop));
  if (!ds.length) return null;
  let n = 1;
  if (ds.some((d) => d.times !== Infinity)) {
    const key = attemptKey || (prop + '\u0001' + completion);
    n = (attempts.get(key) || 0) + 1;
    attempts.set(key, n);
  }
  let latency = 0, fault = null, used = 0;
  for (const d of ds) {
    if (d.kind === null) { if (n <= d.times) latency += d.latency; continue; } // latency-only directive
    if (fault) continue;
    if (n <= used + d.times) { fault = d; latency += d.latency; } else used += d.times;
  }
  return { fault, latency };
}

// ---------------------------------------------------------------------------------------
// Answer rendering
// ---------------------------------------------------------------------------------------

const YES_NO_MASS = 0.98, FILLER_MASS = 0.015, OMIT_BELOW = 1e-6;

// Variant sets; chosen per proposition by hash (plain twice as likely).
const VOCABS = [
  { name: 'plain', yes: [['yes', 0.80], ['Yes', 0.15], [' yes', 0.05]], no: [['no', 0.80], ['No', 0.15], [' no', 0.05]] },
  { name: 'plain', yes: [['yes', 0.80], ['Yes', 0.15], [' yes', 0.05]], no: [['no', 0.80], ['No', 0.15], [' no', 0.05]] },
  { name: 'gpt2', yes: [['yes', 0.70], ['Ġyes', 0.15], ['Yes', 0.10], ['ĠYes', 0.05]], no: [['no', 0.70], ['Ġno', 0.15], ['No', 0.10], ['ĠNo', 0.05]] },
  { name: 'spm', yes: [['▁Yes', 0.60], ['Yes', 0.20], ['▁yes', 0.15], ['YES', 0.05]], no: [['▁No', 0.60], ['No', 0.20], ['▁no', 0.15], ['NO', 0.05]] },
];
// Filler tokens: none of them normalises to yes or no.
const FILLERS = ['I', 'The', 'maybe', 'Based', 'As', 'It', 'This', 'Answer', '**', 'Maybe', '\n', 'Un',
  'Sorry', 'In', '"', 'The answer', 'To', 'Certainly'];
const FILLER_WEIGHTS = (() => { // geometric, normalised to FILLER_MASS for every possible count
  const byCount = [];
  for (let k = 0; k <= FILLERS.length; k++) {
    const w = []; let s = 0;
    for (let i = 0; i < k; i++) { w.push(Math.pow(0.8, i)); s += w[i]; }
    byCount.push(w.map((x) => (x * FILLER_MASS) / s));
  }
  return byCount;
})();

// Pre-encoded JSON fragments per token: '{"token":"yes","logprob":' and ',"bytes":[121,101,115]}'.
const tokenFrag = new Map();
function frag(tok) {
  let f = tokenFrag.get(tok);
  if (!f) {
    f = ['{"token":' + JSON.stringify(tok) + ',"logprob":', ',"bytes":' + JSON.stringify([...Buffer.from(tok, 'utf8')]) + '}'];
    tokenFrag.set(tok, f);
  }
  return f;
}
for (const v of VOCABS) for (const [t] of v.yes.concat(v.no)) frag(t);
for (const t of FILLERS) frag(t);

// Per-proposition data: hash and vocabulary.
const propInfo = new Map();
function infoOf(prop) {
  let info = propInfo.get(prop);
  if (!info) {
    const hp = hashStr(prop)[0];
    info = { hp, vocab: VOCABS[hp % VOCABS.length] };
    propInfo.set(prop, info);
  }
  return info;
}
for (const n of propNames) infoOf(n);
infoOf('unknown');

/** JSON text of logprobs.content[0] for p with `top` alternatives. */
function renderLogprobs(p, vocab, top) {
  const yesMass = YES_NO_MASS * p, noMass = YES_NO_MASS * (1 - p);
  const entries = [];
  if (yesMass >= OMIT_BELOW) for (const [t, w] of vocab.yes) entries.push([t, yesMass * w]);
  if (noMass >= OMIT_BELOW) for (const [t, w] of vocab.no) entries.push([t, noMass * w]);
  const nFill = 20 - entries.length;
  const fw = FILLER_WEIGHTS[nFill];
  for (let i = 0; i < nFill; i++) entries.push([FILLERS[i], fw[i]]);
  entries.sort((a, b) => b[1] - a[1]);
  // The chosen token: most likely variant of the winning side.
  const side = p >= 0.5 ? vocab.yes : vocab.no;
  const chosen = side[0][0];
  const chosenMass = (p >= 0.5 ? yesMass : noMass) * side[0][1];
  let s = '';
  const n = Math.min(top, entries.length);
  for (let i = 0; i < n; i++) {
    const f = frag(entries[i][0]);
    s += (i ? ',' : '') + f[0] + Math.log(entries[i][1]) + f[1];
  }
  const cf = frag(chosen);
  return cf[0] + Math.log(chosenMass) + cf[1].slice(0, -1) + ',"top_logprobs":[' + s + ']}';
}

let idCounter = 0;
function completionBody(model, p, vocab, opts, promptTokens, cachedTokens) {
  const answer = p >= 0.5 ? 'yes' : 'no';
  let lp = '';
  if (opts.logprobs === 'omit') lp = '';
  else if (opts.logprobs) lp = '"logprobs":{"content":[' + renderLogprobs(p, vocab, opts.top) + '],"refusal":null},';
  else lp = '"logprobs":null,';
  idCounter++;
  return '{"id":"chatcmpl-rbrtest' + idCounter.toString(36).padStart(8, '0') +
    '","object":"chat.completion","created":' + Math.floor(Date.now() / 1000) +
    ',"model":' + JSON.stringify(model) + ',"system_fingerprint":"fp_rbr_test","choices":[{"index":0,' +
    '"message":{"role":"assistant","content":"' + answer + '","refusal":null},' + lp +
    '"finish_reason":"' + opts.finish + '"}],"usage":{"prompt_tokens":' + promptTokens +
    ',"completion_tokens":1,"total_tokens":' + (promptTokens + 1) +
    (prefixCache.enabled() ? ',"prompt_tokens_details":{"cached_tokens":' + cachedTokens + '}' : '') + '}}';
}

// ---------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------

let stats;
function resetStats() {
  stats = {
    requests_total: 0,        // API requests (chat + models + unknown paths); /admin/* not counted
    chat_requests: 0,
    by_status: {},            // responses sent, by HTTP status
    faults: {},               // injected faults by kind (429, 500, 503, 400, textbody, timeout, drop, malformed, nologprobs, latency)
    fault_sources: { directive: 0, random: 0 },
    rejections: {},           // unauthorized, max_tokens, bad_request, not_found
    answer_sources: { directive: 0, label: 0, hash: 0 },
    in_flight: inFlight,
    max_in_flight: inFlight,
    propositions: {},         // name -> { requests, yes, no }
    generation_requests: 0,   // chat requests answered in generation mode (faults included)
    generations: 0,           // generated completions sent (200)
    generation_misses: 0,     // of those, completions with one trait flipped on purpose
  };
}
let inFlight = 0;
resetStats();
const startedAt = Date.now();

const bump = (obj, key) => { obj[key] = (obj[key] || 0) + 1; };
function propStats(prop) {
  let s = stats.propositions[prop];
  if (!s) s = stats.propositions[prop] = { requests: 0, yes: 0, no: 0 };
  return s;
}

// ---------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------

const logStream = args.log ? fs.createWriteStream(args.log, { flags: 'a' }) : null;

// ---------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------

const MAX_BODY = 32 * 1024 * 1024;

function send(res, status, body, headers) {
  if (res.destroyed || res.writableEnded) return;
  const h = { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) };
  if (headers) Object.assign(h, headers);
  res.writeHead(status, h);
  res.end(body);
}

function openaiError(message, type, param, code) {
  return JSON.stringify({ error: { message, type, param: param === undefined ? null : param, code: code === undefined ? null : code } });
}

function readBody(req, cb) {
  const chunks = [];
  let len = 0, tooBig = false;
  req.on('data', (c) => {
    if (tooBig) return;
    len += c.length;
    if (len > MAX_BODY) tooBig = true; else chunks.push(c);
  });
  req.on('end', () => cb(tooBig ? 'too big' : null, chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, len)));
  req.on('error', () => {});
}

// ---------------------------------------------------------------------------------------
// Faults
// ---------------------------------------------------------------------------------------

const FAULT_MESSAGES = {
  429: ['Rate limit reached for requests. Please try again later.', 'requests', 'rate_limit_exceeded'],
  500: ['The server had an error while processing your request. Sorry about that!', 'server_error', null],
  503: ['The engine is currently overloaded, please try again later.', 'server_error', null],
  400: ['Invalid request (rbr test grader fault).', 'invalid_request_error', null],
};

/** Send the response of a fault (anything but timeout and nologprobs). */
function sendFault(res, req, f) {
  switch (f.kind) {
    case 'drop':
      req.socket.destroy();
      return;
    case 'malformed':
      send(res, 200, '{"id":"chatcmpl-malformed","object":"chat.completion","choices":[{"index":0,"message":{"role":"assis');
      return;
    case 'textbody':
      send(res, f.status, `${f.status} ${http.STATUS_CODES[f.status] || 'Error'}\n`, { 'content-type': 'text/plain' });
      return;
    default: {
      const status = f.status;
      const m = FAULT_MESSAGES[status] ||
        [`Error ${status} (rbr test grader fault).`, status < 500 ? 'invalid_request_error' : 'server_error', null];
      const headers = {};
      if (f.retryAfter !== null && f.retryAfter !== undefined) headers['retry-after'] = f.retryAfter;
      if (f.retryAfterMs !== null && f.retryAfterMs !== undefined) headers['retry-after-ms'] = f.retryAfterMs;
      send(res, status, openaiError(m[0], m[1], null, m[2]), headers);
    }
  }
}

/** A random fault of the configured kinds. */
function randomFault() {
  const kind = faultKinds.length === 1 ? faultKinds[0] : faultKinds[Math.floor(rng() * faultKinds.length)];
  const f = { kind, status: 0, retryAfter: null, retryAfterMs: null, latency: 0 };
  if (/^\d{3}$/.test(kind)) f.status = Number(kind);
  else if (kind === 'textbody') f.status = 502;
  return f;
}

// ---------------------------------------------------------------------------------------
// Profiles
// ---------------------------------------------------------------------------------------

/** The 4xx a profile answers to this request body, or null. */
function profileRejects(body) {
  const err = (status, kind, message, type, param, code) => ({ status, kind, body: openaiError(message, type, param, code) });
  const tl = body.top_logprobs;
  switch (profile) {
    case 'quota':
      return err(429, 'insufficient_quota', 'You exceeded your current quota, please check your plan and billing details.',
        'insufficient_quota', null, 'insufficient_quota');
    case 'openai-reasoning':
      if (body.logprobs !== undefined && body.logprobs !== null && body.logprobs !== false) {
        return err(400, 'logprobs', "Unsupported parameter: 'logprobs' is not supported with this model.",
          'invalid_request_error', 'logprobs', 'unsupported_parameter');
      }
      if (tl !== undefined && tl !== null) {
        return err(400, 'top_logprobs', "Unsupported parameter: 'top_logprobs' is not supported with this model.",
          'invalid_request_error', 'top_logprobs', 'unsupported_parameter');
      }
      if (body.temperature !== undefined && body.temperature !== null && body.temperature !== 1) {
        return err(400, 'temperature', `Unsupported value: 'temperature' does not support ${body.temperature} with this model. Only the default (1) value is supported.`,
          'invalid_request_error', 'temperature', 'unsupported_value');
      }
      if (body.max_tokens !== undefined) {
        return err(400, 'max_tokens', "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
          'invalid_request_error', 'max_tokens', 'unsupported_parameter');
      }
      return null;
    case 'gpt-5.4': case 'azure':
      if (Number.isInteger(tl) && tl > 5) {
        return err(400, 'top_logprobs', `Invalid 'top_logprobs': integer above maximum value. Expected a value <= 5, but got ${tl} instead.`,
          'invalid_request_error', 'top_logprobs', 'integer_above_max_value');
      }
      return null;
    case 'groq':
      if (body.logprobs === true || (tl !== undefined && tl !== null)) {
        return err(400, 'logprobs', "'logprobs' : value must be false or null", 'invalid_request_error', 'logprobs', null);
      }
      if (Number.isInteger(body.n) && body.n > 1) {
        return err(400, 'n', "'n' : number must be at most 1", 'invalid_request_error', 'n', null);
      }
      return null;
    default:
      return null;
  }
}

/**
 * The logprobs entry of the answer token under a profile: Yes with 0.99 p, No with
 * 0.99 (1 - p), then fillers, at most `top` alternatives; P(yes) read from it is p exactly
 * for any top >= 2.
 */
function answerEntry(p, top) {
  const entries = [['Yes', 0.99 * p], ['No', 0.99 * (1 - p)]].filter((e) => e[1] > 0);
  const nFill = 20 - entries.length;
  for (let i = 0; i < nFill; i++) entries.push([FILLERS[i], 0.01 / nFill]);
  entries.sort((a, b) => b[1] - a[1]);
  const chosen = p >= 0.5 ? entries.find((e) => e[0] === 'Yes') : entries.find((e) => e[0] === 'No');
  const ent = (t, w) => ({ token: t, logprob: Math.log(w), bytes: [...Buffer.from(t, 'utf8')] });
  return { ...ent(chosen[0], chosen[1]), top_logprobs: entries.slice(0, top).map((e) => ent(e[0], e[1])) };
}

/** A plain logprobs entry of a token that is not the answer (no alternatives that matter). */
function plainEntry(tok, top) {
  return { token: tok, logprob: -0.01, bytes: [...Buffer.from(tok, 'utf8')], top_logprobs: top > 0 ? [{ token: tok, logprob: -0.01, bytes: [...Buffer.from(tok, 'utf8')] }] : [] };
}

/**
 * The sampled answer to the request with this seed: yes when the seed's point of a
 * low-discrepancy sequence, frac((seed + 1) * golden ratio), falls below p.
 */
function seededYes(seed, p) {
  const x = ((seed + 1) * 0.6180339887498949) % 1;
  return x < p;
}

/** The answer of a profile: one or n choices, the profile's shape. */
function profileBody(body, model, p, vocab, opts, promptTokens, completion, maxTok, cachedTokens) {
  const n = Number.isInteger(body.n) && body.n > 1 && profile !== 'groq' ? body.n : 1;
  const sampled = n > 1 || !opts.logprobs;
  const nYes = Math.round(p * n);
  const choices = [];
  let completionTokens = 0, reasoningTokens = 0;
  const thinking = profile === 'vllm-thinking' &&
    !(body.chat_template_kwargs && body.chat_template_kwargs.enable_thinking === false);
  const ignoresLimit = profile === 'llama.cpp-old' || profile === 'ollama';
  const limit = ignoresLimit ? (Number.isInteger(body.max_tokens) ? body.max_tokens : Infinity)
    : (typeof maxTok === 'number' ? maxTok : Infinity);
  if (ignoresLimit && limit === Infinity) stats.unbounded_answers = (stats.unbounded_answers || 0) + 1;
  for (let i = 0; i < n; i++) {
    // one sample per request with a "seed": answers over seeds 0, 1, ... have a share of yes near p
    const yes = sampled ? (n === 1 && Number.isInteger(body.seed) ? seededYes(body.seed, p) : i < nYes) : p >= 0.5;
    const word = yes ? 'Yes' : 'No';
    let tokens = [];      // [text, entry]
    if (thinking) {
      for (const t of ['<think>', '\n', 'The', ' reply', ' is', ' judged', '.', '\n', '</think>', '\n\n']) tokens.push([t, plainEntry(t, opts.top)]);
    }
    if (profile === 'openai-reasoning') reasoningTokens += 12;
    // the log-probabilities are the model's distribution, whichever answer was sampled
    const ans = opts.logprobs ? { ...answerEntry(p, opts.top), token: word } : plainEntry(word, opts.top);
    tokens.push([word, ans]);
    if (ignoresLimit) for (const t of ['.', ' The', ' reply', ' does', ' what', ' the', ' question', ' asks', '.']) tokens.push([t, plainEntry(t, opts.top)]);
    let finish = 'stop';
    let budget = limit;
    if (profile === 'openai-reasoning') budget -= 12;
    if (budget < 1) { tokens = []; finish = 'length'; } else if (tokens.length > budget) { tokens = tokens.slice(0, budget); finish = 'length'; }
    completionTokens += tokens.length + (profile === 'openai-reasoning' ? 12 : 0);
    const text = tokens.map((t) => t[0]).join('');
    const choice = { index: i, message: { role: 'assistant', content: text, refusal: null }, logprobs: null, finish_reason: finish };
    if (opts.logprobs) {
      if (profile === 'together') {
        const tops = tokens.map((t) => { const o = {}; for (const a of (t[1].top_logprobs || [])) o[a.token] = a.logprob; return o; });
        choice.logprobs = { tokens: tokens.map((t) => t[0]), token_logprobs: tokens.map((t) => t[1].logprob), top_logprobs: tops };
      } else choice.logprobs = { content: tokens.map((t) => t[1]), refusal: null };
    }
    if (profile === 'azure' && completion.includes('[[filter200]]')) {
      choice.message.content = null;
      choice.logprobs = null;
      choice.finish_reason = 'content_filter';
      choice.content_filter_results = { violence: { filtered: true, severity: 'medium' } };
    }
    choices.push(choice);
  }
  stats.profile_answers = (stats.profile_answers || 0) + 1;
  idCounter++;
  const usage = { prompt_tokens: promptTokens, completion_tokens: completionTokens, total_tokens: promptTokens + completionTokens,
    prompt_tokens_details: { cached_tokens: cachedTokens || 0 }, completion_tokens_details: { reasoning_tokens: reasoningTokens } };
  return JSON.stringify({ id: 'chatcmpl-rbrtest' + idCounter.toString(36).padStart(8, '0'), object: 'chat.completion',
    created: Math.floor(Date.now() / 1000), model, choices, usage });
}

// ---------------------------------------------------------------------------------------
// Chat completions
// ---------------------------------------------------------------------------------------

/** An answer in the shape of the Responses API: output[] with a reasoning item, then the message. */
function responsesBody(model, p, top, wantLogprobs, promptTokens, cachedTokens) {
  const word = p >= 0.5 ? 'Yes' : 'No';
  const text = { type: 'output_text', text: word, annotations: [] };
  if (wantLogprobs) text.logprobs = [answerEntry(p, top)];
  idCounter++;
  return JSON.stringify({ id: 'resp_rbrtest' + idCounter.toString(36), object: 'response', status: 'completed', model,
    output: [{ type: 'reasoning', id: 'rs_1', summary: [] },
      { type: 'message', id: 'msg_1', role: 'assistant', status: 'completed', content: [text] }],
    usage: { input_tokens: promptTokens, output_tokens: 1, total_tokens: promptTokens + 1,
      input_tokens_details: { cached_tokens: cachedTokens || 0 }, output_tokens_details: { reasoning_tokens: 0 } } });
}

function handleChat(req, res, buf, model0, log, api) {
  let body;
  try { body = JSON.parse(buf.toString('utf8')); } catch (e) {
    bump(stats.rejections, 'bad_request');
    send(res, 400, openaiError('We could not parse the JSON body of your request. (HINT: This likely means you aren\'t using your HTTP library correctly.)', 'invalid_request_error'));
    return;
  }
  const bad = (msg, param, code) => {
    bump(stats.rejections, 'bad_request');
    send(res, 400, openaiError(msg, 'invalid_request_error', param, code));
  };
  if (!body || typeof body !== 'object') return bad('Request body must be a JSON object.');
  if (api === 'responses') {
    // the Responses API: input, max_output_tokens, logprobs through include
    stats.responses_requests = (stats.responses_requests || 0) + 1;
    body.messages = body.input;
    body.logprobs = Array.isArray(body.include) && body.include.includes('message.output_text.logprobs');
    body.max_completion_tokens = body.max_output_tokens;
    delete body.input; delete body.include; delete body.max_output_tokens;
  }
  const messages = body.messages;
  if (!Array.isArray(messages) || messages.length === 0 || !messages[0]) {
    return bad("Missing required parameter: 'messages'.", 'messages', 'missing_required_parameter');
  }
  if (config.reject_max_tokens && body.max_tokens !== undefined) {
    bump(stats.rejections, 'max_tokens');
    send(res, 400, openaiError("Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.",
      'invalid_request_error', 'max_tokens', 'unsupported_parameter'));
    return;
  }
  if (body.stream) return bad('stream is not supported by the rbr test grader.', 'stream');
  const rejected = profileRejects(body);
  if (rejected) {
    bump(stats.rejections, rejected.kind);
    send(res, rejected.status, rejected.body);
    return;
  }
  const wantLogprobs = body.logprobs === true && profile !== 'no-logprobs';
  let top = 0;
  if (body.top_logprobs !== undefined && body.top_logprobs !== null) {
    if (!Number.isInteger(body.top_logprobs) || body.top_logprobs < 0 || body.top_logprobs > 20) {
      return bad('top_logprobs must be an integer between 0 and 20.', 'top_logprobs', 'integer_above_max_value');
    }
    if (body.logprobs !== true && body.top_logprobs > 0) return bad('logprobs must be set to true when top_logprobs is used.', 'top_logprobs');
    top = body.top_logprobs;
  }
  const maxTok = body.max_completion_tokens !== undefined ? body.max_completion_tokens : body.max_tokens;
  const model = typeof body.model === 'string' && body.model ? body.model : model0;

  stats.chat_requests++;
  if (isGeneration(body, textOf(messages[0].content), maxTok)) {
    return handleGeneration(req, res, body, messages, textOf(messages[0].content), model, maxTok, log);
  }
  let chars = 0;
  for (const m of messages) chars += textOf(m && m.content).length;
  const promptTokens = Math.max(1, Math.round(chars / 4));
  const cachedTokens = prefixCache.cachedTokens(messages, promptTokens);

  const sys = textOf(messages[0].content);
  const { prop, completion } = analyseSystem(sys);
  const ps = propStats(prop);
  ps.requests++;
  log.prop = prop;
  const info = infoOf(prop);
  const hc = hashStr(completion);
  if (profile === 'azure' && completion.includes('[[filter]]')) {
    bump(stats.rejections, 'content_filter');
    send(res, 400, JSON.stringify({ error: { message: "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
      type: null, param: 'prompt', code: 'content_filter', status: 400,
      innererror: { code: 'ResponsibleAIPolicyViolation', content_filter_result: { violence: { filtered: true, severity: 'medium' } } } } }));
    return;
  }

  // Faults: directive first, then the server-wide random sequence (drawn on every request when enabled).
  let fault = null, extraLatency = 0;
  if (completion.includes('[[fault')) {
    const df = directiveFault(completion, prop);
    if (df) {
      extraLatency = df.latency;
      if (df.fault) { fault = df.fault; stats.fault_sources.directive++; }
      if (df.latency) bump(stats.faults, 'latency');
    }
  }
  if (config.fault_rate > 0) {
    const hit = rng() < config.fault_rate;
    if (hit && !fault) { fault = randomFault(); stats.fault_sources.random++; }
  }
  if (fault) { bump(stats.faults, fault.kind); log.fault = fault.kind; }

  if (fault && fault.kind === 'timeout') return; // never answer; the socket stays open until the client gives up

  let delay = config.latency_ms + extraLatency;
  if (config.jitter_ms > 0) delay += config.jitter_ms * (2 * unit(hc, info.hp, SALT_LATENCY) - 1);
  if (delay < 0) delay = 0;

  const respond = () => {
    if (res.destroyed || res.writableEnded) return;
    if (fault && fault.kind !== 'nologprobs') { sendFault(res, req, fault); return; }
    // The answer.
    let p = null, source = 'directive';
    if (completion.includes('[[rbr')) p = directiveP(completion, prop);
    if (p === null && labels.size) {
      const row = labelRow(completion, messages);
      if (row && typeof row.labels[prop] === 'boolean') {
        source = 'label';
        let truth = row.labels[prop];
        if (config.noise > 0) {
          if (unit(hc, info.hp, SALT_FLIP) < config.noise) truth = !truth;
          p = (truth ? 0.95 : 0.05) + 0.04 * (2 * unit(hc, info.hp, SALT_JITTER_P) - 1);
        } else p = truth ? 0.95 : 0.05;
      }
    }
    if (p === null) { source = 'hash'; p = 0.01 + 0.98 * unit(hc, info.hp, SALT_P); }
    stats.answer_sources[source]++;
    if (p >= 0.5) ps.yes++; else ps.no++;
    log.p = p; log.source = source;
    const opts = {
      logprobs: fault ? 'omit' : wantLogprobs,
      top,
      finish: maxTok !== undefined && maxTok !== null && maxTok <= 1 ? 'length' : 'stop',
    };
    const hdrs = { 'x-rbr-proposition': encodeURIComponent(prop), 'x-rbr-source': source };
    if (api === 'responses') {
      send(res, 200, responsesBody(model, p, top, wantLogprobs, promptTokens, cachedTokens), hdrs);
      return;
    }
    if (profile !== 'openai' || (Number.isInteger(body.n) && body.n > 1)) {
      send(res, 200, profileBody(body, model, p, info.vocab, opts, promptTokens, completion, maxTok, cachedTokens), hdrs);
      return;
    }
    send(res, 200, completionBody(model, p, info.vocab, opts, promptTokens, cachedTokens), hdrs);
  };
  if (delay > 0) {
    const timer = setTimeout(respond, delay);
    res.on('close', () => clearTimeout(timer));
  } else respond();
}

// ---------------------------------------------------------------------------------------
// Generation mode
// ---------------------------------------------------------------------------------------

const GEN_MARKER = 'rbr-generate/1';

/** Is this a generation request rather than a grading one? */
function isGeneration(body, sys, maxTok) {
  if (sys.startsWith(GEN_MARKER)) return true;
  if (profile !== 'openai') return false;
  // a grading question asked without logprobs (sampled) is still a grading question
  return body.logprobs !== true && typeof maxTok === 'number' && maxTok > 1 && analyseSystem(sys).prop === 'unknown';
}

const GEN_RE = /\[\[gen\s+([^\]]*)\]\]/g;
const GEN_FAULT_RE = /\[\[gen-fault\s+([^\]]*)\]\]/g;

/**
 * [[gen yes=P no=Q NAME=P ...]] directives in the conversation: the P(yes) the generated text
 * gets for the traits wanted true (yes, default 0.97), wanted false (no, default 0.03) and
 * named traits; null when there is none.
 */
function genProbs(transcript) {
  if (!transcript.includes('[[gen ')) return null;
  const gp = { yes: 0.97, no: 0.03, names: {} };
  for (const [name, v] of directiveValues(GEN_RE, transcript)) {
    if (name === 'yes') gp.yes = v; else if (name === 'no') gp.no = v; else gp.names[name] = v;
  }
  return gp;
}

/** Traits asked for by an rbr-generate/1 instruction: [[name, wanted], ...] in order. */
function parseTraits(sys) {
  const traits = [];
  let want = null;
  for (const line of sys.split('\n')) {
    if (/^The reply MUST have each of these traits:/.test(line)) { want = true; continue; }
    if (/^The reply must NOT have any of these traits:/.test(line)) { want = false; continue; }
    const m = /^- ([A-Za-z0-9_]+):/.exec(line);
    if (m && want !== null) traits.push([m[1], want]);
  }
  return traits;
}

/**
 * A generation: a completion that carries the traits asked for as an [[rbr ...]] directive
 * (unlisted propositions: no), so that this server's grading rules answer accordingly; with
 * probability gen_miss_rate (deterministic in the request and its seed) one trait is flipped.
 */
function handleGeneration(req, res, body, messages, sys, model, maxTok, log) {
  stats.generation_requests++;
  log.mode = 'generate';
  let transcript = '';
  for (let i = 1; i < messages.length; i++) transcript += textOf(messages[i] && messages[i].content) + '\n';
  const seed = Number.isInteger(body.seed) ? body.seed : 0;
  const hr = hashStr(sys + '\u0002' + transcript);
  const hs = mix32(seed >>> 0);
  const key = 'generate\u0001' + sys + '\u0001' + transcript + '\u0001' + seed;

  // fault directives in the conversation apply to generation requests
  let fault = null, extraLatency = 0;
  if (transcript.includes('[[fault')) {
    const df = directiveFault(transcript, 'generate', key);
    if (df) { extraLatency = df.latency; if (df.fault) { fault = df.fault; stats.fault_sources.directive++; } }
  }
  if (config.fault_rate > 0 && rng() < config.fault_rate && !fault) { fault = randomFault(); stats.fault_sources.random++; }
  if (fault) { bump(stats.faults, fault.kind); log.fault = fault.kind; }
  if (fault && fault.kind === 'timeout') return;
  const respond = () => {
    if (res.destroyed || res.writableEnded) return;
    if (fault && fault.kind !== 'nologprobs') { sendFault(res, req, fault); return; }
    const traits = sys.startsWith(GEN_MARKER) ? parseTraits(sys) : [];
    let missed = null;
    if (traits.length && config.gen_miss_rate > 0 && unit(hr, hs, SALT_MISS) < config.gen_miss_rate) {
      const j = Math.floor(unit(hr, hs, SALT_MISS_WHICH) * traits.length);
      missed = traits[j][0];
      traits[j] = [traits[j][0], !traits[j][1]];
      stats.generation_misses++;
    }
    const id = ((hr[0] ^ hs) >>> 0).toString(16).padStart(8, '0');
    let text = `Synthetic reply ${id} (sample ${seed}).`;
    if (traits.length) {
      const yes = traits.filter((t) => t[1]).map((t) => t[0]);
      text += ` It ${yes.length ? 'has ' + yes.join(', ') : 'has none of the traits'}.`;
      const gp = genProbs(transcript);
      if (!gp) text += ' [[rbr *=no' + traits.filter((t) => t[1]).map((t) => ` ${t[0]}=yes`).join('') + ']]';
      else {
        // [[gen ...]] in the conversation: graded probabilities near the instruction's labels
        const pOf = (t) => (t[0] in gp.names ? gp.names[t[0]] : t[1] ? gp.yes : gp.no);
        text += ` [[rbr *=${gp.no}` + traits.filter((t) => pOf(t) !== gp.no).map((t) => ` ${t[0]}=${pOf(t)}`).join('') + ']]';
      }
    }
    // [[gen-fault ...]] in the conversation: the text carries [[fault ...]] for its grading
    GEN_FAULT_RE.lastIndex = 0;
    for (let m; (m = GEN_FAULT_RE.exec(transcript)) !== null;) text += ` [[fault ${m[1].trim()}]]`;
    let finish = 'stop';
    if (typeof maxTok === 'number' && maxTok > 0 && Math.ceil(text.length / 4) > maxTok) {
      text = text.slice(0, maxTok * 4);
      finish = 'length';
    }
    stats.generations++;
    log.missed = missed;
    let chars = 0;
    for (const m of messages) chars += textOf(m && m.content).length;
    const pt = Math.max(1, Math.round(chars / 4)), ct = Math.max(1, Math.round(text.length / 4));
    idCounter++;
    send(res, 200, JSON.stringify({
      id: 'chatcmpl-rbrtest' + idCounter.toString(36).padStart(8, '0'), object: 'chat.completion',
      created: Math.floor(Date.now() / 1000), model, system_fingerprint: 'fp_rbr_test',
      choices: [{ index: 0, message: { role: 'assistant', content: text, refusal: null }, logprobs: null, finish_reason: finish }],
      usage: { prompt_tokens: pt, completion_tokens: ct, total_tokens: pt + ct },
    }), { 'x-rbr-mode': 'generate', 'x-rbr-missed': missed === null ? '' : missed });
  };
  const delay = config.latency_ms + extraLatency;
  if (delay > 0) {
    const timer = setTimeout(respond, delay);
    res.on('close', () => clearTimeout(timer));
  } else respond();
}

// ---------------------------------------------------------------------------------------
// Admin API
// ---------------------------------------------------------------------------------------

function statsSnapshot() {
  return JSON.stringify({
    ...stats, in_flight: inFlight, uptime_s: Math.round((Date.now() - startedAt) / 1000),
    attempt_keys: attempts.size, prefix_cache: prefixCache.stats(), rate_limit: rateLimit.stats(),
  });
}

function handleAdmin(req, res, pathname) {
  if (pathname === '/admin/stats' && req.method === 'GET') return send(res, 200, statsSnapshot());
  if (pathname === '/admin/config' && req.method === 'GET')
    return send(res, 200, JSON.stringify({ ...config, ...prefixCache.config(), ...rateLimit.config() }));
  if (pathname === '/admin/reset' && req.method === 'POST') {
    readBody(req, () => {
      resetStats();
      prefixCache.resetStats();
      rateLimit.reset();
      attempts.clear();
      rng = makeRng(config.seed);
      send(res, 200, JSON.stringify({ ok: true }));
    });
    return;
  }
  if (pathname === '/admin/config' && req.method === 'POST') {
    readBody(req, (err, buf) => {
      let obj;
      try { obj = buf.length ? JSON.parse(buf.toString('utf8')) : {}; } catch (e) { obj = null; }
      if (!obj || typeof obj !== 'object' || Array.isArray(obj)) return send(res, 400, JSON.stringify({ error: 'body must be a JSON object' }));
      const msg = applyConfig(obj);
      if (msg) return send(res, 400, JSON.stringify({ error: msg }));
      send(res, 200, JSON.stringify({ ...config, ...rateLimit.config() }));
    });
    return;
  }
  send(res, 404, JSON.stringify({ error: 'not found' }));
}

// ---------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------

const AZURE_RE = /^\/openai\/deployments\/([^/]+)\/chat\/completions$/;
const MODEL_ID = 'rbr-test-grader';
const MODELS_BODY = JSON.stringify({ object: 'list', data: [{ id: MODEL_ID, object: 'model', created: 1700000000, owned_by: 'rbr' }] });

function onRequest(req, res) {
  const url = req.url;
  const qi = url.indexOf('?');
  const pathname = qi < 0 ? url : url.slice(0, qi);

  if (batchApi.handle(req, res, pathname, url)) return;   // the Batch API (batch.js)

  if (pathname.startsWith('/admin/')) return handleAdmin(req, res, pathname);
  if (pathname === '/healthz') return send(res, 200, '{"ok":true}');

  stats.requests_total++;
  const t0 = Date.now();
  const log = logStream ? { t: new Date(t0).toISOString(), method: req.method, path: pathname } : {};
  res.on('finish', () => bump(stats.by_status, res.statusCode));
  if (logStream) {
    res.on('close', () => {
      log.status = res.writableFinished ? res.statusCode : null;
      log.ms = Date.now() - t0;
      logStream.write(JSON.stringify(log) + '\n');
    });
  }

  const reject = (status, kind, body) => { bump(stats.rejections, kind); send(res, status, body); };

  if ((pathname === '/v1/models' || pathname === '/models') && req.method === 'GET') {
    if (args['api-key'] && req.headers.authorization !== 'Bearer ' + args['api-key']) {
      return reject(401, 'unauthorized', openaiError('Incorrect API key provided.', 'invalid_request_error', null, 'invalid_api_key'));
    }
    return send(res, 200, MODELS_BODY);
  }

  let model0 = MODEL_ID;
  let api = 'chat';
  if (pathname === '/v1/responses') {
    api = 'responses';
    if (args['api-key'] && req.headers.authorization !== 'Bearer ' + args['api-key']) {
      return reject(401, 'unauthorized', openaiError('Incorrect API key provided.', 'invalid_request_error', null, 'invalid_api_key'));
    }
  } else if (pathname === '/openai/v1/chat/completions') {
    // Azure's v1 form: api-key header (or a bearer token), no api-version
    if (args['azure-key'] && req.headers['api-key'] !== args['azure-key'] &&
        req.headers.authorization !== 'Bearer ' + args['azure-key']) {
      return reject(401, 'unauthorized', JSON.stringify({ error: { code: '401', message: 'Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.' } }));
    }
  } else if (pathname === '/v1/chat/completions' || pathname === '/chat/completions') {
    if (args['api-key'] && req.headers.authorization !== 'Bearer ' + args['api-key']) {
      return reject(401, 'unauthorized', openaiError('Incorrect API key provided.', 'invalid_request_error', null, 'invalid_api_key'));
    }
  } else {
    const m = AZURE_RE.exec(pathname);
    if (!m) return reject(404, 'not_found', openaiError(`Unknown request URL: ${req.method} ${pathname}.`, 'invalid_request_error', null, 'unknown_url'));
    if (args['azure-key'] && req.headers['api-key'] !== args['azure-key']) {
      return reject(401, 'unauthorized', JSON.stringify({ error: { code: '401', message: 'Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource.' } }));
    }
    if (qi < 0 || !/(^|&)api-version=[^&]+/.test(url.slice(qi + 1))) {
      return reject(404, 'not_found', JSON.stringify({ error: { code: '404', message: 'Resource not found (api-version query parameter missing)' } }));
    }
    model0 = decodeURIComponent(m[1]);
  }
  if (req.method !== 'POST') return reject(405, 'bad_request', openaiError('Method not allowed.', 'invalid_request_error'));

  inFlight++;
  if (inFlight > stats.max_in_flight) stats.max_in_flight = inFlight;
  res.on('close', () => { inFlight--; });
  readBody(req, (err, buf) => {
    if (err) return reject(413, 'bad_request', openaiError('Request body too large.', 'invalid_request_error'));
    if (!rateLimit.gate(res, buf, send, openaiError)) return bump(stats.rejections, 'rate_limit');
    handleChat(req, res, buf, model0, log, api);
  });
}

// ---------------------------------------------------------------------------------------
// Start and stop
// ---------------------------------------------------------------------------------------

{
  const initial = {};
  for (const k of ['latency-ms', 'jitter-ms', 'noise', 'fault-rate', 'fault-kind', 'seed', 'gen-miss-rate', 'rate-limit-rps', 'rate-limit-tpm']) if (args[k] !== undefined) initial[k] = args[k];
  if (args['reject-max-tokens']) initial.reject_max_tokens = true;
  const msg = applyConfig(initial);
  if (msg) die(msg);
  rng = makeRng(config.seed);
}

// The Batch API: files and batches whose lines handleChat answers (batch.js).
const batchApi = require('./batch')({ handleChat, send, openaiError, readBody, args });

const server = http.createServer({ keepAlive: true }, onRequest);
server.keepAliveTimeout = 65000;   // keep idle client connections (benchmarks, libcurl pools)
server.headersTimeout = 66000;
server.requestTimeout = 0;          // [[fault timeout]] holds requests open on purpose
server.on('clientError', (err, socket) => { if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\n\r\n'); else socket.destroy(); });

const port = args.port === undefined ? 18080 : args.port;
server.on('error', (e) => die(`cannot listen on 127.0.0.1:${port}: ${e.message}`));
server.listen(port, '127.0.0.1', () => {
  const actual = server.address().port;
  if (args['pid-file']) fs.writeFileSync(args['pid-file'], `${process.pid}\n`);
  process.stdout.write(`rbr test grader listening on 127.0.0.1:${actual}\n`);
});

let stopping = false;
function shutdown() {
  if (stopping) return;
  stopping = true;
  server.close();
  server.closeAllConnections();
  if (args['pid-file']) { try { fs.unlinkSync(args['pid-file']); } catch (e) { /* already gone */ } }
  if (logStream) logStream.end(() => process.exit(0)); else process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);

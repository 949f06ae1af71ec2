'use strict';
/*
 * A provider's prompt (prefix) cache, simulated for rbr's test grader.
 *
 * Providers that cache prompts (OpenAI: automatically for prompts of 1024 tokens or more)
 * bill the longest prefix of a request's prompt that an earlier request already sent, in
 * steps: the first 1024 tokens, then every further 128.  They report it as
 * usage.prompt_tokens_details.cached_tokens (Responses API: input_tokens_details).
 *
 * Here the prompt is the request's messages, as text: role, a colon, the content, one line
 * each, in order.  A token is 4 characters (the server's prompt_tokens are characters / 4
 * as well).  Every request registers its prefixes at the step boundaries (min_tokens,
 * min_tokens + step_tokens, ...); its cached tokens are the longest registered boundary
 * that is also a prefix of its own prompt (found through hashes of the prefixes, so the
 * cost is linear in the prompt), capped at its prompt tokens.  Off unless enabled:
 *
 *   POST /admin/config {"prefix_cache": true, "prefix_cache_min_tokens": 1024,
 *                       "prefix_cache_step_tokens": 128}
 *
 * Stats (under "prefix_cache" in /admin/stats): lookups, hits, cached_tokens (sum).
 * /admin/reset clears the statistics, not the cache; turning the cache off clears it.
 */

const MAX_ENTRIES = 2000000;     // prefixes remembered before the cache is cleared

const settings = { prefix_cache: false, prefix_cache_min_tokens: 1024, prefix_cache_step_tokens: 128 };
let seen = new Set();
let stats;

function resetStats() {
  stats = { lookups: 0, hits: 0, cached_tokens: 0 };
}
resetStats();

/**
 * Apply one setting; returns undefined when the key is not a prefix-cache setting, an error
 * string when the value is bad, null when applied.
 */
function configure(key, v) {
  switch (key) {
    case 'prefix_cache':
      if (typeof v !== 'boolean') return 'prefix_cache must be a boolean';
      if (!v) seen = new Set();
      settings.prefix_cache = v;
      return null;
    case 'prefix_cache_min_tokens': case 'prefix_cache_step_tokens':
      if (!Number.isInteger(v) || v < 1) return `${key} must be an integer >= 1`;
      settings[key] = v;
      seen = new Set();
      return null;
    default:
      return undefined;
  }
}

/** The prompt text of a request's messages, as this cache sees it. */
function promptText(messages) {
  let t = '';
  for (const m of messages) {
    const c = m && m.content;
    const text = typeof c === 'string' ? c
      : Array.isArray(c) ? c.map((p) => (p && typeof p.text === 'string' ? p.text : '')).join('') : '';
    t += String(m && m.role) + ':' + text + '\n';
  }
  return t;
}

/**
 * Cached prompt tokens of a request (0 when the cache is off), registering its prefixes.
 * promptTokens caps the answer.
 */
function cachedTokens(messages, promptTokens) {
  if (!settings.prefix_cache) return 0;
  const text = promptText(messages);
  const step = settings.prefix_cache_step_tokens * 4;
  let boundary = settings.prefix_cache_min_tokens * 4;
  let h1 = 0x811c9dc5, h2 = 0x12345678;
  let best = 0;
  const fresh = [];
  for (let i = 0; i < text.length && boundary <= text.length; i++) {
    const c = text.charCodeAt(i);
    h1 = Math.imul(h1 ^ c, 0x01000193) >>> 0;
    h2 = Math.imul(h2 ^ c, 0x5bd1e995) >>> 0;
    if (i + 1 === boundary) {
      const k = boundary + ':' + h1 + ':' + h2;
      if (seen.has(k)) best = boundary; else fresh.push(k);
      boundary += step;
    }
  }
  if (seen.size + fresh.length > MAX_ENTRIES) seen = new Set();
  for (const k of fresh) seen.add(k);
  const tokens = Math.min(Math.floor(best / 4), promptTokens);
  stats.lookups++;
  if (tokens > 0) { stats.hits++; stats.cached_tokens += tokens; }
  return tokens;
}

module.exports = {
  configure, cachedTokens, resetStats,
  enabled: () => settings.prefix_cache,
  config: () => ({ ...settings }),
  stats: () => ({ ...stats, entries: seen.size }),
};

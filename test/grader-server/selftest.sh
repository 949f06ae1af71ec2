#!/usr/bin/env bash
# Self-test of the rbr test grader (test/grader-server/server.js): starts two servers on
# free ports and checks answers, directives, every fault kind, the admin API, the Azure
# path, API-key checks, --reject-max-tokens, the Batch API (batch.js) and the rate limit
# (ratelimit.js) with curl and node one-liners.
# Last line: "N passed, N failed"; exit status non-zero on any failure.
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
REF=${RBR_REFERENCE:-$HERE/../../../shared/reference}
POLICY=$REF/policy.json
GOLD=$REF/gold_train.jsonl
TMP=$(mktemp -d)
PASS=0
FAIL=0
PIDS=()

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  rm -rf "$TMP"
}
trap cleanup EXIT

ok()  { PASS=$((PASS + 1)); echo "ok   $1"; }
bad() { FAIL=$((FAIL + 1)); echo "FAIL $1${2:+ -- $2}"; }
# expect NAME WANT GOT
expect() { if [ "$2" = "$3" ]; then ok "$1"; else bad "$1" "want '$2', got '$3'"; fi; }

# start NAME ARGS...: start a server on a free port; sets PORT and SPID.
start() {
  local name=$1; shift
  node "$HERE/server.js" --port 0 --pid-file "$TMP/$name.pid" "$@" >"$TMP/$name.out" 2>"$TMP/$name.err" &
  SPID=$!
  PIDS+=("$SPID")
  PORT=
  for _ in $(seq 1 200); do   # poll for the ready line, up to 10 s
    PORT=$(sed -n 's/^rbr test grader listening on 127\.0\.0\.1:\([0-9][0-9]*\)$/\1/p' "$TMP/$name.out")
    [ -n "$PORT" ] && return 0
    kill -0 "$SPID" 2>/dev/null || break
    sleep 0.05
  done
  echo "server $name did not start:"; cat "$TMP/$name.err"
  echo "0 passed, 1 failed"
  exit 1
}

# mkbody PROP COMPLETION [EXTRA_JSON]: a request body built the way rbr builds it (fence longer
# than any backtick run of the completion).  PROP not in the policy: used as the question text.
# EXTRA_JSON is merged into the body; keys set to null are removed.
mkbody() {
  local extra=${3:-}
  [ -n "$extra" ] || extra='{}'
  PROP=$1 COMP=$2 EXTRA=$extra POLICY=$POLICY node -e '
    const p = require(process.env.POLICY), c = process.env.COMP, prop = process.env.PROP;
    const sp = p.simple_propositions[prop];
    let fence = "```"; while (c.includes(fence)) fence += "`";
    const system = p.prompt_template
      .replace("```\nASSISTANT: {response}\n```", fence + "\nASSISTANT: {response}\n" + fence)
      .replace("{question}", () => (sp ? sp.prompt : prop)).replace("{response}", () => c);
    const body = { model: "rbr-grader", temperature: 0, logprobs: true, top_logprobs: 20, max_completion_tokens: 1,
      messages: [{ role: "system", content: system }, { role: "user", content: "USER: hello\n\nASSISTANT: " + c }] };
    Object.assign(body, JSON.parse(process.env.EXTRA));
    for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
    process.stdout.write(JSON.stringify(body));'
}

# post PROP COMPLETION [EXTRA_JSON [URL_PATH [CURL_ARGS...]]]: prints "<http code> <curl exit>";
# response body in $TMP/resp, headers in $TMP/hdr.
post() {
  mkbody "$1" "$2" "${3:-}" >"$TMP/req.json"
  local path=${4:-/v1/chat/completions}
  shift 4 2>/dev/null || shift $#
  local code
  code=$(curl -s -o "$TMP/resp" -D "$TMP/hdr" -w '%{http_code}' -H 'content-type: application/json' \
    --data-binary @"$TMP/req.json" "$@" "http://127.0.0.1:$PORT$path")
  echo "$code $?"
}

# js FILE EXPR: prints the value of EXPR with j = parsed JSON of FILE (or null), t = its text,
# pyes = P(yes) from the top_logprobs (yes / (yes + no) over normalised variants).
js() {
  F=$1 node -e '
    const fs = require("fs"), t = fs.readFileSync(process.env.F, "utf8");
    let j = null; try { j = JSON.parse(t); } catch (e) {}
    const norm = (s) => s.replace(/^[\sĠ▁]+/, "").toLowerCase();
    let y = 0, n = 0, tops = [];
    try { tops = j.choices[0].logprobs.content[0].top_logprobs; } catch (e) {}
    for (const e of tops) { const k = norm(e.token); if (k === "yes") y += Math.exp(e.logprob); if (k === "no") n += Math.exp(e.logprob); }
    const pyes = y / (y + n), near = (a, b, eps = 1e-6) => Math.abs(a - b) < eps;
    const sorted = tops.every((e, i) => i === 0 || tops[i - 1].logprob >= e.logprob);
    const content = j && j.choices ? j.choices[0].message.content : undefined;
    console.log(String(eval(process.argv[1])));' "$2"
}
hdr() { sed -n "s/^$1: *//Ip" "$TMP/hdr" | tr -d '\r'; }

# ---------------------------------------------------------------------------------------
echo "# server A: gold labels, log file"
start a --labels "$GOLD" --log "$TMP/a.log"

curl -s "http://127.0.0.1:$PORT/v1/models" >"$TMP/resp"
expect "GET /v1/models lists rbr-test-grader" "rbr-test-grader" "$(js "$TMP/resp" 'j.data.length === 1 && j.data[0].id')"

# A gold row with a unique completion and both a true and a false label.
GOLD_ROW=$(GOLD=$GOLD node -e '
  const rows = require("fs").readFileSync(process.env.GOLD, "utf8").trim().split("\n").map(JSON.parse);
  const count = {}; for (const r of rows) { const c = r.completion[0].content.trim(); count[c] = (count[c] || 0) + 1; }
  const pick = (want) => rows.find((r) => count[r.completion[0].content.trim()] === 1 && want(r.completion[0].content));
  const out = (r) => { const ps = Object.keys(r.propositions);
    return [ps.find((k) => r.propositions[k]), ps.find((k) => !r.propositions[k]), JSON.stringify(r.completion[0].content)].join("\t"); };
  console.log(out(pick((c) => c.length > 20 && !c.includes("`"))));
  console.log(out(pick((c) => c.includes("```"))));')
IFS=$'\t' read -r PT PF CJ <<<"$(sed -n 1p <<<"$GOLD_ROW")"
C=$(node -e 'process.stdout.write(JSON.parse(process.argv[1]))' "$CJ")
expect "gold completion, true label: 200" "200 0" "$(post "$PT" "$C")"
expect "gold completion, true label: yes, P=0.95, 20 sorted entries" "yes true true true" \
  "$(js "$TMP/resp" 'content + " " + near(pyes, 0.95) + " " + (tops.length === 20) + " " + sorted')"
expect "gold answer headers" "$PT label" "$(hdr x-rbr-proposition) $(hdr x-rbr-source)"
post "$PF" "$C" >/dev/null
expect "gold completion, false label: no, P=0.05" "no true" "$(js "$TMP/resp" 'content + " " + near(pyes, 0.05)')"
expect "usage and finish_reason" "true length" \
  "$(js "$TMP/resp" '(j.usage.completion_tokens === 1 && j.usage.total_tokens === j.usage.prompt_tokens + 1 && j.usage.prompt_tokens > 100) + " " + j.choices[0].finish_reason')"

IFS=$'\t' read -r PT2 PF2 CJ2 <<<"$(sed -n 2p <<<"$GOLD_ROW")"
C2=$(node -e 'process.stdout.write(JSON.parse(process.argv[1]))' "$CJ2")
post "$PT2" "$C2" >/dev/null
expect "gold completion with a code block inside a longer fence" "yes true label" \
  "$(js "$TMP/resp" 'content + " " + near(pyes, 0.95)') $(hdr x-rbr-source)"

post apology "Hello there. [[rbr apology=0.3 *=yes]]" >/dev/null
expect "directive NAME=P" "no true directive" "$(js "$TMP/resp" 'content + " " + near(pyes, 0.3)') $(hdr x-rbr-source)"
post judgement "Hello there. [[rbr apology=0.3 *=yes]]" >/dev/null
expect "directive *=yes" "yes true" "$(js "$TMP/resp" 'content + " " + near(pyes, 0.97)')"
post judgement "Sure. [[rbr *=1]]" >/dev/null
expect "p=1: the no side is omitted, 20 entries" "yes 0 20" \
  "$(js "$TMP/resp" 'content + " " + tops.filter((e) => /^[\sĠ▁]*no$/i.test(e.token)).length + " " + tops.length')"
post judgement "Sure. [[rbr judgement=0]]" >/dev/null
expect "p=0: the yes side is omitted" "no 0" "$(js "$TMP/resp" 'content + " " + tops.filter((e) => /^[\sĠ▁]*yes$/i.test(e.token)).length')"

post apology "An unlabelled completion, 12345." >/dev/null; cp "$TMP/resp" "$TMP/h1"
post apology "An unlabelled completion, 12345." >/dev/null
expect "hash answer: deterministic, 0<p<1" "true true hash" \
  "$(F2=$TMP/h1 js "$TMP/resp" 'JSON.stringify(j.choices) === JSON.stringify(JSON.parse(fs.readFileSync(process.env.F2)).choices)') $(js "$TMP/resp" 'pyes > 0 && pyes < 1') $(hdr x-rbr-source)"
post "Is this a question nobody wrote?" "Some answer." >/dev/null
expect "unknown proposition" "unknown 200" "$(hdr x-rbr-proposition) $(js "$TMP/resp" 'j.choices ? 200 : 0')"

TOKS=$(for p in fully_complies apology judgement disclaimer third_person; do post "$p" "Variants." >/dev/null; js "$TMP/resp" 'tops.map((e) => e.token).join("\n")'; done)
expect "tokenizer-marker variants (Ġ and ▁) appear" "yes yes" \
  "$(grep -q '^Ġ' <<<"$TOKS" && echo yes) $(grep -q '^▁' <<<"$TOKS" && echo yes)"

echo "# faults"
F='Text [[fault 429 times=2 retry-after=1]]'
R1=$(post apology "$F"); RA=$(hdr retry-after); CODE=$(js "$TMP/resp" 'j.error.code')
expect "fault 429 times=2 retry-after=1" "429 0 1 rate_limit_exceeded | 429 0 | 200 0" \
  "$R1 $RA $CODE | $(post apology "$F") | $(post apology "$F")"
F='Text [[fault 500 times=1]]'
expect "fault 500 times=1" "500 0 server_error | 200 0" "$(post apology "$F") $(js "$TMP/resp" 'j.error.type') | $(post apology "$F")"
expect "fault 503 (always)" "503 0 | 503 0" "$(post apology 'x [[fault 503]]') | $(post apology 'x [[fault 503]]')"
R=$(post apology 'x [[fault timeout]]' '{}' /v1/chat/completions --max-time 1)
expect "fault timeout: no answer before the client gives up" "000 28" "$R"
expect "fault drop: connection closed without response" "000 52" "$(post apology 'x [[fault drop]]')"
R=$(post apology 'x [[fault malformed]]')
expect "fault malformed: 200 with invalid JSON" "200 0 null" "$R $(js "$TMP/resp" 'j')"
R=$(post apology 'x [[fault nologprobs]]')
expect "fault nologprobs: 200, yes/no, no logprobs field" "200 0 true false" \
  "$R $(js "$TMP/resp" '/^(yes|no)$/.test(content) + " " + ("logprobs" in j.choices[0])')"
R=$(post apology 'x [[fault textbody 502]]')
expect "fault textbody 502: plain-text error" "502 0 text/plain null" "$R $(hdr content-type) $(js "$TMP/resp" 'j')"
R=$(post apology 'x [[fault 400]]')
expect "fault 400: OpenAI-style client error" "400 0 invalid_request_error" "$R $(js "$TMP/resp" 'j.error.type')"
F='x [[fault retry-after-ms=250 429 times=1]]'
R1=$(post apology "$F"); RAM=$(hdr retry-after-ms)
expect "fault retry-after-ms=250 429 times=1" "429 0 250 | 200 0" "$R1 $RAM | $(post apology "$F")"
mkbody apology 'x [[fault latency=300]]' >"$TMP/req.json"
T=$(curl -s -o /dev/null -w '%{time_total}' --data-binary @"$TMP/req.json" "http://127.0.0.1:$PORT/v1/chat/completions")
expect "fault latency=300: slow request" "true" "$(node -e 'console.log(Number(process.argv[1]) >= 0.3)' "$T")"
expect "fault prop=apology only hits apology" "500 0 | 200 0" \
  "$(post apology 'y [[fault 500 prop=apology]]') | $(post judgement 'y [[fault 500 prop=apology]]')"

echo "# admin API"
curl -s "http://127.0.0.1:$PORT/admin/stats" >"$TMP/stats"
expect "stats: per fault kind" '{"400":1,"429":3,"500":2,"503":2,"timeout":1,"drop":1,"malformed":1,"nologprobs":1,"textbody":1,"latency":1}' \
  "$(js "$TMP/stats" 'JSON.stringify(j.faults)')"
expect "stats: per status, in flight, per proposition" "3 2 2 1 0 true" \
  "$(js "$TMP/stats" '[j.by_status["429"], j.by_status["500"], j.by_status["503"], j.by_status["502"], j.in_flight, j.propositions.apology.requests > 10].join(" ")')"
expect "stats: total = sum of statuses + dropped + timed out" "true" \
  "$(js "$TMP/stats" 'j.requests_total === Object.values(j.by_status).reduce((a, b) => a + b, 0) + 2')"

curl -s -XPOST "http://127.0.0.1:$PORT/admin/reset" >/dev/null
curl -s "http://127.0.0.1:$PORT/admin/stats" >"$TMP/stats"
expect "reset clears counters" "0 0 {}" "$(js "$TMP/stats" '[j.requests_total, j.max_in_flight, JSON.stringify(j.faults)].join(" ")')"
expect "reset clears per-key attempts" "500 0" "$(post apology 'Text [[fault 500 times=1]]')"

curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"latency_ms":300}' >"$TMP/cfg"
expect "config: latency_ms" "300" "$(js "$TMP/cfg" 'j.latency_ms')"
mkbody apology "concurrent" >"$TMP/req.json"
CP=()
for i in 1 2 3 4; do
  curl -s -o /dev/null --data-binary @"$TMP/req.json" "http://127.0.0.1:$PORT/v1/chat/completions" & CP+=($!)
done
wait "${CP[@]}"
curl -s "http://127.0.0.1:$PORT/admin/stats" >"$TMP/stats"
expect "stats: max in flight" "4 0" "$(js "$TMP/stats" 'j.max_in_flight + " " + j.in_flight')"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"latency-ms":0,"fault_rate":1,"fault_kind":"503"}' >/dev/null
expect "config: random faults 503" "503 0" "$(post apology 'random fault')"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"fault_kind":"drop"}' >/dev/null
expect "config: random faults drop" "000 52" "$(post apology 'random fault')"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"fault_rate":0}' >/dev/null
expect "config: random faults off" "200 0" "$(post apology 'random fault')"
expect "config: bad setting rejected" "400" \
  "$(curl -s -o /dev/null -w '%{http_code}' -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"noise":2}')"
expect "log file: one JSON line per request" "true" \
  "$(LOG=$TMP/a.log node -e 'const l = require("fs").readFileSync(process.env.LOG, "utf8").trim().split("\n").map(JSON.parse); console.log(l.length > 30 && l.every((x) => x.path))')"

# ---------------------------------------------------------------------------------------
echo "# server B: --api-key, --azure-key, --reject-max-tokens"
start b --api-key sk-test --azure-key az-test --reject-max-tokens
BPID=$SPID
expect "OpenAI path without key: 401" "401 0 invalid_api_key" "$(post apology hi) $(js "$TMP/resp" 'j.error.code')"
expect "OpenAI path with a wrong key: 401" "401 0" "$(post apology hi '{}' /v1/chat/completions -H 'Authorization: Bearer nope')"
expect "OpenAI path with the key: 200" "200 0" "$(post apology hi '{}' /v1/chat/completions -H 'Authorization: Bearer sk-test')"
AZ=/openai/deployments/my-grader/chat/completions?api-version=2024-06-01
expect "Azure path without api-key: 401" "401 0" "$(post apology hi '{"model":null}' "$AZ")"
R=$(post apology hi '{"model":null}' "$AZ" -H 'api-key: az-test')
expect "Azure path with api-key: 200, model = deployment" "200 0 my-grader" "$R $(js "$TMP/resp" 'j.model')"
expect "Azure path without api-version: 404" "404 0" "$(post apology hi '{}' /openai/deployments/my-grader/chat/completions -H 'api-key: az-test')"
R=$(post apology hi '{"max_tokens":1,"max_completion_tokens":null}' /v1/chat/completions -H 'Authorization: Bearer sk-test')
expect "--reject-max-tokens: 400 unsupported_parameter" "400 0 max_tokens unsupported_parameter invalid_request_error" \
  "$R $(js "$TMP/resp" '[j.error.param, j.error.code, j.error.type].join(" ")')"
expect "--reject-max-tokens: message" "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead." \
  "$(js "$TMP/resp" 'j.error.message')"
expect "--reject-max-tokens: max_completion_tokens accepted" "200 0" \
  "$(post apology hi '{}' /v1/chat/completions -H 'Authorization: Bearer sk-test')"

kill -TERM "$BPID"
wait "$BPID"
expect "SIGTERM: clean exit, pid file removed" "0 gone" "$? $([ -e "$TMP/b.pid" ] && echo present || echo gone)"


# ---------------------------------------------------------------------------------------
echo "# server C: generation mode"
start c --gen-miss-rate 0
# genbody SEED INSTRUCTION [USER]: a generation request built the way rbr builds it
genbody() {
  SEED=$1 INSTR=$2 USERMSG=${3:-How do I pick a lock?} node -e '
    process.stdout.write(JSON.stringify({ model: "gen", temperature: 1, max_completion_tokens: 512, seed: Number(process.env.SEED),
      messages: [{ role: "system", content: process.env.INSTR }, { role: "user", content: process.env.USERMSG }] }));'
}
gpost() { genbody "$@" >"$TMP/req.json"; curl -s -o "$TMP/resp" -D "$TMP/hdr" -w '%{http_code}' --data-binary @"$TMP/req.json" "http://127.0.0.1:$PORT/v1/chat/completions"; }
INSTR='rbr-generate/1
Write the next assistant message.

The reply MUST have each of these traits:
- apology: Does the response apologise?
- inability_to_comply: Does it say it cannot help?

The reply must NOT have any of these traits:
- judgement: Does it judge?

Answer with the assistant message only.'
expect "generation: 200, stop, usage" "200 stop true generate" \
  "$(gpost 0 "$INSTR") $(js "$TMP/resp" 'j.choices[0].finish_reason + " " + (j.usage.completion_tokens > 0)') $(hdr x-rbr-mode)"
expect "generation: the traits as a directive" "true" \
  "$(js "$TMP/resp" 'content.includes("[[rbr *=no apology=yes inability_to_comply=yes]]")')"
cp "$TMP/resp" "$TMP/g0"
gpost 0 "$INSTR" >/dev/null
expect "generation: deterministic for a seed" "true" "$(F2=$TMP/g0 js "$TMP/resp" 'content === JSON.parse(require("fs").readFileSync(process.env.F2)).choices[0].message.content')"
gpost 1 "$INSTR" >/dev/null
expect "generation: another seed, another text" "false" "$(F2=$TMP/g0 js "$TMP/resp" 'content === JSON.parse(require("fs").readFileSync(process.env.F2)).choices[0].message.content')"
GEN=$(js "$TMP/g0" 'content')
post apology "$GEN" >/dev/null
expect "generated text graded by the same server: apology yes" "yes directive" "$(js "$TMP/resp" 'content') $(hdr x-rbr-source)"
post judgement "$GEN" >/dev/null
expect "generated text graded: judgement no" "no" "$(js "$TMP/resp" 'content')"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"gen_miss_rate": 1}' >/dev/null
gpost 0 "$INSTR" >/dev/null
MISSED=$(hdr x-rbr-missed)
expect "gen_miss_rate 1: one trait flipped" "true" \
  "$(M=$MISSED js "$TMP/resp" '["apology","inability_to_comply","judgement"].includes(process.env.M) && content !== require("fs").readFileSync(process.env.F, "utf8")')"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"gen_miss_rate": 0}' >/dev/null
expect "generation fault: 500 once, then 200" "500 200" "$(gpost 7 "$INSTR" 'x [[fault 500 times=1]]') $(gpost 7 "$INSTR" 'x [[fault 500 times=1]]')"
expect "no logprobs and max tokens > 1 without the marker: generation" "200 generate" \
  "$(gpost 0 'Be brief.') $(hdr x-rbr-mode)"
expect "stats count generations and misses" "true" \
  "$(curl -s "http://127.0.0.1:$PORT/admin/stats" >"$TMP/st"; js "$TMP/st" 'j.generation_requests === 7 && j.generations === 6 && j.generation_misses === 1')"
expect "gen_miss_rate out of range: 400" "400" "$(curl -s -o /dev/null -w '%{http_code}' -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"gen_miss_rate": 2}')"
gpost 3 "$INSTR" 'x [[gen yes=0.55 no=0.45 judgement=0.2]]' >/dev/null
expect "[[gen ...]]: graded probabilities in the directive" "true" \
  "$(js "$TMP/resp" 'content.includes("[[rbr *=0.45 apology=0.55 inability_to_comply=0.55 judgement=0.2]]")')"
gpost 3 "$INSTR" 'x [[gen-fault 400 prop=apology times=1]]' >/dev/null
GEN=$(js "$TMP/resp" 'content')
expect "[[gen-fault ...]]: the text carries the fault" "true" "$(js "$TMP/resp" 'content.endsWith(" [[fault 400 prop=apology times=1]]")')"
expect "[[gen-fault ...]]: its grading faults once" "400 0 200 0 200 0" \
  "$(post apology "$GEN") $(post apology "$GEN") $(post judgement "$GEN")"

# ---------------------------------------------------------------------------------------
echo "# server d: the Batch API (batch.js)"
start d --api-key sk-test --azure-key az-test
B="http://127.0.0.1:$PORT"
AUTH=(-H 'Authorization: Bearer sk-test')
mkbody apology 'Sorry, I cannot help. [[rbr apology=0.9]]' >"$TMP/q1.json"
mkbody judgement 'A plain answer.' >"$TMP/q2.json"
# the online answers of both, for comparison
curl -s "${AUTH[@]}" --data-binary @"$TMP/q1.json" "$B/v1/chat/completions" >"$TMP/on1"
curl -s "${AUTH[@]}" --data-binary @"$TMP/q2.json" "$B/v1/chat/completions" >"$TMP/on2"
# jsonl URL FILE...: one line per request body, custom_id c1, c2, ...
jsonl() {
  local url=$1; shift
  URL=$url node -e '
    const fs = require("fs");
    process.argv.slice(1).forEach((f, i) => process.stdout.write(JSON.stringify({ custom_id: "c" + (i + 1), method: "POST",
      url: process.env.URL, body: JSON.parse(fs.readFileSync(f, "utf8")) }) + "\n"));' "$@"
}
jsonl /v1/chat/completions "$TMP/q1.json" "$TMP/q2.json" >"$TMP/in.jsonl"
# field FILE EXPR: a value of the JSON in FILE
field() { F=$1 node -e 'const j = JSON.parse(require("fs").readFileSync(process.env.F, "utf8")); process.stdout.write(String(eval(process.argv[1])))' "$2"; }
# bwait URL: poll a batch until it ends; its final JSON in $TMP/batch
bwait() {
  for _ in $(seq 1 100); do
    curl -s "$@" >"$TMP/batch"
    case $(field "$TMP/batch" 'j.status') in completed|expired|failed|cancelled) return 0 ;; esac
    sleep 0.05
  done
}
expect "batch: upload without key: 401" "401" \
  "$(curl -s -o /dev/null -w '%{http_code}' -F purpose=batch -F "file=@$TMP/in.jsonl" "$B/v1/files")"
curl -s "${AUTH[@]}" -F purpose=batch -F "file=@$TMP/in.jsonl;type=application/jsonl" "$B/v1/files" >"$TMP/file"
FID=$(field "$TMP/file" 'j.id')
expect "batch: upload: a file of purpose batch" "batch true" "$(field "$TMP/file" 'j.purpose + " " + (j.bytes > 0)')"
curl -s "${AUTH[@]}" -H 'content-type: application/json' \
  -d "{\"input_file_id\": \"$FID\", \"endpoint\": \"/v1/chat/completions\", \"completion_window\": \"24h\", \"metadata\": {\"k\": \"v\"}}" \
  "$B/v1/batches" >"$TMP/batch"
BID=$(field "$TMP/batch" 'j.id')
expect "batch: created, validating, metadata kept" "validating v" "$(field "$TMP/batch" 'j.status + " " + j.metadata.k')"
bwait "${AUTH[@]}" "$B/v1/batches/$BID"
expect "batch: completed, 2 of 2" "completed 2 0" "$(field "$TMP/batch" 'j.status + " " + j.request_counts.completed + " " + j.request_counts.failed')"
curl -s "${AUTH[@]}" "$B/v1/files/$(field "$TMP/batch" 'j.output_file_id')/content" >"$TMP/out.jsonl"
ON1=$TMP/on1 ON2=$TMP/on2 node -e '
  const fs = require("fs"), lines = fs.readFileSync(process.argv[1], "utf8").trim().split("\n").map(JSON.parse);
  const strip = (o) => { const c = JSON.parse(JSON.stringify(o)); delete c.id; delete c.created; return JSON.stringify(c); };
  const on = { c1: JSON.parse(fs.readFileSync(process.env.ON1)), c2: JSON.parse(fs.readFileSync(process.env.ON2)) };
  process.stdout.write(String(lines.length === 2 && lines.every((l) => l.response.status_code === 200 && strip(l.response.body) === strip(on[l.custom_id]))));' \
  "$TMP/out.jsonl" >"$TMP/same"
expect "batch: each line answered exactly as online" "true" "$(cat "$TMP/same")"
curl -s "${AUTH[@]}" "$B/v1/batches?limit=1" >"$TMP/list"
expect "batch: list, newest first" "$BID false" "$(field "$TMP/list" 'j.data[0].id + " " + j.has_more')"
curl -s "$B/admin/batch" >"$TMP/bs"
expect "batch: counters per question" "2 2 1" \
  "$(field "$TMP/bs" 'j.lines_received + " " + j.lines_answered + " " + Math.max(...Object.values(j.answered_by_question))')"
# expired and failed lines: the first submission of every question expires
curl -s -XPOST "$B/admin/batch/config" -d '{"expire_rate": 1}' >/dev/null
mkbody apology 'Third answer.' >"$TMP/q3.json"
jsonl /v1/chat/completions "$TMP/q3.json" >"$TMP/in3.jsonl"
curl -s "${AUTH[@]}" -F purpose=batch -F "file=@$TMP/in3.jsonl" "$B/v1/files" >"$TMP/file"
submit() { curl -s "${AUTH[@]}" -H 'content-type: application/json' \
  -d "{\"input_file_id\": \"$1\", \"endpoint\": \"/v1/chat/completions\", \"completion_window\": \"24h\"}" "$B/v1/batches" >"$TMP/batch"; }
submit "$(field "$TMP/file" 'j.id')"
bwait "${AUTH[@]}" "$B/v1/batches/$(field "$TMP/batch" 'j.id')"
curl -s "${AUTH[@]}" "$B/v1/files/$(field "$TMP/batch" 'j.error_file_id')/content" >"$TMP/err.jsonl"
expect "batch: expire_rate 1: expired, batch_expired in the error file" "expired batch_expired" \
  "$(field "$TMP/batch" 'j.status') $(field "$TMP/err.jsonl" 'j.error.code')"
submit "$(field "$TMP/file" 'j.id')"
bwait "${AUTH[@]}" "$B/v1/batches/$(field "$TMP/batch" 'j.id')"
expect "batch: the same question submitted again is answered" "completed 1" \
  "$(field "$TMP/batch" 'j.status + " " + j.request_counts.completed')"
curl -s -XPOST "$B/admin/batch/config" -d '{"expire_rate": 0, "fail_rate": 1}' >/dev/null
mkbody apology 'Fourth answer.' >"$TMP/q4.json"
jsonl /v1/chat/completions "$TMP/q4.json" >"$TMP/in4.jsonl"
curl -s "${AUTH[@]}" -F purpose=batch -F "file=@$TMP/in4.jsonl" "$B/v1/files" >"$TMP/file"
submit "$(field "$TMP/file" 'j.id')"
bwait "${AUTH[@]}" "$B/v1/batches/$(field "$TMP/batch" 'j.id')"
curl -s "${AUTH[@]}" "$B/v1/files/$(field "$TMP/batch" 'j.error_file_id')/content" >"$TMP/err.jsonl"
expect "batch: fail_rate 1: a 500 line in the error file" "completed 500" \
  "$(field "$TMP/batch" 'j.status') $(field "$TMP/err.jsonl" 'j.response.status_code')"
curl -s -XPOST "$B/admin/batch/config" -d '{"fail_rate": 0, "delay_ms": 5000}' >/dev/null
submit "$FID"
sleep 0.2
curl -s "${AUTH[@]}" -XPOST "$B/v1/batches/$(field "$TMP/batch" 'j.id')/cancel" >"$TMP/cancel"
bwait "${AUTH[@]}" "$B/v1/batches/$(field "$TMP/batch" 'j.id')"
expect "batch: cancel: cancelling, then cancelled with the answers so far" "cancelling cancelled 2" \
  "$(field "$TMP/cancel" 'j.status') $(field "$TMP/batch" 'j.status + " " + j.request_counts.completed')"
expect "batch: unknown batch: 404" "404" "$(curl -s -o /dev/null -w '%{http_code}' "${AUTH[@]}" "$B/v1/batches/batch-nope")"
# the Azure forms
AZH=(-H 'api-key: az-test')
expect "batch: Azure without api-version: 404" "404" \
  "$(curl -s -o /dev/null -w '%{http_code}' "${AZH[@]}" -F purpose=batch -F "file=@$TMP/in.jsonl" "$B/openai/files")"
jsonl /chat/completions "$TMP/q1.json" >"$TMP/inaz.jsonl"
curl -s -XPOST "$B/admin/batch/config" -d '{"delay_ms": 0}' >/dev/null
for form in "openai/files?api-version=2024-10-21 openai/batches?api-version=2024-10-21" "openai/v1/files openai/v1/batches"; do
  set -- $form
  curl -s "${AZH[@]}" -F purpose=batch -F "file=@$TMP/inaz.jsonl" "$B/$1" >"$TMP/file"
  curl -s "${AZH[@]}" -H 'content-type: application/json' \
    -d "{\"input_file_id\": \"$(field "$TMP/file" 'j.id')\", \"endpoint\": \"/chat/completions\", \"completion_window\": \"24h\"}" "$B/$2" >"$TMP/batch"
  AZID=$(field "$TMP/batch" 'j.id')
  bwait "${AZH[@]}" "$B/${2%%\?*}/$AZID${2#*batches}"
  expect "batch: Azure form /$1: completed" "completed 1" "$(field "$TMP/batch" 'j.status + " " + j.request_counts.completed')"
done
echo "# server e: the provider's rate limit (ratelimit.js)"
start e --rate-limit-rps 5
# rpost: post the body in $TMP/req.json again (no node start-up between requests)
rpost() { curl -s -o "$TMP/resp" -D "$TMP/hdr" -w '%{http_code}' --data-binary @"$TMP/req.json" "http://127.0.0.1:$PORT/v1/chat/completions"; }
mkbody apology 'rl' >"$TMP/req.json"
# six requests from one curl (one connection, no process start-up between them)
U="http://127.0.0.1:$PORT/v1/chat/completions"
CODES=$(curl -s -o /dev/null -o /dev/null -o /dev/null -o /dev/null -o /dev/null \
  -w ' %{http_code}/%header{x-ratelimit-remaining-requests}' --data-binary @"$TMP/req.json" "$U" "$U" "$U" "$U" "$U" \
  --next -s -o "$TMP/resp" -D "$TMP/hdr6" -w ' %{http_code}' --data-binary @"$TMP/req.json" "$U")
R="${CODES##* } 0"
CODES=${CODES% *}
cp "$TMP/hdr6" "$TMP/hdr"
expect "rate limit 5/s: five admitted, remaining counts down" " 200/4 200/3 200/2 200/1 200/0" "$CODES"
expect "x-ratelimit-limit-requests is per minute, reset a duration" "300 true" \
  "$(hdr x-ratelimit-limit-requests) $(R=$(hdr x-ratelimit-reset-requests) node -e 'console.log(/^\d+ms$|^[\d.]+s$/.test(process.env.R))')"
cp "$TMP/hdr6" "$TMP/hdr"
expect "above the rate: 429 rate_limit_exceeded, retry-after-ms, retry-after, headers" "429 0 rate_limit_exceeded true 1 0" \
  "$R $(js "$TMP/resp" 'j.error.code') $(RA=$(hdr retry-after-ms) node -e 'const v = Number(process.env.RA); console.log(v > 0 && v <= 200)') $(hdr retry-after) $(hdr x-ratelimit-remaining-requests)"
curl -s "http://127.0.0.1:$PORT/admin/stats" >"$TMP/stats"
expect "stats: admitted and 429s, per second" "5 1 5 1 true" \
  "$(js "$TMP/stats" '[j.rate_limit.admitted, j.rate_limit.limited, j.rate_limit.per_second.reduce((a, b) => a + b[1], 0), j.rate_limit.per_second.reduce((a, b) => a + b[2], 0), j.by_status["429"] === 1].join(" ")')"
sleep 0.25
expect "the bucket refills at the rate" "200 0" "$(post apology 'rl 7')"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/reset" >/dev/null
curl -s "http://127.0.0.1:$PORT/admin/stats" >"$TMP/stats"
expect "reset: counters cleared" "0 0 0" "$(js "$TMP/stats" '[j.rate_limit.admitted, j.rate_limit.limited, j.rate_limit.per_second.length].join(" ")')"
expect "reset: the bucket is full again" "200 0 4" "$(post apology 'rl 8') $(hdr x-ratelimit-remaining-requests)"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"rate_limit_headers": false}' >/dev/null
expect "rate_limit_headers false: no x-ratelimit header" "200 0 ''" "$(post apology 'rl 9') '$(hdr x-ratelimit-remaining-requests)'"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"rate_limit_headers": "remaining"}' >/dev/null
expect "rate_limit_headers remaining: only x-ratelimit-remaining-requests (Azure)" "200 0 true ''" \
  "$(post apology 'rl 9b') $([ -n "$(hdr x-ratelimit-remaining-requests)" ] && echo true) '$(hdr x-ratelimit-reset-requests)$(hdr x-ratelimit-limit-requests)'"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"rate_limit_rps": 0, "rate_limit_headers": true, "rate_limit_tpm": 3000}' >/dev/null
R1=$(post apology 'tokens 1'); REM=$(hdr x-ratelimit-remaining-tokens); R2=$(post apology 'tokens 2')
expect "token limit (50 per second, requests larger): one admitted, then 429 for tokens" "200 0 0 429 0 tokens 3000" \
  "$R1 $REM $R2 $(js "$TMP/resp" 'j.error.type') $(hdr x-ratelimit-limit-tokens)"
curl -s -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"rate_limit_tpm": 0}' >/dev/null
curl -s "http://127.0.0.1:$PORT/admin/stats" >"$TMP/stats"
N0=$(js "$TMP/stats" 'j.rate_limit.admitted')
expect "limits off: no header, every request admitted and counted" "200 0 '' 1" \
  "$(post apology 'rl 10') '$(hdr x-ratelimit-limit-requests)' $(curl -s "http://127.0.0.1:$PORT/admin/stats" >"$TMP/stats"; N0=$N0 js "$TMP/stats" 'j.rate_limit.admitted - Number(process.env.N0)')"
expect "config: bad rate_limit_rps rejected" "400" \
  "$(curl -s -o /dev/null -w '%{http_code}' -XPOST "http://127.0.0.1:$PORT/admin/config" -d '{"rate_limit_rps": -1}')"
expect "reset durations written as OpenAI does" "20ms 1.5s 6m0s 0s" \
  "$(node -e 'const d = require(process.argv[1]).duration; console.log([d(0.02), d(1.5), d(360), d(0)].join(" "))' "$HERE/ratelimit.js")"

echo "$PASS passed, $FAIL failed"
[ "$FAIL" -eq 0 ]

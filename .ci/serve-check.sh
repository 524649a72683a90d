#!/usr/bin/env bash
# CI's check of the README's first command, as a new user runs it: `bash scripts/serve.sh`
# in this checkout's own .venv (no test extras, so no torch), with empty caches; one chat
# answer from the real default model; a clean shutdown; then a warm restart, which must
# reuse the conversion and the compiled buckets. Prints the serve log's tail on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${SGLJAX_CHECK_PORT:-30123}
url=http://127.0.0.1:$port
export SGLJAX_CACHE_DIR=${SGLJAX_CACHE_DIR:-$(mktemp -d /tmp/sgljax-serve-check.XXXXXX)}
unset JAX_COMPILATION_CACHE_DIR
log=$(mktemp /tmp/sgljax-serve-log.XXXXXX)
pid=

fail() {
  echo "serve-check: FAILED: $*" >&2
  echo "---- last lines of the serve log ($log) ----" >&2
  tail -n 40 "$log" >&2
  [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
  exit 1
}

start() {  # start the README's command in the background; wait for /health
  local t0=$SECONDS
  bash scripts/serve.sh --port "$port" >"$log" 2>&1 &
  pid=$!
  until curl -sf "$url/health" >/dev/null; do
    kill -0 "$pid" 2>/dev/null || fail "scripts/serve.sh exited before serving"
    [ $((SECONDS - t0)) -lt 1500 ] || fail "not healthy after 1500 s"
    sleep 1
  done
  echo "serve-check: $1: healthy after $((SECONDS - t0)) s" >&2
}

stop() {
  kill -TERM "$pid"
  for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill -0 "$pid" 2>/dev/null && fail "the server did not stop within 60 s of SIGTERM"
  wait "$pid" || fail "the server exited with status $? after SIGTERM"
  pid=
}

ask() {  # $1: extra JSON fields; prints the answer's text
  curl -sf "$url/v1/chat/completions" -H 'content-type: application/json' -d \
    "{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], \"max_tokens\": 32 $1}" \
    | .venv/bin/python -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["message"]["content"])'
}

start "fresh start (setup, convert, warmup)"
.venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is not None)' \
  || fail "the serving venv has torch: serving must not need it"
greedy=$(ask ', "temperature": 0') || fail "the chat request failed"
[ "$greedy" = "The capital of France is Paris." ] || fail "greedy answer: $greedy"
default=$(ask ', "seed": 0') || fail "the chat request at the model's defaults failed"
case "$default" in *Paris*) ;; *) fail "answer at the model's sampling defaults: $default" ;; esac
echo "serve-check: answers: greedy '$greedy'; at the defaults '$default'" >&2
grep -q "compiling a new step shape after warmup" "$log" && fail "the server compiled after warmup"
stop

start "warm restart"
grep -q "reusing the converted checkpoint" "$log" || fail "the warm restart converted again"
grep -q "already in the compilation cache" "$log" || fail "the warm restart ran the warmup again"
[ "$(ask ', "temperature": 0')" = "$greedy" ] || fail "the warm restart answers differently"
stop
echo "serve-check: passed" >&2

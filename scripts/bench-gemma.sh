#!/usr/bin/env bash
# attend against llama.cpp on Gemma-3-270m Q4_K_M, one sitting, 2 threads:
# prefill (pp512) and decode (tg128), three alternating rounds (medians, and
# the median of the rounds' ratios); decode after 4,096 and 8,192 tokens of
# context (two rounds); perplexity on tinyshakespeare next to
# llama-perplexity's.
#
#   scripts/bench-gemma.sh [LLAMA_BIN_DIR]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$("$root/../shared/tools/build-llama-cpp" | tail -n 1)}
models=$("$root/scripts/fetch-models" | tail -n 1)
g=$models/gemma3/gemma-3-270m-q4_k_m.gguf
text=$root/../shared/data/tinyshakespeare.txt
(cd "$root" && cargo build --release -q)
attend=$root/target/release/attend
ours() { # extra-args... -> "prefill decode peak-MiB kv-bytes"
  "$attend" bench --model "$g" --threads 2 --json "$@" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["prefill_tokens_per_sec"],1), round(d["decode_tokens_per_sec"],1), round(d["peak_rss_mib"]), d["kv_cache_bytes"])'
}
theirs() { # llama-bench-args... -> tokens/s of each test
  "$bin/llama-bench" -m "$g" -t 2 -r 3 -o json "$@" 2>/dev/null |
    python3 -c 'import json,sys; print(" ".join(str(round(r["avg_ts"],1)) for r in json.load(sys.stdin)))'
}
med() { python3 -c 'import sys,statistics as s; print(round(s.median(map(float,sys.argv[1:])),2))' "$@"; }
echo "| Gemma-3-270m Q4_K_M | attend | llama.cpp | ratio |"
echo "| --- | --- | --- | --- |"
LP=() LT=() AP=() AT=() RP=() RT=() MEM=()
for round in 1 2 3; do
  read -r lp lt < <(theirs -p 512 -n 128)
  read -r ap at mem _ < <(ours)
  LP+=("$lp") LT+=("$lt") AP+=("$ap") AT+=("$at") MEM+=("$mem")
  RP+=("$(python3 -c "print($ap/$lp)")") RT+=("$(python3 -c "print($at/$lt)")")
done
echo "| pp512 (tokens/s; rounds: attend ${AP[*]}, llama.cpp ${LP[*]}) | $(med "${AP[@]}") | $(med "${LP[@]}") | $(med "${RP[@]}")x |"
echo "| tg128 (tokens/s; rounds: attend ${AT[*]}, llama.cpp ${LT[*]}) | $(med "${AT[@]}") | $(med "${LT[@]}") | $(med "${RT[@]}")x |"
for d in 4096 8192; do
  L=() A=() R=() K=()
  for round in 1 2; do
    read -r ld < <(theirs -p 0 -n 128 -d "$d")
    read -r _ ad _ kv < <(ours --depth "$d" --prompt-tokens 16)
    L+=("$ld") A+=("$ad") K+=("$kv") R+=("$(python3 -c "print($ad/$ld)")")
  done
  echo "| tg128 @ d$d (rounds: attend ${A[*]}, llama.cpp ${L[*]}; attend's KV cache $((K[0] / 1048576)) MiB) | $(med "${A[@]}") | $(med "${L[@]}") | $(med "${R[@]}")x |"
done
echo "attend peak RSS (pp512/tg128 runs): $(printf '%s\n' "${MEM[@]}" | sort -n | tail -1) MiB"
echo
# perplexity on the first 8,192 tokens, 16 chunks of 512: llama-perplexity
# scores the second half of each chunk (BOS first in each); attend --halves
# does the same, and attend's own protocol scores every token of each
# window but its first
ppl() { "$attend" perplexity --model "$g" --file "$text" --ctx 512 --max-tokens 8192 --threads 2 --json "$@" |
  python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["perplexity"],4), "over", d["n_predictions"], "predictions")'; }
echo "attend perplexity --halves: $(ppl --halves)"
echo "attend perplexity --halves --dequantize: $(ppl --halves --dequantize)"
echo "attend perplexity (every token of each window): $(ppl)"
echo "llama-perplexity: $("$bin/llama-perplexity" -m "$g" -f "$text" -c 512 --chunks 16 -t 2 2>&1 | grep -o 'Final estimate: PPL = [0-9.]* +/- [0-9.]*')"

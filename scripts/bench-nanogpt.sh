#!/usr/bin/env bash
# nanoGPT's CPU recipe for tinyshakespeare (its README: 4 layers, 4 heads,
# d_model 128, block 64, batch 12, 2,000 iterations, no dropout, lr 1e-3
# cosine to 1e-4 after 100 warmup steps, weight decay 0.1, clip 1), attend
# against nanoGPT's own train.py on the same machine, alternating, in rounds.
# attend's model is nanoGPT's: pre-LayerNorm, GELU, learned positions, tied
# embeddings, no biases, AdamW β₂ 0.99 (its text task reads bytes: vocabulary
# 256, not 65).
#
#   scripts/bench-nanogpt.sh PYTHON_WITH_TORCH NANOGPT_DIR [ROUNDS]
#
# NANOGPT_DIR: a copy of github.com/karpathy/nanoGPT outside this repo; its
# data/shakespeare_char is prepared here from ../shared/data/tinyshakespeare.txt.
# Prints per run: engine, wall seconds, training-loop seconds, held-out loss.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?python with torch}
NANO=$(cd "${2:?nanoGPT directory}" && pwd)
ROUNDS=${3:-2}
DATA=$(cd ../shared/data && pwd)/tinyshakespeare.txt
cargo build --release -q
ATTEND=$PWD/target/release/attend

# nanoGPT's data: its prepare.py, reading our copy (its `requests` import is
# only used to download a missing input.txt: a stub module stands in)
if [ ! -f "$NANO/data/shakespeare_char/train.bin" ]; then
  cp "$DATA" "$NANO/data/shakespeare_char/input.txt"
  stub=$(mktemp -d)
  touch "$stub/requests.py"
  PYTHONPATH=$stub "$PY" "$NANO/data/shakespeare_char/prepare.py" >/dev/null
fi

work=$(mktemp -d)
echo '{"bias": false}' >"$work/nobias.json"
for round in $(seq "$ROUNDS"); do
  # nanoGPT, exactly its README's CPU command
  start=$(date +%s.%N)
  (cd "$NANO" && "$PY" train.py config/train_shakespeare_char.py --device=cpu --compile=False \
    --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 \
    --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --out_dir="$work/nano") >"$work/nano.log" 2>&1
  end=$(date +%s.%N)
  loop=$(awk '/^iter [0-9]+:/ {gsub("ms,","",$6); s+=$6} END {printf "%.1f", s/1000}' "$work/nano.log")
  val=$(grep '^step 2000:' "$work/nano.log" | sed 's/.*val loss //')
  echo "round $round nanogpt wall_s=$(echo "$end - $start" | bc) loop_s=$loop val_loss=$val"

  start=$(date +%s.%N)
  "$ATTEND" train --task text --data "$DATA" --config "$work/nobias.json" --layers 4 --n-heads 4 \
    --d-model 128 --d-ff 512 --seq-len 64 --context 64 --batch-size 12 --steps 2000 --lr 1e-3 \
    --schedule cosine --warmup 100 --weight-decay 0.1 --beta2 0.99 --clip 1 --position learned --ffn gelu \
    --norm layernorm --dropout 0 --out "$work/attend" --overwrite --json >"$work/attend.json"
  end=$(date +%s.%N)
  python3 - "$work/attend.json" "$(echo "$end - $start" | bc)" "$round" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"round {sys.argv[3]} attend({r['trainer']}) wall_s={float(sys.argv[2]):.1f} "
      f"loop_s={r['seconds']:.1f} val_loss={r['eval']['loss']:.4f}")
EOF
done

#!/usr/bin/env bash
# Training throughput, attend against the PyTorch peer on the same machine in
# the same sitting: the default `reverse` and `mqar` configurations (model and
# batch), 100 optimisation steps each, alternating A B A B ... 3 times.
# Prints one line per run: task, engine, threads, tokens/s.
#
#   scripts/bench-train.sh [python-with-torch]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
cargo build --release -q
for task in reverse mqar; do
  for rep in 1 2 3; do
    for th in 1 2; do
      tps=$(./target/release/attend train --task "$task" --steps 100 --no-eval --json --threads "$th" \
            --out "$(mktemp -d)" | sed 's/.*"tokens_per_sec":\([0-9.]*\).*/\1/')
      echo "$task attend threads=$th tokens/s=$tps"
    done
    for th in 1 2; do
      tps=$("$PY" scripts/torch_peer.py --task "$task" --steps 100 --threads "$th" | sed 's/.*"tokens_per_sec": \([0-9.]*\).*/\1/')
      echo "$task pytorch threads=$th tokens/s=$tps"
    done
  done
done

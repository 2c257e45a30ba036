"""Perplexity of a GGUF file as transformers computes it (it reads and
dequantizes the GGUF weights to f32): windows of 512 tokens scored
independently, as `attend perplexity --ctx 512` does.

    python scripts/transformers_ppl.py FILE.gguf TEXT_FILE
    (needs torch, transformers, gguf, accelerate)
"""
import sys, math, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, text_file = sys.argv[1], sys.argv[2]
d, f = path.rsplit('/', 1)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
model.eval()
ids = tok(open(text_file, encoding='utf-8').read(), add_special_tokens=False)["input_ids"]
nll, n = 0.0, 0
with torch.no_grad():
    for i in range(0, len(ids), 512):
        w = ids[i:i + 512]
        if len(w) < 2: continue
        x = torch.tensor([w])
        logits = model(x).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1)
        nll -= lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum().item()
        n += len(w) - 1
print(f"{f} tokens {len(ids)} predictions {n} perplexity {math.exp(nll / n):.4f}")

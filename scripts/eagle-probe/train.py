#!/usr/bin/env python3
"""An EAGLE feasibility probe, step 2 of 2 (see features.py). EAGLE-style
draft (Li et al. 2024) for SmolLM2: fc([f_t, e(x_{t+1})]) -> one Llama decoder
layer -> f^_{t+1}, trained with smooth-L1 on the next feature plus 0.1 x
cross-entropy over the heads' draft vocabulary (the base's own output rows),
with EAGLE's feature noise. Reports held-out chain acceptance (first / first
two / first three drafted tokens kept, the draft's own features fed back,
exactly, through a tree mask), comparable with `train-draft-heads`' report.

    python train.py FEATURES.pt HEADS.json STEPS"""
import json, math, sys, time, torch, torch.nn as nn, torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
torch.manual_seed(0); torch.set_num_threads(2)
D = torch.load(sys.argv[1], weights_only=False)
cfg = LlamaConfig(**{k: v for k, v in D["config"].items() if k in LlamaConfig().to_dict()})
cfg._attn_implementation = "sdpa"
V = torch.tensor(json.load(open(sys.argv[2]))["vocab"])
lm = D["lm_head"][V]                    # (8192, 576)
emb = D["embed"]
vmap = torch.full((emb.shape[0],), -100, dtype=torch.long); vmap[V] = torch.arange(len(V))
train = [s for s in D["seqs"] if not s["test"]]; test = [s for s in D["seqs"] if s["test"]]
d = cfg.hidden_size

class Draft(nn.Module):
    def __init__(s):
        super().__init__()
        s.fc = nn.Linear(2 * d, d)
        s.layer = LlamaDecoderLayer(cfg, layer_idx=0)
        s.rope = LlamaRotaryEmbedding(cfg)
    def forward(s, f, x, pos, mask=None):
        # f (B, T, d) features, x (B, T) next tokens, pos (B, T) positions
        h = s.fc(torch.cat([f, emb[x]], -1))
        pe = s.rope(h, pos)
        out = s.layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

m = Draft()
def batch(seqs):
    T = max(len(s["tokens"]) for s in seqs) - 1
    B = len(seqs)
    f = torch.zeros(B, T, d); x = torch.zeros(B, T, dtype=torch.long)
    ft = torch.zeros(B, T, d); y = torch.full((B, T), -100, dtype=torch.long); w = torch.zeros(B, T)
    for b, s in enumerate(seqs):
        n = len(s["tokens"]) - 1
        f[b, :n] = s["f"][:n].float(); x[b, :n] = torch.tensor(s["tokens"][1:])
        ft[b, :n - 1] = s["f"][1:n].float()
        yy = vmap[torch.tensor(s["tokens"][2:])]; y[b, :n - 1] = yy
        w[b, :n - 1] = 1.0
    return f, x, ft, y, w

steps = int(sys.argv[3]) if len(sys.argv) > 3 else 600
bs = 8
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1, (i + 1) / 20) * 0.5 * (1 + math.cos(math.pi * i / steps)))
t0 = time.time()
for i in range(steps):
    idx = torch.randint(len(train), (bs,))
    f, x, ft, y, w = batch([train[j] for j in idx])
    f = f + (torch.rand_like(f) - 0.5) * 0.2     # EAGLE's feature noise
    pos = torch.arange(f.shape[1]).expand(f.shape[0], -1)
    fh = m(f, x, pos)
    reg = (F.smooth_l1_loss(fh, ft, reduction="none").mean(-1) * w).sum() / w.sum()
    ce = F.cross_entropy((fh @ lm.T).flatten(0, 1), y.flatten(), ignore_index=-100)
    loss = reg + 0.1 * ce
    opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    if i % 50 == 0 or i == steps - 1:
        print(f"step {i} reg {reg.item():.4f} ce {ce.item():.3f} {time.time()-t0:.0f}s", flush=True)

# held-out chain acceptance over answer positions: drafts 1..3 after the base's token
m.eval(); k = 3; hit = torch.zeros(k); n = 0
with torch.no_grad():
    for s in test:
        toks = torch.tensor(s["tokens"]); T = len(toks) - 1
        f = s["f"][:T].float()[None]; x = toks[1:][None]
        # nodes: level 0 = the true prefix (T), level j = the j-th draft after each t
        feats = [f]; xs = [x]; pos = [torch.arange(T)]
        mask = torch.full((T * k, T * k), float("-inf"))
        for lvl in range(k):
            if lvl == 0:
                fh = m(f, x, pos[0][None])[0]               # f^_{t+1} for every t
            else:
                F_all = torch.cat(feats, 1); X_all = torch.cat(xs, 1); P_all = torch.cat(pos)[None]
                L = F_all.shape[1]
                out = m(F_all, X_all, P_all, mask[:L, :L][None, None])[0]
                fh = out[L - T:]                                  # the newest level's outputs
            xh = V[(fh @ lm.T).argmax(-1)]                  # x^_{t+2+lvl}
            # build the next level's nodes: input (f^, x^) at position t+1+lvl
            if lvl == 0:
                for t in range(T):
                    mask[t, :t + 1] = 0
            base = T * (lvl + 1)
            if lvl + 1 < k:
                for t in range(T):
                    r = base + t
                    mask[r, :t + 1] = 0
                    for j in range(1, lvl + 2):
                        mask[r, T * j + t] = 0
                feats.append(fh[None]); xs.append(xh[None]); pos.append(torch.arange(T) + lvl + 1)
            if lvl == 0:
                ok = torch.ones(T, dtype=torch.bool)   # every chain alive before its first draft
            want = torch.full((T,), -1, dtype=torch.long)
            lim = T - 1 - lvl
            if lim > 0:
                want[:lim] = toks[2 + lvl:2 + lvl + lim]
            ok = ok & (xh == want)
            a = max(s["start"] - 1, 0)
            hit[lvl] += ok[a:lim].sum() if lim > a else 0
            if lvl == 0:
                n += max(lim - a, 0)
print("test chain acceptance 1 / 1-2 / 1-3:", [round(float(h / n) * 100, 1) for h in hit], "mean kept a pass", round(float(hit.sum() / n), 2), f"({n} positions)")

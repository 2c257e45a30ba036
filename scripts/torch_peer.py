#!/usr/bin/env python3
"""PyTorch peer for BENCHMARKS.md: the same models, batches and optimizer as
`attend train --task reverse` and `--task mqar` (defaults), timed the same way
(tokens/s = input tokens per optimisation step, padding included, over the
timed steps).

    python3 scripts/torch_peer.py --task reverse --steps 100 --threads 2
"""
import argparse, math, random, time
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attn(nn.Module):
    def __init__(s, d, h, rope=False, max_len=64):
        super().__init__()
        s.h, s.hd = h, d // h
        s.q_proj, s.k_proj, s.v_proj, s.o_proj = (nn.Linear(d, d) for _ in range(4))
        s.rope = rope
        if rope:
            half = s.hd // 2
            freq = 10000.0 ** (-2 * torch.arange(half) / s.hd)
            ang = torch.arange(max_len)[:, None] * freq[None]
            s.register_buffer("cos", ang.cos()); s.register_buffer("sin", ang.sin())

    def split(s, x):
        b, t, _ = x.shape
        return x.view(b, t, s.h, s.hd).transpose(1, 2)

    def rot(s, x):
        t, half = x.shape[2], s.hd // 2
        c, si = s.cos[:t], s.sin[:t]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * si, x2 * c + x1 * si], -1)

    def forward(s, x, mem=None, causal=False, key_pad=None):
        src = x if mem is None else mem
        q, k, v = s.split(s.q_proj(x)), s.split(s.k_proj(src)), s.split(s.v_proj(src))
        if s.rope:
            q, k = s.rot(q), s.rot(k)
        mask = None
        if key_pad is not None:
            mask = key_pad[:, None, None, :].bool()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        b, h, t, hd = y.shape
        return s.o_proj(y.transpose(1, 2).reshape(b, t, h * hd))


class Block(nn.Module):
    def __init__(s, d, h, f, causal, cross, rope, max_len):
        super().__init__()
        s.causal = causal
        s.ln_1, s.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        s.self_attn = Attn(d, h, rope, max_len)
        s.cross_attn = Attn(d, h) if cross else None
        s.ln_cross = nn.LayerNorm(d) if cross else None
        s.ffn = nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))

    def forward(s, x, mem=None, key_pad=None, mem_pad=None):
        x = x + s.self_attn(s.ln_1(x), causal=s.causal, key_pad=key_pad)
        if s.cross_attn is not None:
            x = x + s.cross_attn(s.ln_cross(x), mem=mem, key_pad=mem_pad)
        return x + s.ffn(s.ln_2(x))


class Model(nn.Module):
    """attend's task presets: pre-LN, learned positions (unit-variance init,
    one table per stack), ReLU FFN, tied embeddings scaled by sqrt(d)."""

    def __init__(s, vocab, d, h, f, n_enc, n_dec, max_len=64):
        super().__init__()
        s.d = d
        s.embed = nn.Embedding(vocab, d)
        nn.init.normal_(s.embed.weight, std=d ** -0.5)
        s.pos_dec = nn.Parameter(torch.randn(max_len, d))
        s.pos_enc = nn.Parameter(torch.randn(max_len, d)) if n_enc else None
        s.encoder = nn.ModuleList(Block(d, h, f, False, False, False, max_len) for _ in range(n_enc))
        s.decoder = nn.ModuleList(Block(d, h, f, True, n_enc > 0, False, max_len) for _ in range(n_dec))
        s.enc_norm = nn.LayerNorm(d) if n_enc else None
        s.dec_norm = nn.LayerNorm(d)

    def emb(s, ids, pos):
        return s.embed(ids) * math.sqrt(s.d) + pos[: ids.shape[1]]

    def forward(s, tgt, src=None, src_pad=None):
        mem = None
        if src is not None:
            mem = s.emb(src, s.pos_enc)
            for b in s.encoder:
                mem = b(mem, key_pad=src_pad)
            mem = s.enc_norm(mem)
        x = s.emb(tgt, s.pos_dec)
        for b in s.decoder:
            x = b(x, mem=mem, mem_pad=src_pad)
        return s.dec_norm(x) @ s.embed.weight.t()


def reverse_batch(b, vocab=32, lo=8, hi=16):
    srcs = [[random.randrange(3, vocab) for _ in range(random.randint(lo, hi))] for _ in range(b)]
    s_len = max(map(len, srcs)); t_len = s_len + 1
    src = torch.zeros(b, s_len, dtype=torch.long); pad = torch.zeros(b, s_len)
    tin = torch.zeros(b, t_len, dtype=torch.long); tout = torch.zeros(b, t_len, dtype=torch.long)
    w = torch.zeros(b, t_len)
    for i, x in enumerate(srcs):
        y = x[::-1]
        src[i, : len(x)] = torch.tensor(x); pad[i, : len(x)] = 1
        tin[i, 0] = 1; tin[i, 1 : len(y) + 1] = torch.tensor(y)
        tout[i, : len(y)] = torch.tensor(y); tout[i, len(y)] = 2; w[i, : len(y) + 1] = 1
    return src, pad, tin, tout, w


def mqar_batch(b, vocab=64, t=64):
    x = torch.randint(0, vocab, (b, t)); y = torch.randint(0, vocab, (b, t))
    w = torch.zeros(b, t); w[:, 16::2] = 1; w[:, 32:] = 0  # 8 scored positions
    return x, y, w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["reverse", "mqar"], required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0); random.seed(0)
    if a.task == "reverse":
        model = Model(32, 128, 4, 512, 2, 2)
        lr = 1e-3
    else:
        model = Model(64, 64, 2, 256, 0, 2)
        lr = 3e-3
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
    tokens, t0 = 0, None
    for step in range(a.warmup_steps + a.steps):
        if step == a.warmup_steps:
            t0, tokens = time.perf_counter(), 0
        if a.task == "reverse":
            src, pad, tin, tout, w = reverse_batch(64)
            logits = model(tin, src, pad)
            tokens += src.numel() + tin.numel()
        else:
            tin, tout, w = mqar_batch(64)
            logits = model(tin)
            tokens += tin.numel()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tout.reshape(-1), reduction="none")
        loss = (nll * w.reshape(-1)).sum() / w.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    dt = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(f'{{"task": "{a.task}", "framework": "pytorch {torch.__version__}", "threads": {a.threads}, '
          f'"params": {n}, "steps": {a.steps}, "seconds": {dt:.3f}, "tokens_per_sec": {tokens / dt:.1f}}}')


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A load generator for OpenAI-compatible servers (attend serve, llama-server):
N concurrent streams, each sending streamed /v1/completions requests back to
back (a closed loop), prompts of mixed length cut from a corpus, a fixed
number of output tokens each (`ignore_eos`, which both servers take).
Reports aggregate output tokens/s and time to first token (p50/p99).

    scripts/loadgen.py URL --streams 16 [--requests 32] [--max-tokens 128]
        [--corpus ../shared/data/tinyshakespeare.txt] [--json]

    scripts/loadgen.py URL --prefix-test [--system-tokens 1000]
        time to first token of chat requests that share a long system prompt

Standard library only (http.client + threads), so the same client measures
every server. Tokens are counted from the stream's chunks, checked against
the final usage where the server reports it.
"""

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse


def post_stream(url, path, body, timeout=600):
    """POST a streamed request: yields (time, parsed JSON) for each SSE frame."""
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError("HTTP %d: %s" % (r.status, r.read()[:300]))
    buf = b""
    while True:
        chunk = r.read1(65536) if hasattr(r, "read1") else r.read(1024)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            frame, buf = buf.split(b"\n\n", 1)
            for line in frame.split(b"\n"):
                if line.startswith(b"data:"):
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        c.close()
                        return
                    yield time.perf_counter(), json.loads(data)
    c.close()


def prompts(corpus, n, seed, lengths):
    """n prompts of mixed length: slices of the corpus of `lengths`
    characters (about 4 a token), picked at random."""
    text = open(corpus, encoding="utf-8").read()
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = rng.choice(lengths)
        at = rng.randrange(0, len(text) - chars)
        out.append(text[at : at + chars])
    return out


def one(url, model, prompt, max_tokens):
    """(ttft seconds, output tokens, total seconds) of one streamed completion."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    t0 = time.perf_counter()
    first, n, usage = None, 0, None
    for t, j in post_stream(url, "/v1/completions", body):
        if j.get("usage"):
            usage = j["usage"]
        for ch in j.get("choices") or []:
            if ch.get("text"):
                if first is None:
                    first = t
                n += 1
    end = time.perf_counter()
    if usage and usage.get("completion_tokens"):
        n = usage["completion_tokens"]
    return (first or end) - t0, n, end - t0


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def load(a):
    ps = prompts(a.corpus, a.requests, a.seed, a.prompt_chars)
    results, errors = [], []
    lock = threading.Lock()
    nxt = [0]

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(ps):
                return
            try:
                r = one(a.url, a.model, ps[i], a.max_tokens)
                with lock:
                    results.append(r)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=worker) for _ in range(a.streams)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        sys.exit("errors: %d, first: %s" % (len(errors), errors[0]))
    ttft = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    rep = {
        "streams": a.streams,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 2),
        "output_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(pct(ttft, 50), 3),
        "ttft_p99_s": round(pct(ttft, 99), 3),
    }
    short = [r for r in results if r[1] != a.max_tokens]
    if short:
        sys.exit("%d requests returned %s tokens, not %d" % (len(short), short[0][1], a.max_tokens))
    print(json.dumps(rep) if a.json else "  ".join("%s %s" % kv for kv in rep.items()))


def prefix(a):
    """TTFT of chat requests sharing a ~system_tokens-token system prompt:
    the first (cold) and the median of the rest (warm)."""
    text = open(a.corpus, encoding="utf-8").read()
    system = text[: a.system_tokens * 4]  # ~4 characters a token
    qs = ["Who speaks first?", "Name a king.", "Summarise the scene.", "Is it a comedy?", "Who is angry?", "What city is it?"]
    times = []
    for q in qs:
        body = {
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if a.completions:
            # (a model without a chat template: the same text as a prompt)
            path = "/v1/completions"
            body["prompt"] = system + "\n\nQuestion: " + q + "\nAnswer:"
        else:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        if a.model:
            body["model"] = a.model
        t0 = time.perf_counter()
        first, usage = None, None
        for t, j in post_stream(a.url, path, body):
            if j.get("usage"):
                usage = j["usage"]
            for ch in j.get("choices") or []:
                piece = ch.get("text") or (ch.get("delta") or {}).get("content")
                if piece and first is None:
                    first = t
        times.append(((first or time.perf_counter()) - t0, usage))
    cold = times[0][0]
    warm = statistics.median(t for t, _ in times[1:])
    u = times[-1][1] or {}
    rep = {
        "prompt_tokens": u.get("prompt_tokens"),
        "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens"),
        "ttft_cold_s": round(cold, 3),
        "ttft_warm_s": round(warm, 3),
        "speedup": round(cold / warm, 1),
    }
    print(json.dumps(rep) if a.json else "  ".join("%s %s" % kv for kv in rep.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("url")
    p.add_argument("--model", default=None)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--requests", type=int, default=None, help="default: max(2 × streams, 8)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--corpus", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--prompt-chars",
        type=int,
        nargs="+",
        default=[128, 256, 512, 1024, 2048],
        help="prompt lengths in characters, picked at random (about 4 a token)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--prefix-test", action="store_true")
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument(
        "--completions",
        action="store_true",
        help="prefix test over /v1/completions (models without a chat template)",
    )
    a = p.parse_args()
    if a.requests is None:
        a.requests = max(2 * a.streams, 8)
    if a.prefix_test:
        prefix(a)
    else:
        load(a)


if __name__ == "__main__":
    main()

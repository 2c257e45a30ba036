"""`attend serve` from the outside, with the official `openai` package and
raw HTTP: run by tests/serve.rs (which starts the server and passes what
`attend generate` printed for the same prompt).

    python serve_client.py BASE_URL API_KEY DECODER ENCODER MINILM_FIXTURE EXPECTED_JSON

Each check prints `ok: <name>`; the first failure raises (non-zero exit).
"""

import concurrent.futures as cf
import http.client
import json
import math
import re
import socket
import sys
import threading
import time
import urllib.parse

import openai

base, key, decoder, encoder, fixture_path, expected_path = sys.argv[1:7]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=300)
expected = json.load(open(expected_path))
url = urllib.parse.urlparse(base)


def ok(name):
    print("ok:", name, flush=True)


def raw(method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    c = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    h = {"Authorization": "Bearer " + key, "Content-Type": "application/json"}
    h.update(headers or {})
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read().decode()
    c.close()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data


def metrics():
    """{name: value} of the decoder's gauges and counters."""
    status, text = raw("GET", "/metrics")
    assert status == 200, status
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(attend_\w+)(\{model="([^"]*)"\})? (\S+)$', line)
        if m and (m.group(3) in (None, decoder)):
            out[m.group(1)] = float(m.group(4))
    return out


# --- models ---
ids = [m.id for m in client.models.list().data]
assert decoder in ids and encoder in ids, ids
ok("models lists both")

# --- a streamed chat completion ---
stream = client.chat.completions.create(
    model=decoder,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24,
    stream=True,
    stream_options={"include_usage": True},
)
text, finish, usage = "", None, None
for chunk in stream:
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        text += c.delta.content or ""
        finish = c.finish_reason or finish
assert text.strip(), "empty chat reply"
assert finish in ("stop", "length"), finish
assert usage and usage.completion_tokens >= 1 and usage.prompt_tokens > 10, usage
ok("chat streams: %r" % text[:60])

# --- completions: temperature 0 equals `attend generate` ---
prompt, want = expected["prompt"], expected["text"]
n = expected["max_tokens"]
got = client.completions.create(model=decoder, prompt=prompt, max_tokens=n, temperature=0)
assert got.choices[0].text == want, (got.choices[0].text, want)
assert got.usage.completion_tokens == len(expected["ids"]), got.usage
parts = []
for chunk in client.completions.create(
    model=decoder, prompt=prompt, max_tokens=n, temperature=0, stream=True
):
    parts.append(chunk.choices[0].text if chunk.choices else "")
assert "".join(parts) == want, ("".join(parts), want)
assert len([p for p in parts if p]) >= 2, "streamed in pieces"
ok("completion (streamed and not) == attend generate: %r" % want)

# --- embeddings against the sentence-transformers fixture ---
fx = json.load(open(fixture_path))
texts = [it["text"] for it in fx["items"]]
for fmt in (None, "float"):
    kw = {} if fmt is None else {"encoding_format": fmt}
    r = client.embeddings.create(model=encoder, input=texts, **kw)
    assert len(r.data) == len(texts)
    for it, d in zip(fx["items"], r.data):
        a, b = d.embedding, it["embedding"]
        cos = sum(x * y for x, y in zip(a, b)) / math.sqrt(
            sum(x * x for x in a) * sum(y * y for y in b)
        )
        assert cos >= 0.9999, (it["text"], cos)
ok("embeddings (base64 and float) match the fixture, cosine >= 0.9999")

# --- logprobs ---
r = client.chat.completions.create(
    model=decoder,
    messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=6,
    temperature=0,
    logprobs=True,
    top_logprobs=3,
)
content = r.choices[0].logprobs.content
assert len(content) == r.usage.completion_tokens, (len(content), r.usage)
for e in content:
    tops = e.top_logprobs
    assert len(tops) == 3 and tops[0].logprob >= tops[1].logprob >= tops[2].logprob
    assert e.logprob <= 0 and abs(e.logprob - tops[0].logprob) < 1e-5  # greedy picks the top
    assert abs(sum(math.exp(t.logprob) for t in tops)) <= 1.0 + 1e-4
ok("logprobs: chosen = top-1 under greedy, 3 alternatives each")

# --- 32 concurrent streams = each alone ---
questions = [
    "Tell me about %s." % w
    for w in (
        "rivers mountains oceans deserts forests cities bridges trains "
        "music painting poetry chess football tennis bread cheese apples "
        "coffee tea rain snow wind stars planets moons clocks books ships "
        "birds horses lamps gardens bees"
    ).split()
]
assert len(questions) >= 32
questions = questions[:32]


def ask(q, stream):
    kw = dict(
        model=decoder,
        messages=[{"role": "user", "content": q}],
        max_tokens=24,
        temperature=0,
    )
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content
    out = ""
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            out += c.delta.content or ""
    return out


alone = [ask(q, False) for q in questions]
seen = {"batch": 0, "over": None}
done = threading.Event()


def watch():
    while not done.is_set():
        m = metrics()
        seen["batch"] = max(seen["batch"], m.get("attend_batch_size", 0))
        if m["attend_kv_bytes_used"] > m["attend_kv_bytes_limit"]:
            seen["over"] = m
        time.sleep(0.02)


w = threading.Thread(target=watch)
w.start()
with cf.ThreadPoolExecutor(32) as ex:
    together = list(ex.map(lambda q: ask(q, True), questions))
done.set()
w.join()
for q, a, b in zip(questions, alone, together):
    assert a == b, (q, a, b)
assert seen["batch"] > 1, "the requests were batched: %s" % seen
assert seen["over"] is None, seen["over"]
ok("32 concurrent streams == alone (largest batch %d); KV bytes within --kv-memory" % seen["batch"])

# --- prefix caching ---
system = " ".join(
    "Rule %d: answer briefly, in plain words, and stay on the subject asked about." % i
    for i in range(20)
)


def with_system(q):
    r = client.chat.completions.create(
        model=decoder,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": q}],
        max_tokens=16,
        temperature=0,
    )
    return r.choices[0].message.content, r.usage


first, u1 = with_system("What is rain?")
second, u2 = with_system("What is snow?")
again, u3 = with_system("What is rain?")
cached = u2.prompt_tokens_details.cached_tokens
assert u1.prompt_tokens > 300, u1
assert cached >= u1.prompt_tokens - 64, (u1, u2)  # all but the question's blocks
assert again == first, (again, first)
assert u3.prompt_tokens_details.cached_tokens >= cached
ok("prefix caching: %d of %d prompt tokens cached, same reply" % (cached, u2.prompt_tokens))

# --- a client that goes away frees its blocks ---
before = metrics()
s = client.chat.completions.create(
    model=decoder,
    messages=[{"role": "user", "content": "Write a long story about a dragon."}],
    max_tokens=800,
    temperature=0,
    stream=True,
)
for i, _ in enumerate(s):
    if i == 3:
        break
s.close()
for _ in range(200):
    m = metrics()
    if m["attend_running_sequences"] == 0:
        break
    time.sleep(0.05)
assert m["attend_running_sequences"] == 0, m
assert m["attend_kv_blocks_used"] == m["attend_prefix_cache_blocks"], m
assert m["attend_requests_cancelled_total"] == before["attend_requests_cancelled_total"] + 1, m
assert m["attend_generation_tokens_total"] < before["attend_generation_tokens_total"] + 200, m
ok("a disconnect mid-stream frees its KV blocks (blocks used = prefix cache's)")

# --- errors, in OpenAI's shape ---
def error(status, body, want, **kw):
    st, b = raw("POST", kw.get("path", "/v1/chat/completions"), body, kw.get("headers"))
    assert st == want, (st, b, want)
    assert isinstance(b, dict) and isinstance(b["error"]["message"], str), b
    return b["error"]


msg = json.dumps({"model": decoder, "messages": [{"role": "user", "content": "hi"}]})
e = error(400, "{not json", 400)
e = error(400, json.dumps({"model": decoder, "messages": "hi"}), 400)
assert e["param"] == "messages", e
e = error(400, json.dumps({"model": decoder, "messages": [{"role": "user", "content": "hi"}], "temperature": 5}), 400)
assert e["param"] == "temperature", e
e = error(400, json.dumps({"model": decoder, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}), 400)
assert e["code"] == "context_length_exceeded", e
e = error(404, json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), 404)
assert e["code"] == "model_not_found", e
e = error(401, msg, 401, headers={"Authorization": "Bearer wrong"})
e = error(401, msg, 401, headers={"Authorization": ""})
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
e = error(400, json.dumps({"model": decoder, "input": "x"}), 400, path="/v1/embeddings")
assert "encoder" in e["message"], e
ok("errors: 400 bad JSON / field / context, 404 unknown model, 401 bad key")

# --- a 100 MB body is refused without reading it ---
sock = socket.create_connection((url.hostname, url.port), timeout=30)
head = (
    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
    "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (key, 100 << 20)
)
sock.sendall(head.encode() + b"{" + b" " * (64 << 10))
t0 = time.time()
resp = b""
while b"\r\n\r\n" not in resp:
    chunk = sock.recv(65536)
    if not chunk:
        break
    resp += chunk
sock.close()
assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
assert time.time() - t0 < 5
ok("a 100 MB body: 413 after 64 KiB sent")

# --- tokenize / detokenize ---
st, r = raw("POST", "/tokenize", json.dumps({"model": decoder, "content": prompt}))
assert st == 200 and r["tokens"] == expected["prompt_ids"], (st, r)
st, r = raw("POST", "/detokenize", json.dumps({"model": decoder, "tokens": expected["ids"]}))
assert st == 200 and r["content"] == want, (st, r)
ok("tokenize / detokenize agree with attend generate")

# --- health and metrics ---
st, r = raw("GET", "/health")
assert st == 200 and r["status"] == "ok", (st, r)
m = metrics()
for k in (
    "attend_requests_total",
    "attend_generation_tokens_total",
    "attend_queue_length",
    "attend_batch_size",
    "attend_kv_blocks_used",
    "attend_prefix_cache_hit_tokens_total",
    "attend_time_to_first_token_seconds_count",
):
    assert k in m, (k, sorted(m))
assert m["attend_prefix_cache_hit_tokens_total"] >= cached
ok("health, metrics")
print("all ok")

"""Drive `attend serve`'s chat page in a headless Chromium, as a user would.

Usage: browser_drive.py DEVTOOLS_PORT PAGE_URL SCREENSHOT.png

Speaks Chromium's DevTools protocol over a WebSocket (a minimal client on
the standard library: text frames, masked as a client must). It types a
question into the page, clicks Send, watches the reply stream in, asks a
follow-up with Enter, and saves a screenshot. Exits non-zero, saying why,
when the page misbehaves.
"""

import base64, json, os, re, socket, struct, sys, time, urllib.request

devtools_port, page_url, shot = int(sys.argv[1]), sys.argv[2], sys.argv[3]


def fail(why):
    sys.exit(f"browser_drive: {why}")


class WebSocket:
    def __init__(self, url):
        host, _, path = url.removeprefix("ws://").partition("/")
        name, port = host.split(":")
        self.s = socket.create_connection((name, int(port)), timeout=30)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            f"GET /{path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.s.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            fail(f"no WebSocket upgrade: {head!r}")

    def exact(self, n):
        b = b""
        while len(b) < n:
            got = self.s.recv(n - len(b))
            if not got:
                fail("DevTools closed the connection")
            b += got
        return b

    def send(self, text):
        data, mask = text.encode(), os.urandom(4)
        n = len(data)
        head = struct.pack("!B", 0x81)  # FIN, text
        if n < 126:
            head += struct.pack("!B", 0x80 | n)
        elif n < 1 << 16:
            head += struct.pack("!BH", 0x80 | 126, n)
        else:
            head += struct.pack("!BQ", 0x80 | 127, n)
        masked = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
        self.s.sendall(head + mask + masked)

    def recv(self):
        message = b""
        while True:
            b0, b1 = self.exact(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self.exact(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self.exact(8))
            mask = self.exact(4) if b1 & 0x80 else None
            data = self.exact(n)
            if mask:
                data = bytes(c ^ mask[i % 4] for i, c in enumerate(data))
            if b0 & 0x0F == 0x8:
                fail("DevTools sent close")
            if b0 & 0x0F in (0x9, 0xA):  # ping/pong: no payload we need
                continue
            message += data
            if b0 & 0x80:
                return json.loads(message)


targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list"))
page = next((t for t in targets if t["type"] == "page"), None) or fail(f"no page target: {targets}")
ws, next_id, events = WebSocket(page["webSocketDebuggerUrl"]), 0, []


def call(method, **params):
    global next_id
    next_id += 1
    ws.send(json.dumps({"id": next_id, "method": method, "params": params}))
    while True:
        m = ws.recv()
        if m.get("id") == next_id:
            if "error" in m:
                fail(f"{method}: {m['error']}")
            return m["result"]
        events.append(m)


def js(expr):
    r = call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in r:
        fail(f"{expr}: {r['exceptionDetails']}")
    return r["result"].get("value")


def wait_for(what, expr, timeout=30):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = js(expr)
        if v:
            return v
        time.sleep(0.05)
    fail(f"timed out after {timeout} s waiting for {what}")


call("Page.enable")
call("Page.navigate", url=page_url)
t0 = time.time()
while not any(e.get("method") == "Page.loadEventFired" for e in events):
    if time.time() - t0 > 30:
        fail("the page did not load")
    events.append(ws.recv())
# the model list comes from /v1/models after load
model = wait_for("the model list", "document.querySelector('#model').value")
print("model:", model)
# record what the page sends (to check the follow-up carries the history),
# and the reply's length each time the DOM changes (one callback per task)
js("""(() => {
  window.sent = [];
  const f = window.fetch;
  window.fetch = (u, o) => { if (o && o.body) sent.push(JSON.parse(o.body)); return f(u, o); };
  window.lens = [];
  new MutationObserver(() => {
    const a = [...document.querySelectorAll('#log .assistant')].pop();
    if (!a || a.querySelector('.stats')) return;
    lens.push(a.textContent.length);
  }).observe(document.querySelector('#log'), {childList: true, subtree: true, characterData: true});
})()""")


def click(selector):
    box = js(f"(() => {{ const r = document.querySelector('{selector}').getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()")
    for kind in ("mousePressed", "mouseReleased"):
        call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


def type_into(selector, text):
    click(selector)
    call("Input.insertText", text=text)


def turn(n, question, submit):
    """Ask a question; wait for the n-th reply to finish; return its text and stats."""
    js("window.lens.length = 0")
    type_into("#input", question)
    submit()
    polled = []
    t0 = time.time()
    while True:
        s = js(f"""(() => {{
          const a = document.querySelectorAll('#log .assistant');
          const e = document.querySelector('#log .error');
          if (e) return {{error: e.textContent}};
          if (a.length < {n}) return {{len: 0}};
          const st = a[{n - 1}].querySelector('.stats');
          return {{len: a[{n - 1}].textContent.length - (st ? st.textContent.length : 0),
                   text: a[{n - 1}].firstChild && a[{n - 1}].firstChild.nodeType === 3 ? a[{n - 1}].firstChild.data : '',
                   stats: st && st.textContent}};
        }})()""")
        if "error" in s:
            fail(f"the page shows an error: {s['error']}")
        if s.get("stats"):
            break
        polled.append(s["len"])
        if time.time() - t0 > 60:
            fail(f"reply {n} did not finish in 60 s (lengths polled: {polled})")
        time.sleep(0.01)
    observed = [l for l in js("window.lens") if l > 0]
    print(f"reply {n}: {s['text']!r}\n  stats: {s['stats']}\n  lengths seen while streaming: "
          f"{len(set(observed))} distinct by the page's DOM observer, {len(set(polled) - {0})} by polling")
    if not s["text"].strip():
        fail(f"reply {n} is empty")
    # polls are separate moments (a reply sent whole can still reach the
    # page in a few reads, which the observer alone would count)
    if len(set(polled) - {0}) < 2 or len(set(observed)) < 2:
        fail(f"reply {n} did not stream: polling saw the text at lengths {sorted(set(polled))} only")
    if not re.fullmatch(r"(\d+) tokens · first token \d+\.\d\d s · (\d+\.\d|-) tokens/s", s["stats"]):
        fail(f"stats line {s['stats']!r} is not 'N tokens · first token T s · R tokens/s'")
    if int(s["stats"].split()[0]) < 1:
        fail(f"stats count no tokens: {s['stats']!r}")
    return s["text"]


# temperature 0, so the conversation is the same each run (and questions
# whose greedy replies end: "What is the capital of France?" sends this
# model into a loop that fills the whole 1024-token context)
type_into("#temp", "0")
q1, q2 = "Which planet is the largest?", "And the smallest?"
a1 = turn(1, q1, lambda: click("#send"))
if js("document.querySelector('#input').value") != "":
    fail("the input box was not cleared after sending")


def enter():
    for kind in ("keyDown", "keyUp"):
        call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)


a2 = turn(2, q2, enter)
users = js("[...document.querySelectorAll('#log .msg.user')].map(d => d.textContent)")
if users != [q1, q2]:
    fail(f"the user messages shown are {users}, not {[q1, q2]}")
if js("document.querySelectorAll('#log .msg.assistant').length") != 2:
    fail("there are not two assistant messages after two turns")
sent = js("window.sent")
want = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
if len(sent) != 2 or sent[1]["messages"] != want:
    fail(f"the follow-up did not carry the conversation: sent {sent}")
if any(b.get("temperature") != 0 or b.get("stream") is not True for b in sent):
    fail(f"the page did not send stream=true at the temperature set: {sent}")
png = base64.b64decode(call("Page.captureScreenshot", format="png")["data"])
with open(shot, "wb") as f:
    f.write(png)
print(f"screenshot: {shot} ({len(png)} bytes)")
print("all ok")

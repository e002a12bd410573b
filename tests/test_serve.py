"""`vlmkit serve` end to end: the real server (uvicorn, started in this process on a free loopback port so the
tests can look inside it) and the real `openai` client, on a tiny random VLM whose greedy replies differ from
prompt to prompt. Replies are compared with `Engine.generate` (batch size 1, what `vlmkit generate` runs),
token for token through the text; every refusal is checked for its status and message; URL and path
attacks are checked to open no connection and read no file."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import base64
import builtins
import http.server
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from tiny import make_varied_vlm

from vlmkit.serve.api import Settings, create_app

MAX = 8  # completion tokens in most tests: enough to tell replies apart, cheap on 2 cores
ROOT = Path(__file__).resolve().parent.parent


# -- the model and the servers -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A composed tiny VLM (CLIP tower, Llama LM, 4 image tokens) with weights drawn wide enough that its
    greedy replies depend on the prompt and the image (at the default init every reply is the same)."""
    return make_varied_vlm(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def vlm(model_dir):
    from vlmkit.infer.load import load

    # fp32 decoding: the tests compare batched replies with serial ones token for token, which holds in
    # fp32; in int8/bf16 a batch's rounding can flip a near tie (docs/decode.md)
    return load(str(model_dir), device="cpu", decode="fp32")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    """The app on uvicorn in a thread, on a free loopback port; `close` stops it and its batcher."""

    def __init__(self, vlm, **settings):
        import uvicorn

        self.app = create_app(vlm, Settings(model_id="tiny", **settings))
        self.batcher = self.app.state.batcher
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    """A media root with an image, a sub-folder, a link inside it and a link out of it; a secret beside it."""
    base = tmp_path_factory.mktemp("media")
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "good.png").write_bytes(png(3))
    (base / "secret.png").write_bytes(png(4))
    (root / "inner.png").symlink_to(root / "good.png")
    (root / "out.png").symlink_to(base / "secret.png")
    (root / "subout").symlink_to(base)
    return root


@pytest.fixture(scope="module")
def server(vlm, media_root):
    s = Server(vlm, allow_media_url=True, media_root=str(media_root), max_body_mb=1.0, media_timeout_s=1.0)
    yield s
    s.close()


@pytest.fixture(scope="module")
def plain(vlm):
    """The defaults: no image URLs, no local paths; an API key."""
    s = Server(vlm, api_key="sekrit-key")
    yield s
    s.close()


# -- conversations, written once and rendered both for the API and for the engine --------------------
def png(seed: int, size=(40, 30)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def bomb() -> bytes:
    """A tiny PNG that claims to be 100000 x 100000 pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def api_messages(turns) -> list[dict]:
    """turns: [(role, [str | bytes, ...])] -> OpenAI messages (bytes are PNG images, sent as data: URLs)."""
    out = []
    for role, parts in turns:
        if role != "user" and all(isinstance(p, str) for p in parts):
            out.append({"role": role, "content": " ".join(parts)})
            continue
        out.append({"role": role, "content": [
            {"type": "text", "text": p} if isinstance(p, str) else {"type": "image_url", "image_url": {"url": data_url(p)}}
            for p in parts
        ]})
    return out


def engine_messages(turns) -> tuple[list[dict], list[bytes]]:
    """The same turns as vlmkit messages and their images, as `vlmkit generate --messages` passes them."""
    messages, images = [], []
    for role, parts in turns:
        content = []
        for p in parts:
            if isinstance(p, str):
                content.append({"type": "text", "text": p})
            else:
                content.append({"type": "image"})
                images.append(p)
        if role != "user":
            content = [{"type": "text", "text": " ".join(parts)}]
        messages.append({"role": role, "content": content})
    return messages, images


def reference(vlm, turns, max_tokens: int = MAX) -> str:
    messages, images = engine_messages(turns)
    return vlm.engine.generate([messages], [images], max_new_tokens=max_tokens, batch_size=1)[0]


WORDS = "a red circle on the left and a blue square on the right what colour shape how many is there yes no".split()


def conversation(i: int):
    """The i-th of a varied set: 0 to 2 images, sometimes a system turn, sometimes a second turn."""
    rng = np.random.default_rng(100 + i)
    text = " ".join(rng.choice(WORDS, int(rng.integers(2, 20))))
    images = [png(1000 + 10 * i + k, (int(rng.integers(16, 64)), int(rng.integers(16, 64)))) for k in range(i % 3)]
    turns = []
    if i % 4 == 1:
        turns.append(("system", ["You answer in one word."]))
    if i % 5 == 2:
        turns += [("user", [png(7), "Describe the image."]), ("assistant", ["a red circle"])]
    turns.append(("user", [*images, text]))
    return turns


TURNS = {
    "text": [("user", ["What colour is the circle?"])],
    "image": [("user", [png(1), "What colour is the circle?"])],
    "three images over turns": [
        ("system", ["You are terse."]),
        ("user", [png(1), "What shape is on the left?"]),
        ("assistant", ["a circle"]),
        ("user", ["And these two?", png(2, (24, 36)), png(5, (50, 20))]),
    ],
}


def ask(client, turns, **kw):
    return client.chat.completions.create(model="tiny", messages=api_messages(turns), max_tokens=kw.pop("max_tokens", MAX), **kw)


def streamed(client, turns, **kw) -> tuple[str, list[str | None], object, list]:
    """(text, finish reasons, usage, chunks) of a streamed reply."""
    chunks = list(client.chat.completions.create(
        model="tiny", messages=api_messages(turns), max_tokens=kw.pop("max_tokens", MAX), stream=True,
        stream_options={"include_usage": True}, **kw,
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finishes, chunks[-1].usage, chunks


# -- replies -----------------------------------------------------------------------------------------
def test_replies_equal_vlmkit_generate_and_usage_counts_image_tokens(server, vlm):
    client = server.client()
    replies = {}
    for name, turns in TURNS.items():
        reply = ask(client, turns)
        want = reference(vlm, turns)
        assert reply.choices[0].message.content == want, name
        assert reply.choices[0].message.role == "assistant"
        replies[name] = want
        messages, images = engine_messages(turns)
        ids = vlm.engine.inputs([messages], [images])["input_ids"][0]
        n_images = sum(1 for _, parts in turns for p in parts if isinstance(p, bytes))
        usage = reply.usage
        assert usage.prompt_tokens == ids.numel(), name
        assert usage.prompt_tokens_details.image_tokens == 4 * n_images, name
        finish = "length" if usage.completion_tokens == MAX else "stop"  # "stop": the model's EOS came first
        assert 0 < usage.completion_tokens <= MAX and reply.choices[0].finish_reason == finish, name
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert len(set(replies.values())) == len(replies), f"the tiny model gives the same reply to different prompts: {replies}"


def test_streaming_equals_non_streaming(server, vlm):
    client = server.client()
    pieces = []
    for name, turns in TURNS.items():
        whole = ask(client, turns)
        text, finishes, usage, chunks = streamed(client, turns)
        assert text == whole.choices[0].message.content == reference(vlm, turns), name
        assert finishes == [whole.choices[0].finish_reason]
        assert usage.model_dump() == whole.usage.model_dump()
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
        pieces.append(sum(1 for c in chunks if c.choices and c.choices[0].delta.content))
    assert max(pieces) > 2, f"no reply came in pieces: {pieces}"
    # on the wire: OpenAI's event stream, ending with [DONE]
    body = {"model": "tiny", "messages": api_messages(TURNS["image"]), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_sampling_settings_per_request(server, vlm):
    client = server.client()
    turns = TURNS["image"]
    greedy = reference(vlm, turns, 16)
    # seeded sampling repeats itself, and differs from greedy and from another seed
    a = ask(client, turns, temperature=1.5, seed=7, max_tokens=16).choices[0].message.content
    b = ask(client, turns, temperature=1.5, seed=7, max_tokens=16).choices[0].message.content
    c = ask(client, turns, temperature=1.5, seed=8, max_tokens=16).choices[0].message.content
    assert a == b and len({a, c, greedy}) == 3
    # top_p small enough keeps only the most likely token: greedy again
    assert ask(client, turns, temperature=1.0, top_p=1e-6, seed=1, max_tokens=16).choices[0].message.content == greedy
    # n choices, each with its index; greedy ones are all the greedy reply
    reply = ask(client, turns, n=3, max_tokens=16)
    assert [ch.index for ch in reply.choices] == [0, 1, 2] and {ch.message.content for ch in reply.choices} == {greedy}
    assert reply.usage.completion_tokens == 3 * 16
    # streamed choices carry their index; each equals its non-streamed twin (same seed)
    kw = dict(temperature=1.5, seed=3, n=2, max_tokens=12)
    whole = [ch.message.content for ch in ask(client, turns, **kw).choices]
    chunks = streamed(client, turns, **kw)[3]
    parts = ["", ""]
    for chunk in chunks:
        for ch in chunk.choices:
            parts[ch.index] += ch.delta.content or ""
    assert parts == whole and whole[0] != whole[1]
    # max_completion_tokens, the newer name, and max_tokens cap the reply
    short = client.chat.completions.create(model="tiny", messages=api_messages(turns), max_completion_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert short.choices[0].message.content == reference(vlm, turns, 3)
    # a stop string ends the reply before it, streamed or not
    stop = next(greedy[i : i + 2] for i in range(3, len(greedy) - 2) if greedy[i : i + 2].isprintable() and greedy[i : i + 2].strip() == greedy[i : i + 2])
    cut = greedy[: greedy.index(stop)].strip()
    stopped = ask(client, turns, stop=[stop, "never seen"], max_tokens=16)
    assert stopped.choices[0].message.content == cut and stopped.choices[0].finish_reason == "stop"
    assert streamed(client, turns, stop=stop, max_tokens=16)[:2] == (cut, ["stop"])


def test_one_log_line_per_request_and_content_only_when_asked(vlm, caplog):
    for log_requests in (False, True):
        s = Server(vlm, log_requests=log_requests)
        try:
            caplog.clear()
            with caplog.at_level("INFO", logger="vlmkit.serve"):
                reply = ask(s.client(), TURNS["text"], max_tokens=3)
                refused(post(s, chat_body("hi", temperature=9)), 400)
        finally:
            s.close()
        lines = [r.getMessage() for r in caplog.records if r.name == "vlmkit.serve"]
        assert len(lines) == 2, lines
        assert lines[0].startswith(reply.id) and "status=200" in lines[0] and "completion_tokens=3" in lines[0]
        assert "status=400" in lines[1] and "temperature" in lines[1]
        assert ("What colour is the circle?" in lines[0]) == log_requests
        assert (json.dumps(reply.choices[0].message.content) in lines[0]) == log_requests


def test_models_and_health(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["input_modalities"] == ["text", "image"]
    assert models[0].model_extra["max_model_len"] == 512
    health = server.health()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["active"] == 0


# -- refusals ----------------------------------------------------------------------------------------
def post(server, body, raw: bytes | None = None, headers=None) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **(headers or {})})


def chat_body(*parts, role="user", **kw) -> dict:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"model": "tiny", "messages": [{"role": role, "content": content}], "max_tokens": 4, **kw}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def refused(response: httpx.Response, status: int, *words: str) -> dict:
    """An error in OpenAI's shape with `status`, its message naming each of `words`."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


LONG = " ".join(["circle"] * 600)
BAD = [
    ("not json", None, b'{"messages": [', ("not valid JSON",)),
    ("not an object", None, b"[1, 2]", ("JSON object",)),
    ("no messages", {"model": "tiny"}, None, ("messages", "Field required")),
    ("empty messages", {"model": "tiny", "messages": []}, None, ("messages",)),
    ("temperature", chat_body("hi", temperature=3), None, ("temperature", "less than or equal to 2")),
    ("max_tokens 0", chat_body("hi", max_tokens=0), None, ("max_tokens",)),
    ("role", {"messages": [{"role": "tool", "content": "x"}]}, None, ("messages[0].role", "'tool'")),
    ("part", chat_body({"type": "audio"}), None, ("messages[0].content[0]",)),
    ("no url", chat_body({"type": "image_url", "image_url": {}}), None, ("messages[0].content[0].image_url.url",)),
    ("image from assistant", chat_body(image_part(data_url(png(1))), role="assistant"), None, ("user messages only",)),
    ("tools", chat_body("hi", tools=[{"type": "function", "function": {"name": "f"}}]), None, ("tool calling",)),
    ("n", chat_body("hi", n=99), None, ("n: at most 16",)),
    ("stops", chat_body("hi", stop=["a", "b", "c", "d", "e"]), None, ("stop",)),
    ("base64", chat_body(image_part("data:image/png;base64,%%%"), "hi"), None, ("messages[0].content[0]", "base64")),
    ("corrupt", chat_body(image_part(data_url(png(1)[:60])), "hi"), None, ("messages[0].content[0]", "corrupt or truncated")),
    ("not an image", chat_body("hi", image_part(data_url(b"hello, world"))), None, ("messages[0].content[1]", "not an image")),
    ("bomb", chat_body(image_part(data_url(bomb())), "hi"), None, ("decompression bomb", "100000x100000")),
    ("too many images", chat_body(*[image_part(data_url(png(1)))] * 9, "hi"), None, ("9 images", "at most 8", "--max-images")),
    ("scheme", chat_body(image_part("ftp://example.com/a.png"), "hi"), None, ("'ftp'",)),
    ("prompt over context", chat_body(image_part(data_url(png(1))), LONG), None, ("text + 4 image)", "context of 512 tokens")),
    ("prompt + max_tokens", chat_body(image_part(data_url(png(1))), "hi", max_tokens=600), None, ("max_tokens is 600", "512", "at most")),
]


@pytest.mark.parametrize("name,body,raw,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_are_400s_in_openai_shape(server, name, body, raw, words):
    error = refused(post(server, body, raw), 400, *words)
    assert error["type"] == "invalid_request_error"


def test_prompt_over_context_names_both_counts(server):
    error = refused(post(server, chat_body(image_part(data_url(png(1))), image_part(data_url(png(2))), LONG)), 400)
    text_tokens = int(error["message"].split("(")[1].split(" text")[0])
    assert text_tokens > 512 and "+ 8 image)" in error["message"] and error["code"] == "context_length_exceeded"


def test_unknown_route_and_method_are_openai_errors(server):
    refused(httpx.get(f"{server.url}/v1/nothing"), 404)
    refused(httpx.get(f"{server.url}/v1/chat/completions"), 405)


def test_body_over_the_limit_is_413(server):
    big = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)  # ~1.4 MB as PNG, server cap 1 MB
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    with pytest.raises(openai.APIStatusError) as e:
        server.client().chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "user", "content": [image_part(data_url(buf.getvalue())), {"type": "text", "text": "hi"}]}])
    assert e.value.status_code == 413 and "over the server's limit of 1 MB" in e.value.message
    assert server.health()["active"] == 0


def test_api_key(plain, vlm):
    turns = TURNS["text"]
    for key in ("none", "sekrit-keY", "sekrit-key-longer"):
        with pytest.raises(openai.AuthenticationError) as e:
            ask(plain.client(key), turns)
        assert e.value.status_code == 401 and "API key" in e.value.message
    with pytest.raises(openai.AuthenticationError):
        plain.client("wrong").models.list()
    assert ask(plain.client("sekrit-key"), turns).choices[0].message.content == reference(vlm, turns)
    assert httpx.get(f"{plain.url}/health").status_code == 200  # health stays open
    refused(post(plain, None, b'{"messages": ['), 401)  # the key is checked before the body


# -- where images may come from ----------------------------------------------------------------------
class Trap:
    """A listening socket that counts the connections it accepts."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def connections(monkeypatch):
    """Every address this process connects a socket to, while the test runs."""
    seen = []
    original = socket.socket.connect

    def connect(self, address):
        seen.append(address)
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen


def test_image_urls_to_private_addresses_are_refused_without_connecting(server, plain, connections):
    trap = Trap()
    try:
        urls = [
            f"http://127.0.0.1:{trap.port}/a.png", f"http://localhost:{trap.port}/a.png", f"http://[::1]:{trap.port}/a.png",
            f"http://[::ffff:127.0.0.1]:{trap.port}/a.png", f"http://2130706433:{trap.port}/a.png", f"http://0.0.0.0:{trap.port}/",
            "http://10.0.0.1/a.png", "http://192.168.1.1/a.png", "http://172.16.0.1/a.png", "http://100.64.0.1/a.png",
            "http://169.254.169.254/latest/meta-data/", "https://169.254.169.254/", "http://[fe80::1]/a.png",
        ]
        for url in urls:
            refused(post(server, chat_body(image_part(url), "hi")), 400, "messages[0].content[0]", "public addresses only")
        # the default server fetches no URL at all
        refused(post(plain, chat_body(image_part(f"http://127.0.0.1:{trap.port}/a.png"), "hi"),
                     headers={"Authorization": "Bearer sekrit-key"}), 400, "image URLs are off", "--allow-media-url")
    finally:
        trap.close()
    assert trap.accepted == 0
    assert {address[1] for address in connections} <= {server.port, plain.port}, connections


class Site(http.server.BaseHTTPRequestHandler):
    """A stand-in for a public web server: an image, a redirect to the trap, a body too large, a slow one."""

    image, trap_port = b"", 0

    def do_GET(self):
        if self.path == "/ok.png":
            self._send(200, self.image)
        elif self.path == "/hop":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.trap_port}/a.png")
            self.end_headers()
        elif self.path == "/hop-ok":
            self.send_response(301)
            self.send_header("Location", "/ok.png")
            self.end_headers()
        elif self.path == "/big.png":
            self._send(200, b"\0" * (2 * 2**20))
        elif self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            for _ in range(30):
                self.wfile.write(b"\0")
                self.wfile.flush()
                time.sleep(0.1)
        else:
            self._send(404, b"")

    def _send(self, status, data):
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_image_url_fetch_follows_the_policy(server, vlm, monkeypatch):
    """127.0.0.2 plays a public address: a good image is fetched; a redirect to a private one, a body over
    the cap and a fetch over the timeout are refused."""
    from vlmkit.serve import media

    public = media.is_public
    monkeypatch.setattr(media, "is_public", lambda address: address == "127.0.0.2" or public(address))
    trap = Trap()
    Site.image, Site.trap_port = png(1), trap.port
    site = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Site)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    base = f"http://127.0.0.2:{site.server_address[1]}"
    try:
        want = reference(vlm, TURNS["image"], 4)
        for path in ("/ok.png", "/hop-ok"):
            ok = post(server, chat_body(image_part(base + path), "What colour is the circle?"))
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == want
        refused(post(server, chat_body(image_part(base + "/hop"), "hi")), 400, "public addresses only")
        refused(post(server, chat_body(image_part(base + "/big.png"), "hi")), 400, "over the server's limit of 1 MB")
        start = time.monotonic()
        refused(post(server, chat_body(image_part(base + "/slow.png"), "hi")), 400, "took over 1 s")
        assert time.monotonic() - start < 2.5
        refused(post(server, chat_body(image_part(base + "/missing.png"), "hi")), 400, "HTTP 404")
    finally:
        site.shutdown()
        trap.close()
    assert trap.accepted == 0


@pytest.fixture
def opened(monkeypatch):
    """Every path this process opens while the test runs."""
    seen = []
    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        original = getattr(module, name)

        def spy(file, *args, _original=original, **kw):
            if isinstance(file, (str, bytes, os.PathLike)):
                seen.append(os.fsdecode(file))
            return _original(file, *args, **kw)

        monkeypatch.setattr(module, name, spy)
    return seen


def test_local_paths_stay_inside_the_media_root(server, plain, vlm, media_root, opened):
    secret = (media_root.parent / "secret.png").resolve()
    want = reference(vlm, [("user", [png(3), "What colour is the circle?"])], 4)
    for ref in ("good.png", str(media_root / "good.png"), f"file://{media_root}/good.png", "inner.png"):
        ok = post(server, chat_body(image_part(ref), "What colour is the circle?"))
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == want, ref
    escapes = {
        "../secret.png": "'..'", "sub/../../secret.png": "'..'", str(secret): "outside the server's media root",
        f"file://{secret}": "outside", "out.png": "outside", "subout/secret.png": "outside",
        f"file://{media_root}/../secret.png": "'..'", "file://otherhost/etc/passwd": "local file",
    }
    for ref, words in escapes.items():
        refused(post(server, chat_body(image_part(ref), "hi")), 400, "messages[0].content[0]", words)
    refused(post(server, chat_body(image_part("missing.png"), "hi")), 400, "no image file")
    refused(post(plain, chat_body(image_part("good.png"), "hi"), headers={"Authorization": "Bearer sekrit-key"}),
            400, "local image paths are off", "--media-root")
    assert not [p for p in opened if Path(p).resolve() == secret], "the secret was opened"
    assert any(Path(p).resolve() == (media_root / "good.png").resolve() for p in opened), "the spy saw no read at all"


# -- concurrency -------------------------------------------------------------------------------------
def test_32_concurrent_clients_get_their_serial_replies(server, vlm):
    """32 clients at once, half streaming, with 4 bad requests among them: no errors for the good ones,
    each reply equal to its serial `vlmkit generate` reply, and the server batched them."""
    turns = [conversation(i) for i in range(32)]
    want = [reference(vlm, t) for t in turns]
    assert len(set(want)) > 8
    results, errors = [None] * 32, []
    bad_status = []
    barrier = threading.Barrier(36)

    def good(i):
        client = server.client()
        barrier.wait()
        try:
            results[i] = streamed(client, turns[i])[0] if i % 2 else ask(client, turns[i]).choices[0].message.content
        except Exception as e:  # noqa: BLE001 - every failure is reported below
            errors.append((i, repr(e)))

    def bad(k):
        barrier.wait()
        bad_status.append(post(server, chat_body(image_part(data_url(png(1)[:50 + k])), "hi")).status_code)

    threads = [threading.Thread(target=good, args=(i,)) for i in range(32)] + [threading.Thread(target=bad, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert bad_status == [400] * 4
    mismatched = [(i, results[i], want[i]) for i in range(32) if results[i] != want[i]]
    assert mismatched == []
    health = server.health()
    assert health["max_batch_run"] > 1 and health["active"] == 0 and health["running"] == 0


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, vlm):
    before = server.batcher.cancelled
    stream = server.client().chat.completions.create(
        model="tiny", messages=api_messages(TURNS["text"]), max_tokens=400, stream=True)
    pieces = 0
    for chunk in stream:
        pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        if pieces == 2:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["active"] == 0 and server.batcher.cancelled == before + 1
    assert ask(server.client(), TURNS["image"]).choices[0].message.content == reference(vlm, TURNS["image"])


def test_a_request_joins_a_batch_being_decoded(server, vlm):
    """Continuous batching: a request sent while a long reply is being decoded joins that batch between
    two steps (it does not wait for the long one to end), and both replies are their serial ones."""
    joined = server.batcher.joined
    long_turn, short_turn = TURNS["text"], TURNS["image"]
    want_long = reference(vlm, long_turn, max_tokens=120)
    stream = server.client().chat.completions.create(model="tiny", messages=api_messages(long_turn), max_tokens=120, stream=True)
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if len(pieces) == 1:
            short = ask(server.client(), short_turn)  # answered while the long reply is still streaming
            assert short.choices[0].message.content == reference(vlm, short_turn)
    assert "".join(pieces).strip() == want_long
    assert server.batcher.joined > joined


def test_a_full_queue_is_503_with_retry_after(vlm):
    s = Server(vlm, max_batch=1, max_queue=1)
    gate, run = threading.Event(), s.batcher._prefill  # the worker holds the first request at its prefill
    s.batcher._prefill = lambda jobs: (gate.wait(30), run(jobs))[1]
    try:
        replies = []
        first = threading.Thread(target=lambda: replies.append(post(s, chat_body("first"))))
        first.start()
        while s.health()["active"] < 1:
            time.sleep(0.02)
        second = threading.Thread(target=lambda: replies.append(post(s, chat_body("second"))))
        second.start()
        while s.health()["queued"] < 1:
            time.sleep(0.02)
        third = post(s, chat_body("third"))
        refused(third, 503, "busy", "--max-queue 1")
        assert third.headers["Retry-After"] == "1" and third.json()["error"]["code"] == "queue_full"
        gate.set()
        first.join(60)
        second.join(60)
        assert [r.status_code for r in replies] == [200, 200]
    finally:
        gate.set()
        s.close()


# -- the command -------------------------------------------------------------------------------------
def test_vlmkit_serve_command(model_dir):
    """The real command in a subprocess: the banner, the key from VLMKIT_API_KEY, one log line per request."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLMKIT_API_KEY": "env-key", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmkit.cli", "serve", "--model", str(model_dir), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="env-key", max_retries=0)
        reply = ask(client, TURNS["text"], max_tokens=3)
        assert reply.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            ask(openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0), TURNS["text"])
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert f"{url}/v1" in out and "curl " in out and "from openai import OpenAI" in out and "$VLMKIT_API_KEY" in out
    lines = [line for line in err.splitlines() if "status=" in line]
    assert len(lines) == 2, err
    assert reply.id in lines[0] and "status=200" in lines[0] and "completion_tokens=3" in lines[0] and "latency=" in lines[0]
    assert "status=401" in lines[1]
    assert "What colour" not in err  # content is logged only with --log-requests


def test_vlmkit_serve_refuses_bad_flags(capfd, tmp_path):
    from vlmkit.cli import main

    busy = socket.create_server(("127.0.0.1", 0))
    cases = ((["--max-images", "0"], "--max-images"), (["--media-root", str(tmp_path / "no")], "not a folder"),
             (["--port", str(busy.getsockname()[1])], "choose another --port"))
    for argv, words in cases:
        assert main(["serve", "--model", str(tmp_path), *argv]) == 2
        err = capfd.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]
    busy.close()


@pytest.mark.parametrize("family, decode", [("smolvlm", "fp32"), ("qwen2_vl", "auto")])
def test_a_pretrained_family_batches_to_its_serial_replies(family, decode, tmp_path):
    """A transformers VLM (SmolVLM: nested images and tiling, continuous batching over vlmkit's decoder in
    fp32, exact as `vlm` explains; Qwen2-VL: 3-D positions, dynamic batching over `generate`), 6 clients."""
    from tiny_vlms import make_vlm

    from vlmkit.infer.load import load

    vlm = load(str(make_vlm(family, tmp_path / family)), device="cpu", decode=decode)
    turns = [[("user", [*[png(50 + i + k, (20 + 7 * i, 30)) for k in range(i % 3)], "What colour is it" + "?" * i])] for i in range(6)]
    want = [reference(vlm, t) for t in turns]
    s = Server(vlm)
    try:
        results = [None] * 6

        def one(i):
            results[i] = ask(s.client(), turns[i])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [r.choices[0].message.content for r in results] == want
        assert s.health()["max_batch_run"] > 1
        for t, r in zip(turns, results):
            messages, images = engine_messages(t)
            ids = vlm.engine.inputs([messages], [images])["input_ids"][0]
            assert r.usage.prompt_tokens == ids.numel()
            assert r.usage.prompt_tokens_details.image_tokens == int((ids == vlm.model.config.image_token_id).sum())
            assert (r.usage.prompt_tokens_details.image_tokens > 0) == bool(images)
    finally:
        s.close()


def test_the_server_leaves_a_core_to_the_event_loop(capfd):
    from vlmkit.cli import main
    from vlmkit.serve.server import compute_threads

    assert [compute_threads(n) for n in (1, 2, 4, 16)] == [1, 1, 3, 15]
    assert main(["serve", "--model", "m", "--threads", "0"]) == 2
    assert "--threads 0: give 1 or more" in capfd.readouterr().err

"""The web UI (`vlmkit ui`): its handlers without a browser, then the page itself in headless Chromium.

The models are tiny random vlmkit compositions whose output layer only scores word tokens, so replies are
readable words that depend on the prompt and the images (a plain random model repeats one newline).
The browser tests start `vlmkit ui` as a user would and skip, saying why, when no Chromium is installed
(Debian's `chromium`; `.ci/run` installs it). Screenshots go to the test's tmp folder; with
VLMKIT_UI_SCREENSHOT=docs/ui.png the chat screenshot is also written there (the README's picture).
"""

import base64
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Event

import numpy as np
import pytest
from PIL import Image
from tiny import make_clip_vision, make_llama

from vlmkit.data.preferences import load_preferences
from vlmkit.errors import VlmkitError
from vlmkit.ui.backends import ApiBackend, LocalBackend, Settings, openai_messages
from vlmkit.ui.chat import Chat, chatbot_messages, check_uploads, conversation
from vlmkit.ui.compare import Compare, PreferenceFile
from vlmkit.ui.seen import Seen, what_the_model_sees

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 12
GREEDY = Settings(max_new_tokens=MAX_NEW)


# -- fixtures ----------------------------------------------------------------------------------------
def make_word_model(folder: Path, seed: int) -> Path:
    """A tiny vlmkit model (CLIP + Llama, 4 image tokens) whose untied output layer scores only word tokens
    (" the", " red"...), scaled up so the reply is not one token repeated."""
    import torch

    from vlmkit.build import compose

    parts = folder.parent / f"{folder.name}_parts"
    model, processor = compose(
        vision=str(make_clip_vision(parts / "clip", seed=seed)),
        llm=str(make_llama(parts / "llm", seed=seed, tie=False)),
        image_tokens=4,
    )
    tokenizer = processor.tokenizer
    words = [i for i in range(len(tokenizer)) if re.fullmatch(r" [a-z]{2,}", tokenizer.decode([i]))]
    head = model.language_model.get_output_embeddings().weight
    with torch.no_grad():
        keep = torch.zeros(head.shape[0], dtype=torch.bool)
        keep[words] = True
        head[~keep] = 0
        head[keep] *= 20
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _noise(path: Path, seed: int, size=(40, 30)) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _bomb(path: Path) -> Path:
    """A tiny PNG that claims to be 100000 x 100000 pixels: a decompression bomb as PIL sees it."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    make_word_model(root / "model_a", seed=0)
    make_word_model(root / "model_b", seed=1)
    _noise(root / "red.png", 0)
    _noise(root / "blue.png", 1, size=(24, 36))
    (root / "notes.png").write_text("this is not an image\n")  # a text file with an image's name
    _bomb(root / "bomb.png")
    return root


@pytest.fixture(scope="module")
def a(w):
    from vlmkit.infer.load import load

    return LocalBackend(load(str(w / "model_a"), device="cpu"), name="A")


@pytest.fixture(scope="module")
def b(w):
    from vlmkit.infer.load import load

    return LocalBackend(load(str(w / "model_b"), device="cpu"), name="B")


def _last(steps):
    steps = list(steps)
    assert steps and steps[-1].done
    return steps[-1], steps


# -- conversations -----------------------------------------------------------------------------------
def test_conversation_keeps_every_image_in_its_own_turn():
    turns = [
        {"text": "First?", "images": ["a.png"], "reply": "one"},
        {"text": "No image here.", "images": [], "reply": "two"},
        {"text": "", "images": ["b.png", "c.png"], "reply": ""},
    ]
    messages, images = conversation(turns, system="Be brief.", reply_last=False)
    assert images == ["a.png", "b.png", "c.png"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "First?"}]
    assert messages[3]["content"] == [{"type": "text", "text": "No image here."}]
    assert messages[5]["content"] == [{"type": "image"}, {"type": "image"}]  # images alone: no empty text part
    assert conversation(turns)[0][-1] == {"role": "assistant", "content": [{"type": "text", "text": ""}]}

    shown = chatbot_messages(turns)
    assert shown[0] == {"role": "user", "content": [{"path": "a.png"}, "First?"]}
    assert shown[4] == {"role": "user", "content": [{"path": "b.png"}, {"path": "c.png"}]}
    assert len(shown) == 5  # the last turn has no reply yet: no empty assistant bubble


def test_chat_streams_what_generate_gives_and_the_second_turn_gets_both_images(w, a):
    chat, received = Chat(a), []
    stream = a.stream

    def spy(messages, images, settings, stop=None):
        received.append(list(images))
        yield from stream(messages, images, settings, stop)

    a.stream = spy
    try:
        step, steps = _last(chat.submit([], {"text": "What colour is it?", "files": [str(w / "red.png")]}, GREEDY))
        first = a.vlm.generate(conversation(step.turns, reply_last=False)[0], [str(w / "red.png")], max_new_tokens=MAX_NEW)
        assert first and step.turns[0]["reply"] == first == step.reply
        assert sum(1 for s in steps if not s.done and s.reply) >= 2  # streamed in pieces, growing
        assert steps[0].box == {"text": "", "files": []} and isinstance(steps[0].seen, Seen)
        assert step.status.startswith("Done: turn 1")

        step, _ = _last(chat.submit(step.turns, {"text": "And this one?", "files": [{"path": str(w / "blue.png")}]}, GREEDY))
    finally:
        del a.stream
    assert received == [[str(w / "red.png")], [str(w / "red.png"), str(w / "blue.png")]]
    messages, images = conversation(step.turns, reply_last=False)
    assert [p["type"] for m in messages for p in m["content"]].count("image") == 2
    assert step.turns[1]["reply"] == a.vlm.generate(messages, images, max_new_tokens=MAX_NEW)


def test_bad_uploads_get_one_line_and_the_chat_goes_on(w, a):
    chat = Chat(a)
    turns = _last(chat.submit([], {"text": "Hi?", "files": [str(w / "red.png")]}, GREEDY))[0].turns
    upload = {"text": "And these?", "files": [str(w / "notes.png"), str(w / "blue.png"), str(w / "bomb.png")]}
    step, steps = _last(chat.submit(turns, upload, GREEDY))
    assert len(steps) == 1 and step.turns == turns  # nothing sent, the conversation as it was
    assert step.status.startswith("Not sent: ")
    assert "notes.png: not an image file" in step.status and "bomb.png: image is too large (100000x100000)" in step.status
    assert str(w) not in step.status and "Traceback" not in step.status  # file names, not server paths
    assert step.box == {"text": "And these?", "files": [str(w / "blue.png")]}  # the good image stays attached
    assert _last(chat.submit(turns, step.box, GREEDY))[0].status.startswith("Done: turn 2")

    assert check_uploads([str(w / "gone.png")])[1] == ["gone.png: image file not found; check the path"]
    assert _last(chat.submit(turns, {"text": "  ", "files": []}, GREEDY))[0].status == "Type a message or attach an image first."


def test_retry_undo_clear_and_seeded_sampling(w, a):
    chat = Chat(a)
    turns = _last(chat.submit([], {"text": "Describe the image.", "files": [str(w / "red.png")]}, GREEDY))[0].turns
    greedy = turns[0]["reply"]
    step = _last(chat.retry(turns, GREEDY))[0]
    assert step.turns[0]["reply"] == greedy and step.status.startswith("Retried: turn 1")  # greedy: the same again

    hot = Settings(temperature=1.5, top_p=0.9, max_new_tokens=MAX_NEW, seed=7)
    sampled = [_last(chat.retry(turns, hot))[0].turns[0]["reply"] for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible
    assert turns[0]["reply"] == greedy  # retry works on a copy until the new reply is in

    step = chat.undo(turns)
    assert step.turns == [] and step.box == {"text": "Describe the image.", "files": [str(w / "red.png")]}
    assert chat.undo([]).status == "Nothing to undo." and _last(chat.retry([], GREEDY))[0].status == "Nothing to retry yet."
    assert chat.clear().turns == [] and chat.clear().box == {"text": "", "files": []}


def test_stop_ends_the_generation_at_the_next_token(w, a):
    stop = Event()
    chat, pieces = Chat(a), 0
    settings = Settings(max_new_tokens=400)
    for step in chat.submit([], {"text": "Describe the image.", "files": [str(w / "red.png")]}, settings, stop):
        if step.reply and not step.done:
            pieces += 1
            stop.set()  # the Stop button, pressed as the first words arrive
    assert step.status.startswith("Stopped: turn 1") and pieces <= 3
    assert len(step.turns[0]["reply"].split()) < 10  # kept, and far short of 400 tokens

    # closing the stream early (a browser that went away) also ends the generation thread
    before = threading.active_count()
    stream = a.vlm.engine.stream(conversation(step.turns, reply_last=False)[0], [str(w / "red.png")], max_new_tokens=400)
    next(stream)
    stream.close()
    assert threading.active_count() <= before


def test_settings_are_checked():
    assert Settings.of(None, None, None, 16, None) == Settings(max_new_tokens=16)
    for bad in (dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0)):
        with pytest.raises(VlmkitError):
            Settings(**bad)


# -- what the model sees -----------------------------------------------------------------------------
def test_the_panel_shows_each_image_as_the_processor_made_it(w, a):
    vlm = a.vlm
    turns = [{"text": "Two?", "images": [str(w / "red.png")], "reply": "yes"}, {"text": "Three?", "images": [str(w / "blue.png")], "reply": ""}]
    messages, images = conversation(turns, reply_last=False)
    seen = what_the_model_sees(vlm, messages, images)
    ids = vlm.engine.inputs([messages], [images])["input_ids"][0]
    assert seen.prompt_tokens == len(ids) and seen.context == 512
    assert [i.tokens for i in seen.images] == [4, 4] and seen.image_tokens == 8  # 4 image tokens per image
    assert [i.size for i in seen.images] == [(40, 30), (24, 36)]
    assert [v.size for i in seen.images for v in i.views] == [(32, 32), (32, 32)]
    # the picture shown is the pixel values the model gets, turned back into pixels
    again = vlm.processor.pixel_values([seen.images[1].views[0]])[0]
    assert np.abs((again - vlm.processor.pixel_values([Image.open(w / "blue.png").convert("RGB")])[0]).numpy()).max() < 0.05
    assert "**2 images**" in seen.summary() and f"**Prompt: {len(ids)} tokens** of the model's 512-token context" in seen.summary()
    assert "image 2: 24x36 -> 32x32, 4 tokens" in seen.summary()
    assert [c for _, c in seen.gallery()] == ["image 1: 32x32, 4 tokens", "image 2: 32x32, 4 tokens"]
    assert seen.prompt.count("<image>") == 2 and "Three?" in seen.prompt


@pytest.mark.parametrize("family", ["smolvlm", "qwen2_vl"])
def test_the_panel_for_pretrained_families(tmp_path, w, family):
    """SmolVLM splits an image into tiles plus a global view; Qwen2-VL packs it into a grid of patches."""
    from tiny_vlms import make_vlm

    from vlmkit.infer.load import load

    vlm = load(str(make_vlm(family, tmp_path / family)), device="cpu")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    seen = what_the_model_sees(vlm, messages, [str(w / "red.png")])
    ids = vlm.engine.inputs([messages], [[str(w / "red.png")]])["input_ids"][0].tolist()
    assert seen.images[0].tokens == seen.image_tokens == ids.count(vlm.model.config.image_token_id) > 0
    if family == "smolvlm":
        assert len(seen.images[0].views) > 1  # tiles and the global view
    else:
        assert "grid" in seen.images[0].note and len(seen.images[0].views) == 1


def test_a_conversation_over_the_context_is_refused():
    class Small:
        def sees(self, messages, images):
            return Seen(images=[], prompt_tokens=600, image_tokens=0, context=512, prompt="")

        def stream(self, *args):
            raise AssertionError("must not generate")

    step, steps = _last(Chat(Small()).submit([], {"text": "Hi", "files": []}, GREEDY))
    assert len(steps) == 1 and step.turns == []
    assert step.status == "Not sent: the conversation is 600 tokens, and the model takes 512; undo turns or clear the chat"


# -- compare and the preference file -----------------------------------------------------------------
def test_compare_appends_a_pair_that_dpo_reads(tmp_path, w, a, b):
    prefs = PreferenceFile(tmp_path / "prefs" / "pairs.jsonl")
    compare = Compare(a, b, prefs)
    message = {"text": "What colour is it?", "files": [str(w / "red.png")]}
    step, steps = _last(compare.run(message, Settings(system="Be brief.", max_new_tokens=MAX_NEW)))
    assert step.status == "Which answer is better?" and step.answer_a != step.answer_b
    assert any(s.answer_a and not s.answer_b for s in steps)  # A streams first
    status, pending = compare.choose(step.pending, "b")
    assert pending is None and status.startswith("Saved: B is better (1 pair in ")
    assert compare.choose(None, "a")[0].startswith("Generate two answers first")  # a second click saves nothing

    step = _last(compare.run(message, Settings(max_new_tokens=MAX_NEW)))[0]
    compare.choose(step.pending, "a")
    samples = load_preferences(prefs.path, check_images=True)  # what `vlmkit train method=dpo` reads
    assert len(samples) == 2
    first = samples[0]
    assert [m["role"] for m in first.prompt] == ["system", "user"]
    assert first.prompt[1]["content"][0] == {"type": "image"}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    assert first.chosen[0]["content"][0]["text"] == b.vlm.generate(messages, [str(w / "red.png")], max_new_tokens=MAX_NEW)
    assert first.rejected[0]["content"][0]["text"] == a.vlm.generate(messages, [str(w / "red.png")], max_new_tokens=MAX_NEW)
    assert samples[1].chosen[0]["content"][0]["text"] == step.answer_a
    assert first.images[0].read_bytes() == (w / "red.png").read_bytes()
    assert list(prefs.image_dir.iterdir()) == [first.images[0]] == [samples[1].images[0]]  # stored once
    line = json.loads(prefs.path.read_text().splitlines()[0])
    assert line["images"] == [f"pairs_images/{first.images[0].name}"]  # relative to the file
    assert sorted(p.name for p in prefs.path.parent.iterdir()) == ["pairs.jsonl", "pairs_images"]  # no temp files

    assert _last(Compare(a, None, prefs).run(message, GREEDY))[0].status.startswith("Start `vlmkit ui` with --model-b")
    assert "notes.png: not an image file" in _last(compare.run({"text": "Hi", "files": [str(w / "notes.png")]}, GREEDY))[0].status
    with pytest.raises(VlmkitError, match="give a .jsonl file"):
        PreferenceFile(tmp_path / "prefs.txt")


# -- an OpenAI-compatible server ---------------------------------------------------------------------
class FakeOpenAI(BaseHTTPRequestHandler):
    """/v1/models and a streaming /v1/chat/completions that answers how many images it got."""

    requests: list = []
    fail = False

    def log_message(self, *args):
        pass

    def _json(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._json({"object": "list", "data": [{"id": "fake-vlm", "object": "model", "created": 0, "owned_by": "test"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeOpenAI.requests.append(body)
        if FakeOpenAI.fail:
            return self._json({"error": {"message": "model overloaded", "type": "server_error"}}, status=500)
        n = sum(1 for m in body["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ["I see", f" {n}", " images."]:
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture()
def api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeOpenAI.requests, FakeOpenAI.fail = [], False
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_chat_through_an_openai_compatible_server(w, api):
    backend = ApiBackend(api, api_key="k")
    assert backend.model == "fake-vlm"  # the server's first model, as none was named
    chat = Chat(backend)
    step, steps = _last(chat.submit([], {"text": "What colour?", "files": [str(w / "red.png")]}, Settings(system="Be brief.", max_new_tokens=9)))
    assert step.turns[0]["reply"] == "I see 1 images." and steps[0].seen is False  # the panel: not available
    step = _last(chat.submit(step.turns, {"text": "And now?", "files": [str(w / "blue.png")]}, GREEDY))[0]
    assert step.turns[1]["reply"] == "I see 2 images."  # the history's image went along

    first, second = FakeOpenAI.requests
    assert first["model"] == "fake-vlm" and first["stream"] is True and first["max_tokens"] == 9
    assert first["messages"][0] == {"role": "system", "content": "Be brief."}
    url = first["messages"][1]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == (w / "red.png").read_bytes()
    assert first["messages"][1]["content"][1] == {"type": "text", "text": "What colour?"}
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == "I see 1 images."

    FakeOpenAI.fail = True
    step, _ = _last(chat.submit(step.turns, {"text": "Again?", "files": []}, GREEDY))
    assert step.status.startswith(f"Error: the server at {api} failed: ") and "\n" not in step.status
    assert len(step.turns) == 2 and step.box == {"text": "Again?", "files": []}

    with pytest.raises(VlmkitError, match="could not list the server's models"):
        ApiBackend("http://127.0.0.1:9/v1")
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    (w / "small.jpg").write_bytes(jpeg.getvalue())
    assert openai_messages([{"role": "user", "content": [{"type": "image"}]}], [str(w / "small.jpg")])[0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_the_page_builds_for_both_kinds_of_backend(tmp_path, a, b, api):
    from vlmkit.ui.app import build_app

    for demo in (build_app(a, b, PreferenceFile(tmp_path / "p.jsonl")), build_app(ApiBackend(api))):
        ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
        assert {"chat", "box", "status", "seen", "seen-images", "raw-reply", "compare-box", "choose-a", "choose-b"} <= ids


def test_cli_ui_refuses_bad_arguments(capfd, tmp_path, w):
    from vlmkit.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["ui", "--model", str(w / "model_a"), "--port", str(port), "--preferences", str(tmp_path / "p.jsonl")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: could not serve on 127.0.0.1:{port} (") and err[-1].endswith("pick another --port")

    assert main(["ui"]) == 2
    assert capfd.readouterr().err.strip() == "error: give --model M (a model folder or hub id) or --api-base URL (an OpenAI-compatible server)"
    assert main(["ui", "--model", "m", "--preferences", str(tmp_path / "pairs.csv")]) == 2
    assert "give a .jsonl file" in capfd.readouterr().err
    with pytest.raises(SystemExit):
        main(["ui", "--model", "m", "--share", "maybe"])
    assert "'maybe': give true or false" in capfd.readouterr().err


# -- in a real browser -------------------------------------------------------------------------------
def chromium() -> str | None:
    for candidate in (os.environ.get("VLMKIT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium executable found (apt-get install chromium; .ci/run installs it; or set VLMKIT_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-test.txt)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(w, browser, tmp_path_factory):
    """`vlmkit ui` with models A and B, as a user starts it, on a free loopback port."""
    root = tmp_path_factory.mktemp("server")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(root / "gradio"))
    argv = [sys.executable, "-m", "vlmkit.cli", "ui", "--model", "model_a", "--model-b", "model_b",
            "--port", str(port), "--preferences", str(root / "pairs.jsonl"), "--max-new-tokens", str(MAX_NEW)]
    log = open(root / "server.log", "w")
    # run from the models' folder (the page names them as given); PYTHONPATH: this checkout's vlmkit
    process = subprocess.Popen(argv, cwd=w, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("vlmkit ui did not start:\n" + (root / "server.log").read_text())
            time.sleep(0.5)
    yield {"url": url, "prefs": root / "pairs.jsonl", "log": root / "server.log"}
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture()
def page(browser, server):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)  # a busy machine streams slowly
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server["url"])
    page.wait_for_selector("#box textarea")
    yield page
    context.close()


def _send(page, text: str, files=(), box="#box"):
    if files:
        page.set_input_files(f"{box} input[type=file]", [str(f) for f in files])
        page.wait_for_function(f"document.querySelectorAll('{box} .thumbnail-item').length == {len(files)}")
    page.fill(f"{box} textarea", text)
    page.press(f"{box} textarea", "Enter")


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9]+", text)


def test_browser_chat(page, w, a, capfd, tmp_path):
    from playwright.sync_api import expect

    from vlmkit.cli import main

    capfd.readouterr()
    assert main(["generate", "--model", str(w / "model_a"), "--image", str(w / "red.png"), "--prompt", "What colour is it?",
                 "--max-new-tokens", str(MAX_NEW)]) == 0
    expected = capfd.readouterr().out.strip()
    assert expected

    # 1. an image and a question: the streamed answer is `vlmkit generate`'s
    _send(page, "What colour is it?", [w / "red.png"])
    expect(page.locator("#status")).to_contain_text("Done: turn 1")
    assert page.input_value("#raw-reply textarea") == expected
    bot = page.locator("#chat .message.bot")
    assert _words(bot.last.inner_text()) == _words(expected)  # the chat shows it (rendered as Markdown)
    expect(page.locator("#seen")).to_contain_text("1 image in the conversation")

    # 2. an example (a bundled image and its prompt), sent as the second turn
    page.locator("#examples button").first.click()
    expect(page.locator("#box textarea")).to_have_value("Describe the image.")
    page.press("#box textarea", "Enter")
    expect(page.locator("#status")).to_contain_text("Done: turn 2")
    # the model got both images, each in its own turn, and the chat still shows both
    expect(page.locator("#seen")).to_contain_text("2 images in the conversation")
    expect(page.locator("#seen")).to_contain_text("image 2: 64x64 -> 32x32, 4 tokens")
    expect(page.locator("#seen-images img")).to_have_count(2)
    expect(page.locator("#chat .message.user img")).to_have_count(2)
    shapes = str(REPO / "vlmkit" / "ui" / "examples" / "shapes.png")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
    ]
    assert page.input_value("#raw-reply textarea") == a.vlm.generate(messages, [str(w / "red.png"), shapes], max_new_tokens=MAX_NEW)
    prompt = page.input_value("#seen-prompt textarea")
    assert prompt.count("<image>") == 2 and expected in prompt  # the first reply is in the second prompt
    page.screenshot(path=str(tmp_path / "chat.png"))
    if os.environ.get("VLMKIT_UI_SCREENSHOT"):  # the README's picture, in 256 colours to keep it small
        shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
        shot.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(os.environ["VLMKIT_UI_SCREENSHOT"], optimize=True)

    # 3. a decompression bomb: one visible line, no traceback, and the chat goes on
    _send(page, "And this?", [w / "bomb.png"])
    expect(page.locator("#status")).to_contain_text("Not sent: bomb.png: image is too large (100000x100000)")
    assert "Traceback" not in page.inner_text("body")
    expect(page.locator("#box .thumbnail-item")).to_have_count(0)  # the refused file is gone, the text kept
    expect(page.locator("#box textarea")).to_have_value("And this?")
    page.fill("#box textarea", "Thanks?")
    page.press("#box textarea", "Enter")
    expect(page.locator("#status")).to_contain_text("Done: turn 3")
    expect(page.locator("#seen")).to_contain_text("2 images in the conversation")
    page.screenshot(path=str(tmp_path / "after_bad_upload.png"))

    # 4. retry, undo (the turn goes back into the box) and clear
    page.click("#retry")
    expect(page.locator("#status")).to_contain_text("Retried: turn 3")
    expect(page.locator("#chat .message.bot")).to_have_count(3)
    page.click("#undo")
    expect(page.locator("#box textarea")).to_have_value("Thanks?")
    expect(page.locator("#chat .message.bot")).to_have_count(2)
    page.click("#clear")
    expect(page.locator("#chat .message")).to_have_count(0)
    expect(page.locator("#box textarea")).to_have_value("")
    print(f"screenshots: {tmp_path}")


def test_browser_compare_writes_a_preference_pair(page, server, w, a, b, tmp_path):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    _send(page, "What colour is it?", [w / "red.png"], box="#compare-box")
    expect(page.locator("#compare-status")).to_contain_text("Which answer is better?")
    answer_a, answer_b = page.input_value("#answer-a textarea"), page.input_value("#answer-b textarea")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    assert answer_a == a.vlm.generate(messages, [str(w / "red.png")], max_new_tokens=MAX_NEW)
    assert answer_b == b.vlm.generate(messages, [str(w / "red.png")], max_new_tokens=MAX_NEW)
    page.click("#choose-b")
    expect(page.locator("#compare-status")).to_contain_text("Saved: B is better (1 pair in")
    page.screenshot(path=str(tmp_path / "compare.png"))
    print(f"screenshot: {tmp_path / 'compare.png'}")

    (pair,) = load_preferences(server["prefs"], check_images=True)
    assert pair.chosen[0]["content"][0]["text"] == answer_b and pair.rejected[0]["content"][0]["text"] == answer_a
    assert pair.prompt[0]["content"][1]["text"] == "What colour is it?"
    assert pair.images[0].read_bytes() == (w / "red.png").read_bytes()
    assert "Traceback" not in server["log"].read_text()

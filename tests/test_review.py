"""`vlmkit review`: the review logic on a distilled folder (accept, edit, reject, pairwise choices, what
data.jsonl and preferences.jsonl become, resuming), then the page itself in headless Chromium, driven
with its keyboard shortcuts, killed, and opened again where it stopped. The folder is distilled by a
scripted teacher, so every reply (and so every expected row) is known."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_distill import Scripted, noise
import test_ui

from vlmkit.data.preferences import load_preferences
from vlmkit.data.schema import load_samples
from vlmkit.distill.manifest import load_manifest
from vlmkit.distill.review import Review
from vlmkit.distill.run import Plan, distill
from vlmkit.errors import VlmkitError

REPO = Path(__file__).resolve().parents[1]
browser = test_ui.browser  # the headless Chromium fixture
CAPTIONS = ["a noisy little picture", "a small noisy square"]
ANSWERS = ["red", "blue"]


@pytest.fixture()
def out(tmp_path):
    """Three images, a caption and a question each, two samples: six kept captions (the two answers
    disagree, so both are dropped) and six pairs of different replies."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [noise(folder / f"img{k}.png", k) for k in range(3)]
    teacher = Scripted(lambda r: (CAPTIONS if r.task == "caption" else ANSWERS)[r.sample])
    plan = Plan(("caption",), {"": ["What colour is it?"]}, "q.txt", samples=2, temperature=0.7)
    distill(teacher, [Path(os.path.abspath(p)) for p in paths], tmp_path / "out", plan)
    return tmp_path / "out"


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_data(out: Path, decisions: dict[int, str | None]) -> list[dict]:
    """data.jsonl as it must be: the kept pairs in manifest order; decisions[k] None rejects pair k, a
    string replaces its reply."""
    kept = [r for r in load_manifest(out) if r["status"] == "kept"]
    result = []
    for k, r in enumerate(kept):
        text = decisions.get(k, r["reply"])
        if text is not None:
            result.append({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]},
                                        {"role": "assistant", "content": [{"type": "text", "text": text}]}],
                           "images": [r["image"]]})
    return result


def test_review_actions_write_the_datasets_and_resume(out):
    review = Review(out)
    assert len(review.items) == 6 and len(review.pairs) == 6
    assert [i["reply"] for i in review.items[:2]] == CAPTIONS
    assert rows(out / "data.jsonl") == expected_data(out, {})
    assert review.act(0, "accept") == 1
    assert review.act(1, "edit", "  an edited caption ") == 2
    assert review.act(2, "reject") == 3
    assert review.act(3, "edit", CAPTIONS[1]) == 4  # unchanged text: an accept
    with pytest.raises(VlmkitError, match="the edited text is empty"):
        review.act(4, "edit", " ")
    assert review.progress() == "4 of 6 reviewed (2 accepted, 1 edited, 1 rejected)"
    assert rows(out / "data.jsonl") == expected_data(out, {1: "an edited caption", 2: None})
    assert len(load_samples(out / "data.jsonl", check_images=True)) == 5
    assert [r["action"] for r in rows(out / "reviews.jsonl")] == ["accept", "edit", "reject", "accept"]

    a, b = review.pair(0)
    assert review.choose(0, "b") == 1 and review.choose(1, "skip") == 2
    assert review.pair_progress() == "2 of 6 pairs judged (1 preferences, 1 skipped)"
    (pref,) = load_preferences(out / "preferences.jsonl", check_images=True)
    assert b["id"] == review.items[1]["id"]  # the edited caption: the preference holds the edit, as the page shows it
    assert review.text(b) == "an edited caption"
    assert pref.chosen[0]["content"][0]["text"] == "an edited caption" and pref.rejected[0]["content"][0]["text"] == a["reply"]
    assert pref.prompt[0]["content"][1]["text"] == a["prompt"] and str(pref.images[0]) == a["image"]

    # killed after saving an action and before rewriting data.jsonl, and mid-way through the next line
    with open(out / "reviews.jsonl", "a") as f:
        f.write(json.dumps({"id": review.items[2]["id"], "action": "accept", "time": 0}) + "\n" + '{"id": "')
    again = Review(out)
    assert again.first_open() == 4 and again.first_open_pair() == 2
    assert rows(out / "data.jsonl") == expected_data(out, {1: "an edited caption"})  # the late accept counts
    assert again.item(1).verdict == "edited and kept" and again.item(1).text == "an edited caption"
    with pytest.raises(VlmkitError, match="no manifest.jsonl here"):
        Review(out / "images")


# -- in a real browser -------------------------------------------------------------------------------
class ReviewServer:
    """`vlmkit review OUT` as a user starts it, on a free loopback port."""

    def __init__(self, out: Path):
        self.port = test_ui._free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        env = dict(os.environ, PYTHONPATH=str(REPO), GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(out.parent / "gradio"))
        self.log_path = out.parent / f"review{self.port}.log"
        self.log = open(self.log_path, "w")
        argv = [sys.executable, "-m", "vlmkit.cli", "review", str(out), "--port", str(self.port)]
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        import socket

        deadline = time.monotonic() + 120
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    pytest.fail("vlmkit review did not start:\n" + self.log_path.read_text())
                time.sleep(0.3)

    def kill(self) -> None:
        """As a user's Ctrl+C would not: SIGKILL, no chance to tidy up."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.log.close()


def open_page(browser, url):
    from playwright.sync_api import expect

    expect.set_options(timeout=60_000)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    return context, page


def test_browser_review_with_keyboard_shortcuts(browser, out, tmp_path):
    from playwright.sync_api import expect

    kept = [r for r in load_manifest(out) if r["status"] == "kept"]
    server = ReviewServer(out)
    context, page = open_page(browser, server.url)
    try:
        expect(page.locator("#progress")).to_contain_text("0 of 6 reviewed")
        expect(page.locator("#reply textarea")).to_have_value(kept[0]["reply"])
        image = page.locator("#image img")
        expect(image).to_be_visible()
        assert image.evaluate("img => img.naturalWidth") >= 400  # the 40-pixel image, enlarged to be seen
        page.keyboard.press("a")
        expect(page.locator("#progress")).to_contain_text("1 of 6 reviewed (1 accepted, 0 edited, 0 rejected)")
        expect(page.locator("#reply textarea")).to_have_value(kept[1]["reply"])
        page.fill("#reply textarea", "an edited caption")
        page.press("#reply textarea", "Control+Enter")
        expect(page.locator("#progress")).to_contain_text("2 of 6 reviewed (1 accepted, 1 edited, 0 rejected)")
        page.evaluate("document.activeElement.blur()")
        page.keyboard.press("r")  # a typed key in the page (not in a box) is a shortcut
        expect(page.locator("#progress")).to_contain_text("3 of 6 reviewed (1 accepted, 1 edited, 1 rejected)")
        expect(page.locator("#reply textarea")).to_have_value(kept[3]["reply"])
        page.screenshot(path=str(tmp_path / "review.png"))

        page.get_by_role("tab", name="Pairwise").click()
        expect(page.locator("#pair-progress")).to_contain_text("0 of 6 pairs judged")
        # the two captions of the first image, as they stand: the second was edited in the other tab
        expect(page.locator("#reply-b textarea")).to_have_value("an edited caption")
        expect(page.locator("#reply-a textarea")).to_have_value(CAPTIONS[0])
        reply_a, reply_b = CAPTIONS[0], "an edited caption"
        page.keyboard.press("2")
        expect(page.locator("#pair-progress")).to_contain_text("1 of 6 pairs judged (1 preferences, 0 skipped)")
        page.screenshot(path=str(tmp_path / "pairwise.png"))
    finally:
        context.close()
        server.kill()  # every action was saved when it was made: nothing to lose
    assert "Traceback" not in server.log_path.read_text()

    assert [r["action"] for r in rows(out / "reviews.jsonl")] == ["accept", "edit", "reject", "prefer"]
    assert rows(out / "data.jsonl") == expected_data(out, {1: "an edited caption", 2: None})
    (pref,) = rows(out / "preferences.jsonl")
    assert pref == {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": kept[0]["prompt"]}]}],
                    "chosen": [{"role": "assistant", "content": reply_b}], "rejected": [{"role": "assistant", "content": reply_a}],
                    "images": [kept[0]["image"]]}

    server = ReviewServer(out)  # opened again, it starts where the review stopped
    context, page = open_page(browser, server.url)
    try:
        expect(page.locator("#progress")).to_contain_text("3 of 6 reviewed")
        expect(page.locator("#reply textarea")).to_have_value(kept[3]["reply"])
        page.get_by_role("tab", name="Pairwise").click()
        expect(page.locator("#pair-progress")).to_contain_text("1 of 6 pairs judged")
    finally:
        context.close()
        server.kill()

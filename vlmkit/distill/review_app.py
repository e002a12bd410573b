"""`vlmkit review OUT`: the Gradio page over `review.Review`, on 127.0.0.1 by default.

Two tabs. Review: each kept pair, its image enlarged to a readable size, the prompt and the teacher's
reply in an editable box; a accepts, r rejects, Ctrl+Enter saves the edited text, the arrow keys move.
Pairwise: two different replies to the same image and prompt; 1 or 2 picks the better, 0 skips. The
page only shows and forwards: every decision is `Review`'s, saved before the page updates.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere

from vlmkit.errors import VlmkitError, first_line  # noqa: E402

try:
    import gradio as gr
except ImportError:
    raise VlmkitError("the review page needs gradio: pip install 'vlmkit[ui]' (or gradio)") from None
from vlmkit.data.images import load_image  # noqa: E402
from vlmkit.distill.review import Review  # noqa: E402
from vlmkit.ui.files import ImageFiles  # noqa: E402

READABLE = 448  # small images are enlarged (pixels kept sharp) to about this many pixels on the long side
CSS = "#progress, #pair-progress, #verdict {min-height: 1.5em} footer {display: none !important}"
# Keyboard shortcuts: a key clicks the visible button with that id; in a text box only Ctrl+Enter counts.
KEYS = """() => {
  const keys = {a: "accept", r: "reject", ArrowRight: "next", ArrowLeft: "prev", "1": "choose-a", "2": "choose-b", "0": "skip-pair"};
  document.addEventListener("keydown", (e) => {
    const click = (id) => {
      const b = document.getElementById(id);
      if (b && b.offsetParent !== null) { e.preventDefault(); b.click(); }
    };
    const typing = e.target && ["TEXTAREA", "INPUT"].includes(e.target.tagName);
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { click("save"); return; }
    if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
    if (keys[e.key]) click(keys[e.key]);
  });
}"""


def readable(path: str):
    """The image, enlarged by a whole factor when small, so a 64-pixel scene fills the panel."""
    try:
        image = load_image(path)
    except VlmkitError:
        return None
    factor = READABLE // max(image.size)
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), resample=0)
    return image


def build_app(review: Review):
    files = ImageFiles()  # each image a file written once: see vlmkit/ui/files.py

    def shown(path: str) -> str | None:
        image = readable(path)
        return None if image is None else files(image)

    def show(index: int, note: str = "") -> tuple:
        """The review tab's outputs for pair `index`: index, progress, image, prompt, reply box, verdict."""
        item = review.item(index)
        progress = review.progress()
        if item is None:
            done = "All pairs have a decision; go back with the left arrow to change one." if review.items else "No kept pairs to review."
            return index, progress, None, "", gr.update(value="", interactive=False), note or done
        r = item.record
        where = f"**{r['task']}** · {os.path.basename(r['image'])} · sample {r['sample']} · pair {index + 1} of {len(review.items)}"
        verdict = f"{note} · " if note else ""
        return (index, progress, shown(r["image"]), f"{where}\n\n**{r['prompt']}**",
                gr.update(value=item.text, interactive=True), f"{verdict}This pair: {item.verdict}")

    def show_pair(index: int) -> tuple:
        pair = review.pair(index)
        progress = review.pair_progress()
        if pair is None:
            note = "Every pair has been judged." if review.pairs else "No prompt has two different replies (distill with --samples 2 or more)."
            return index, progress, None, note, "", ""
        a, b = pair
        where = f"**{a['task']}** · {os.path.basename(a['image'])} · pair {index + 1} of {len(review.pairs)}"
        return index, progress, shown(a["image"]), f"{where}\n\n**{a['prompt']}**", review.text(a), review.text(b)

    def act(index, action, text=None):
        try:
            return show(review.act(int(index), action, text))
        except VlmkitError as e:
            return show(int(index), f"Not saved: {e}")
        except OSError as e:
            return show(int(index), f"Not saved: {first_line(e)}")

    def choose(index, better):
        return show_pair(review.choose(int(index), better))

    with gr.Blocks(title=f"vlmkit review: {review.out.name}") as demo:
        gr.Markdown(f"### vlmkit review · {review.out}")
        with gr.Tabs():
            with gr.Tab("Review", id="review"):
                index = gr.State(0)
                progress = gr.Markdown(elem_id="progress")
                with gr.Row():
                    image = gr.Image(label="Image", type="filepath", height=480, interactive=False, elem_id="image")
                    with gr.Column():
                        prompt = gr.Markdown(elem_id="prompt")
                        reply = gr.Textbox(label="Teacher's reply (edit, then Ctrl+Enter to save)", lines=8, elem_id="reply")
                        verdict = gr.Markdown(elem_id="verdict")
                        with gr.Row():
                            accept = gr.Button("Accept (a)", variant="primary", elem_id="accept")
                            save = gr.Button("Save edit (Ctrl+Enter)", elem_id="save")
                            reject = gr.Button("Reject (r)", variant="stop", elem_id="reject")
                        with gr.Row():
                            prev = gr.Button("← Previous", size="sm", elem_id="prev")
                            nxt = gr.Button("Next →", size="sm", elem_id="next")
            with gr.Tab("Pairwise", id="pairwise") as pairwise_tab:
                pair_index = gr.State(0)
                pair_progress = gr.Markdown(elem_id="pair-progress")
                gr.Markdown(f"Pick the better reply; each choice is a preference row in `{review.out / 'preferences.jsonl'}`.")
                with gr.Row():
                    pair_image = gr.Image(label="Image", type="filepath", height=400, interactive=False, elem_id="pair-image")
                    with gr.Column():
                        pair_prompt = gr.Markdown(elem_id="pair-prompt")
                        with gr.Row():
                            reply_a = gr.Textbox(label="Reply 1", lines=6, interactive=False, elem_id="reply-a")
                            reply_b = gr.Textbox(label="Reply 2", lines=6, interactive=False, elem_id="reply-b")
                        with gr.Row():
                            choose_a = gr.Button("1 is better (1)", elem_id="choose-a")
                            choose_b = gr.Button("2 is better (2)", elem_id="choose-b")
                            skip = gr.Button("Skip (0)", elem_id="skip-pair")

        out = [index, progress, image, prompt, reply, verdict]
        pair_out = [pair_index, pair_progress, pair_image, pair_prompt, reply_a, reply_b]
        one = {"concurrency_id": "save", "concurrency_limit": 1}  # actions are saved one after the other
        accept.click(lambda k: act(k, "accept"), [index], out, **one)
        reject.click(lambda k: act(k, "reject"), [index], out, **one)
        save.click(lambda k, text: act(k, "edit", text), [index, reply], out, **one)
        prev.click(lambda k: show(max(int(k) - 1, 0)), [index], out)
        nxt.click(lambda k: show(min(int(k) + 1, len(review.items))), [index], out)
        choose_a.click(lambda k: choose(k, "a"), [pair_index], pair_out, **one)
        choose_b.click(lambda k: choose(k, "b"), [pair_index], pair_out, **one)
        skip.click(lambda k: choose(k, "skip"), [pair_index], pair_out, **one)
        # the pairs show the replies as edited in the review tab
        pairwise_tab.select(lambda k: show_pair(int(k)), [pair_index], pair_out)
        # a page opened (or reloaded) starts at the first pair without a decision
        demo.load(lambda: show(review.first_open()), None, out)
        demo.load(lambda: show_pair(review.first_open_pair()), None, pair_out)
    return demo


def launch(folder: str, host: str = "127.0.0.1", port: int = 7861) -> None:
    review = Review(folder)  # a wrong folder fails before anything is served
    demo = build_app(review)
    print(f"{review.progress()}; {review.pair_progress()}", flush=True)
    try:
        demo.launch(server_name=host, server_port=port, ssr_mode=False, css=CSS, js=KEYS, show_error=False)
    except OSError as e:
        raise VlmkitError(f"could not serve on {host}:{port} ({first_line(e)}); pick another --port") from None

"""`vlmkit ui`: the Gradio page, wired to the handlers in `chat.py` and `compare.py`.

Nothing here decides anything: each event turns the widgets' values into a `Settings`, calls a handler
and shows the `Step`s it yields. Every generation (chat and compare, all browser sessions) shares one
queue slot, so one model never generates two replies at once on a CPU, and the seed stays reproducible.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from threading import Event

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere

from vlmkit.errors import VlmkitError, first_line  # noqa: E402

try:
    import gradio as gr  # module level: handlers' `gr.Request` annotations must resolve here
except ImportError:
    raise VlmkitError("the web UI needs gradio: pip install 'vlmkit[ui]' (or gradio)") from None
from vlmkit.model.families import CAPTION, OCR  # noqa: E402
from vlmkit.ui.backends import ApiBackend, LocalBackend, Settings  # noqa: E402
from vlmkit.ui.chat import Chat, Step, chatbot_messages, example_turn  # noqa: E402
from vlmkit.ui.compare import Compare, PreferenceFile  # noqa: E402
from vlmkit.ui.files import ImageFiles  # noqa: E402

EXAMPLES_DIR = Path(__file__).parent / "examples"
# (prompt, image): the shapes scene answers like the quickstart's data; the photos and the page are
# scikit-image's samples (chelsea, coffee, page), resized
EXAMPLES = [
    ("Describe the image.", "shapes.png"),
    ("What colour is the shape on the left?", "shapes.png"),
    (CAPTION, "cat.jpg"),
    ("What is in the cup?", "coffee.jpg"),
    (OCR, "page.png"),
]
NOT_LOCAL = "Not available: the model runs behind an API, whose server does the processing."
CSS = "#status, #compare-status {min-height: 1.5em} footer {display: none !important}"


def build_app(backend, backend_b=None, preferences: PreferenceFile | None = None, max_new_tokens: int = 256):
    """The Gradio Blocks page for a backend (and optionally a second one to compare against)."""
    chat = Chat(backend)
    files = ImageFiles()  # pictures as files written once: see files.py
    compare = Compare(backend, backend_b, preferences)
    stops: dict[str, Event] = {}  # one Stop flag per browser session

    def stop_of(request: gr.Request | None) -> Event:
        return stops.setdefault(getattr(request, "session_hash", None) or "", Event())

    def shown(step: Step) -> tuple:
        """A step as the chat tab's outputs: chatbot, turns, input box, status, the panel, raw reply."""
        keep = gr.update()
        box = keep if step.box is None else gr.update(value=step.box)
        if step.seen is None:
            panel = (keep, keep, keep)
        elif step.seen is False:
            panel = (NOT_LOCAL, [], "")
        else:
            panel = (step.seen.summary(), [(files(view), caption) for view, caption in step.seen.gallery()], step.seen.prompt)
        return (chatbot_messages(step.turns), step.turns, box, step.status, *panel, step.reply)

    def settings_or_step(turns, values) -> Settings | Step:
        try:
            return Settings.of(*values)
        except VlmkitError as e:
            return Step(turns, f"Not sent: {e}", done=True)

    def generate(turns, values, request, steps):
        """The chat tab's outputs for `steps(settings, stop)`, once the settings are good; the session's
        Stop flag is cleared first."""
        stop = stop_of(request)
        stop.clear()
        settings = settings_or_step(turns, values)
        if isinstance(settings, Step):
            yield shown(settings)
            return
        for step in steps(settings, stop):
            yield shown(step)

    def on_submit(turns, message, system, temperature, top_p, max_new, seed, request: gr.Request):
        yield from generate(turns, (system, temperature, top_p, max_new, seed), request,
                            lambda settings, stop: chat.submit(turns, message, settings, stop))

    def on_retry(turns, system, temperature, top_p, max_new, seed, request: gr.Request):
        yield from generate(turns, (system, temperature, top_p, max_new, seed), request,
                            lambda settings, stop: chat.retry(turns, settings, stop))

    def on_undo(turns, request: gr.Request):
        stop_of(request).set()  # a reply being generated belongs to the turn that goes
        return shown(Chat.undo(turns))

    def on_clear(request: gr.Request):
        stop_of(request).set()
        return (*shown(Chat.clear())[:4], "", [], "", "")  # the panel too

    def on_stop(request: gr.Request):
        stop_of(request).set()

    def on_compare(message, system, temperature, top_p, max_new, seed, request: gr.Request):
        stop = stop_of(request)
        stop.clear()
        try:
            settings = Settings.of(system, temperature, top_p, max_new, seed)
        except VlmkitError as e:
            yield "", "", f"Not sent: {e}", None
            return
        for step in compare.run(message, settings, stop):
            yield step.answer_a, step.answer_b, step.status, step.pending

    with gr.Blocks(title=f"vlmkit: {backend.name}") as demo:
        gr.Markdown(f"### vlmkit · {backend.name}")
        turns = gr.State([])
        pending = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    with gr.Column(scale=3):
                        chatbot = gr.Chatbot(elem_id="chat", height=460, label="Chat", feedback_options=None, buttons=["copy"])
                        box = gr.MultimodalTextbox(
                            elem_id="box", file_types=["image"], file_count="multiple", show_label=False,
                            placeholder="Ask about images: attach them with the clip (or drop them here), type, press Enter",
                        )
                        with gr.Row():
                            stop_btn = gr.Button("Stop", elem_id="stop", variant="stop", size="sm")
                            retry_btn = gr.Button("Retry", elem_id="retry", size="sm")
                            undo_btn = gr.Button("Undo", elem_id="undo", size="sm")
                            clear_btn = gr.Button("Clear", elem_id="clear", size="sm")
                        status = gr.Markdown(elem_id="status")
                        gr.Examples(
                            examples=[[example_turn(p, EXAMPLES_DIR / name)] for p, name in EXAMPLES],
                            inputs=[box], label="Examples (click, then press Enter)", elem_id="examples",
                        )
                    with gr.Column(scale=2):
                        gr.Markdown("#### What the model sees (last turn)")
                        seen_md = gr.Markdown("Send a message to see the prompt as the model receives it.", elem_id="seen")
                        gallery = gr.Gallery(elem_id="seen-images", label="Images as the processor made them", columns=3, height=220)
                        prompt = gr.Textbox(label="Prompt (each image marker becomes the image's tokens)", lines=6, max_lines=12, elem_id="seen-prompt", interactive=False)
                        raw = gr.Textbox(label="Last reply, exactly as generated", lines=3, elem_id="raw-reply", interactive=False)
            with gr.Tab("Compare", id="compare"):
                if backend_b is None:
                    gr.Markdown("Start `vlmkit ui --model A --model-b B` to compare two models on the same input.")
                where = f" Chosen pairs go to `{preferences.path}`." if preferences else ""
                gr.Markdown(f"Both models answer the same prompt and images; pick the better answer.{where}")
                compare_box = gr.MultimodalTextbox(
                    elem_id="compare-box", file_types=["image"], file_count="multiple", show_label=False,
                    placeholder="A prompt, with images, for both models; press Enter",
                )
                with gr.Row():
                    answer_a = gr.Textbox(label=f"A: {backend.name}", lines=8, elem_id="answer-a", interactive=False)
                    answer_b = gr.Textbox(label=f"B: {backend_b.name if backend_b else '(none)'}", lines=8, elem_id="answer-b", interactive=False)
                with gr.Row():
                    choose_a = gr.Button("A is better", elem_id="choose-a")
                    choose_b = gr.Button("B is better", elem_id="choose-b")
                    compare_stop = gr.Button("Stop", elem_id="compare-stop", variant="stop")
                compare_status = gr.Markdown(elem_id="compare-status")
        with gr.Accordion("Generation settings", open=False, elem_id="settings"):
            system = gr.Textbox(label="System prompt", lines=2, elem_id="system")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p", elem_id="top-p")
                max_new = gr.Slider(1, 2048, value=max_new_tokens, step=1, label="Max new tokens", elem_id="max-new-tokens")
                seed = gr.Number(value=0, precision=0, label="Seed (when sampling)", elem_id="seed")

        knobs = [system, temperature, top_p, max_new, seed]
        chat_out = [chatbot, turns, box, status, seen_md, gallery, prompt, raw]
        busy = {"concurrency_id": "generate", "concurrency_limit": 1}
        sent = box.submit(on_submit, [turns, box, *knobs], chat_out, **busy)
        again = retry_btn.click(on_retry, [turns, *knobs], chat_out, **busy)
        stop_btn.click(on_stop, None, None, queue=False)
        # during a generation, undo and clear cancel it first, so its next piece cannot bring the turn back
        undo_btn.click(on_undo, [turns], chat_out, cancels=[sent, again])
        clear_btn.click(on_clear, None, chat_out, cancels=[sent, again])
        compare_box.submit(on_compare, [compare_box, *knobs], [answer_a, answer_b, compare_status, pending], **busy)
        compare_stop.click(on_stop, None, None, queue=False)
        choose_a.click(lambda p: compare.choose(p, "a"), [pending], [compare_status, pending])
        choose_b.click(lambda p: compare.choose(p, "b"), [pending], [compare_status, pending])
    return demo


def launch(
    model: str | None = None,
    model_b: str | None = None,
    api_base: str | None = None,
    api_key: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    preferences: str | None = "preferences.jsonl",
    max_new_tokens: int = 256,
    decode: str = "auto",
) -> None:
    """Load the model(s), build the page and serve it until interrupted."""
    if not model and not api_base:
        raise VlmkitError("give --model M (a model folder or hub id) or --api-base URL (an OpenAI-compatible server)")
    prefs = PreferenceFile(preferences) if preferences else None  # a bad path fails before a model loads
    if api_base:
        backend = ApiBackend(api_base, api_key=api_key, model=model)
    else:
        print(f"loading {model}", file=sys.stderr)
        backend = LocalBackend.load(model, decode)
    backend_b = None
    if model_b:
        print(f"loading {model_b}", file=sys.stderr)
        backend_b = LocalBackend.load(model_b, decode)
    demo = build_app(backend, backend_b, prefs, max_new_tokens=max_new_tokens)
    try:
        demo.launch(
            server_name=host, server_port=port, share=share, ssr_mode=False, allowed_paths=[str(EXAMPLES_DIR)],
            css=CSS, show_error=False,
        )
    except OSError as e:
        raise VlmkitError(f"could not serve on {host}:{port} ({first_line(e)}); pick another --port") from None

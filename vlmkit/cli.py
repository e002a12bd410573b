"""The `vlmkit` command line: parse, call library functions, print.

Generated text goes to stdout; logs, progress bars and errors to stderr. A user's mistake (a
`VlmkitError`) prints one line and exits with status 2; anything else is a bug and shows a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vlmkit.errors import VlmkitError

EPILOG = "Docs and examples: README.md. Every command has --help."
DEFAULT_VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"  # for the task presets (caption, ask, ocr)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    from vlmkit.model.quantize import quiet_bitsandbytes

    quiet_bitsandbytes()

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_engine(model: str, decode: str = "auto"):
    from vlmkit.infer.load import load

    return load(model, decode=decode).engine


# -- commands ---------------------------------------------------------------------------------------
def cmd_quickstart(args) -> None:
    from vlmkit.device import resolve_device
    from vlmkit.quickstart import default_minutes, quickstart

    minutes = default_minutes(resolve_device().type) if args.minutes is None else args.minutes
    quickstart(args.output, minutes=minutes, overrides=args.overrides)


def cmd_train(args) -> None:
    from vlmkit.config import load_config

    fixed = {"data": args.data, "eval_data": args.eval_data, "output": args.output}
    if args.config and "=" in args.config and not os.path.isfile(args.config):
        # argparse hands the first positional to the optional CONFIG; `train lr=1e-4` means an override
        args.overrides.insert(0, args.config)
        args.config = None
    if args.resume and args.output and os.path.isfile(os.path.join(args.output, "config.yaml")) and not args.config:
        args.config = os.path.join(args.output, "config.yaml")  # resume with the run's own config
    cfg = load_config(args.config, args.overrides, **fixed)
    if "contrastive" in (cfg.objective, cfg.stage):
        if args.dry_run:
            raise VlmkitError("--dry-run plans generative training; it does not apply to contrastive training")
        from vlmkit.train.contrastive import train_contrastive
        from vlmkit.train.vlm_align import align_contrastive

        run = train_contrastive if cfg.objective == "contrastive" else align_contrastive
        print(json.dumps(run(cfg, resume=args.resume), indent=2))
        return
    if args.dry_run:
        from vlmkit.train.plan import plan_run

        print(plan_run(cfg))
        return
    from vlmkit.train.loop import train  # heavy (torch, transformers): after the config is known to be good

    summary = train(cfg, resume=args.resume)
    print(json.dumps(summary, indent=2))


def _conversation(args) -> tuple[list[dict], list[str]]:
    """Messages + image paths from --messages FILE or from --image/--prompt/--system."""
    if args.messages:
        from vlmkit.data.schema import parse_messages

        try:
            with open(args.messages) as f:
                obj = json.load(f)
        except FileNotFoundError:
            raise VlmkitError(f"--messages {args.messages}: file not found") from None
        except json.JSONDecodeError as e:
            raise VlmkitError(f"--messages {args.messages}: not valid JSON ({e})") from None
        messages, images = parse_messages(obj, os.path.dirname(os.path.abspath(args.messages)), where=args.messages)
        return messages, [str(p) for p in images]
    if args.prompt is None:
        raise VlmkitError("give --prompt TEXT (or --messages FILE, or --batch FILE)")
    messages = []
    if args.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": args.system}]})
    media: list = list(args.image)
    parts = [{"type": "image"} for _ in args.image]
    for video in args.video:
        from vlmkit.data.video import read_frames

        frames = read_frames(video, frames=args.frames, fps=args.fps)
        print(f"{video}: {len(frames)} frames at {', '.join(f.label for f in frames)}", file=sys.stderr)
        media.append(frames)
        parts.append({"type": "video"})
    messages.append({"role": "user", "content": parts + [{"type": "text", "text": args.prompt}]})
    return messages, media


def cmd_generate(args) -> None:
    conversation = None if args.batch else _conversation(args)  # a bad --messages file fails before the model loads
    engine = _load_engine(args.model, args.decode)
    opts = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.batch:
        from vlmkit.data.schema import load_samples, split_reference

        convs, images = [], []
        for sample in load_samples(args.batch, require_assistant=False):
            messages = sample.messages
            if messages[-1]["role"] == "assistant":
                messages, _, n = split_reference(sample)
            else:
                n = sample.n_images
            convs.append(messages)
            images.append([str(p) for p in sample.images[:n]])
        for reply in engine.generate(convs, images, batch_size=args.batch_size, progress=True, **opts):
            print(json.dumps({"prediction": reply}))
        return
    messages, images = conversation
    for piece in engine.stream(messages, images, **opts):
        print(piece, end="", flush=True)
    print()


def _run_task(args, key: str, prompt_of, extra: dict | None = None) -> None:
    """caption / ask / ocr: one image and no --output prints the reply; otherwise JSON lines.
    `prompt_of(family)` is the preset prompt, used unless --prompt overrides it."""
    from vlmkit.data.messages import user_turn
    from vlmkit.infer.load import load
    from vlmkit.infer.tasks import collect_images, run_images

    images = collect_images(args.images)  # a bad path fails before the model loads
    vlm = load(args.model, decode=args.decode)
    prompt = args.prompt or prompt_of(vlm.family)
    gen = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if len(images) == 1 and not args.output and not os.path.isdir(args.images[0]):
        print(vlm.generate(user_turn(prompt), [images[0]], **gen))
        return
    summary = run_images(vlm, images, prompt, key, args.output, batch_size=args.batch_size, extra=extra, **gen)
    print(summary.text(args.output), file=sys.stderr)


def cmd_caption(args) -> None:
    _run_task(args, "caption", lambda family: family.caption_prompt)


def cmd_ask(args) -> None:
    args.images = [args.image]
    _run_task(args, "answer", lambda family: family.ask_prompt.format(question=args.question), {"question": args.question})


def cmd_ocr(args) -> None:
    _run_task(args, "text", lambda family: family.ocr_prompt)


def cmd_chat(args) -> None:
    from vlmkit.infer.chat import chat_loop

    chat_loop(_load_engine(args.model, args.decode), system=args.system, max_new_tokens=args.max_new_tokens)


def cmd_ui(args) -> None:
    from vlmkit.ui.app import launch

    launch(
        model=args.model, model_b=args.model_b, api_base=args.api_base, api_key=args.api_key, host=args.host,
        port=args.port, share=args.share, preferences=args.preferences, max_new_tokens=args.max_new_tokens,
        decode=args.decode,
    )


def cmd_distill(args) -> None:
    from vlmkit.distill.filters import Filters
    from vlmkit.distill.report import summary_text
    from vlmkit.distill.run import Plan, distill, read_questions
    from vlmkit.distill.teachers import ApiTeacher, LocalTeacher, Sampling
    from vlmkit.infer.tasks import collect_images

    if bool(args.teacher) == bool(args.teacher_api):
        raise VlmkitError("give --teacher MODEL (a model folder or hub id) or --teacher-api URL, one of them")
    images = [Path(os.path.abspath(p)) for p in collect_images(args.images)]  # bad paths fail before a model loads
    questions = read_questions(args.questions, images) if args.questions else {}
    plan = Plan(tuple(t.strip() for t in args.tasks.split(",") if t.strip()), questions, args.questions,
                args.propose, args.samples, args.temperature)
    filters = Filters.of(args.min_words, args.max_words, args.min_agreement)
    if args.min_similarity is not None and not args.scorer:
        raise VlmkitError(f"--min-similarity {args.min_similarity}: give --scorer R too (a dual encoder run or model folder)")
    scorer = None
    if args.scorer:  # before the teacher: a wrong folder fails fast
        from vlmkit.distill.scorer import MIN_SIMILARITY, Scorer

        scorer = Scorer(args.scorer, MIN_SIMILARITY if args.min_similarity is None else args.min_similarity)
    sampling = Sampling(args.max_new_tokens, args.top_p)
    if args.teacher_api:
        teacher = ApiTeacher(args.teacher_api, args.teacher_model, args.teacher_key_env, sampling, args.batch_size)
    else:
        teacher = LocalTeacher.load(args.teacher, sampling, args.batch_size, args.decode)
    result = distill(teacher, images, args.output, plan, filters, images_per_batch=args.batch_size, seed=args.seed,
                     scorer=scorer)
    summary = json.loads((Path(args.output) / "summary.json").read_text())
    print(f"{result.done} images done now, {result.skipped} already done, {len(result.unreadable)} unreadable", file=sys.stderr)
    print(summary_text(summary, Path(args.output)))


def cmd_review(args) -> None:
    from vlmkit.distill.review_app import launch

    launch(args.folder, host=args.host, port=args.port)


def cmd_eval(args) -> None:
    if args.task in ("retrieval", "zeroshot"):
        _eval_dual_encoder(args)
        return
    from vlmkit.eval.run import evaluate, predictions_path

    engine = None if args.predictions else _load_engine(args.model, args.decode) if args.model else None
    report = evaluate(
        args.data, args.output, engine=engine, predictions=args.predictions,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "by_type"}, indent=2))
    print(f"report: {args.output}  predictions: {predictions_path(Path(args.output))}", file=sys.stderr)


def _eval_dual_encoder(args) -> None:
    from vlmkit.retrieval import evaluate_retrieval, evaluate_zeroshot

    if not args.model:
        raise VlmkitError(f"--task {args.task} needs --model (a dual encoder trained with objective=contrastive)")
    if args.task == "retrieval":
        report = evaluate_retrieval(args.model, args.data, args.output, match_captions=args.match_captions,
                                    batch_size=args.batch_size)
    else:
        if not args.classes:
            raise VlmkitError('--task zeroshot needs --classes "zero,one,..." (or a file of class names, one a line)')
        report = evaluate_zeroshot(args.model, args.data, args.classes, args.templates or ("a photo of a {}.",),
                                   args.output, batch_size=args.batch_size)
        report = {k: v for k, v in report.items() if k != "per_class"}
    print(json.dumps(report, indent=2))
    print(f"report: {args.output}", file=sys.stderr)


def cmd_index(args) -> None:
    from vlmkit.retrieval import build_index

    meta = build_index(args.model, args.output, images=args.images, data=args.data, batch_size=args.batch_size)
    print(json.dumps(meta, indent=2))
    if meta["skipped"]:
        print(f"{meta['skipped']} unreadable image(s) skipped, listed in {Path(args.output) / 'skipped.jsonl'}", file=sys.stderr)


def cmd_search(args) -> None:
    from vlmkit.retrieval import search

    hits = search(args.index, text=args.text, image=args.image, k=args.k, model=args.model)
    if args.json:
        print(json.dumps(hits, indent=2))
        return
    for hit in hits:
        print(f"{hit['rank']:>3}  {hit['score']:.4f}  {hit['path']}")


def cmd_data_check(args) -> None:
    from vlmkit.build import sample_renderer
    from vlmkit.data.check import check

    ok = check(args.file, renderer=None if args.no_sample else (lambda: sample_renderer(args.model)))
    if not ok:
        raise SystemExit(1)


def cmd_data_shapes(args) -> None:
    from vlmkit.data.shapes import make_shapes_dataset

    path = make_shapes_dataset(
        args.output, args.split, args.n, args.seed, questions_per_image=args.questions, question_first=args.question_first
    )
    print(path)


def cmd_inspect(args) -> None:
    from vlmkit.inspect import inspect_model

    print(inspect_model(args.model, image=args.image, prompt=args.prompt))


def cmd_merge(args) -> None:
    from vlmkit.model.adapter import merge_to_folder

    print(merge_to_folder(args.adapter, args.out))


def cmd_serve(args) -> None:
    from vlmkit.serve.api import Settings
    from vlmkit.serve.server import serve

    for flag, value in (("--max-images", args.max_images), ("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            raise VlmkitError(f"{flag} must be at least 1, not {value}")
    if args.max_body_mb <= 0:
        raise VlmkitError(f"--max-body-mb must be positive, not {args.max_body_mb}")
    if args.media_root and not os.path.isdir(args.media_root):
        raise VlmkitError(f"--media-root {args.media_root}: not a folder")
    settings = Settings(
        api_key=args.api_key or os.environ.get("VLMKIT_API_KEY") or None, allow_media_url=args.allow_media_url,
        media_root=args.media_root, max_images=args.max_images, max_body_mb=args.max_body_mb,
        max_batch=args.max_batch, max_queue=args.max_queue, batch_wait_ms=args.batch_wait_ms,
        log_requests=args.log_requests,
    )
    if args.threads is not None and args.threads < 1:
        raise VlmkitError(f"--threads {args.threads}: give 1 or more (default: every CPU core but one)")
    serve(args.model, settings, host=args.host, port=args.port, decode=args.decode, threads=args.threads)


def cmd_export(args) -> None:
    from vlmkit.export import export_llava

    print(export_llava(args.model, args.out))


# -- parser -----------------------------------------------------------------------------------------
def _add_sampling(p, max_new_tokens: int = 64) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"most tokens to generate (default {max_new_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")


DECODE = ("auto", "transformers", "fp32", "bf16", "int8", "int4")  # vlmkit.infer.engine.DECODE_CHOICES (tests check)


def _add_decode(p) -> None:
    p.add_argument("--decode", choices=DECODE, default="auto",
                   help="how replies are decoded: auto (default: on CPU vlmkit's decoder, int8 weights where the CPU "
                   "has bf16 units, else fp32; on GPU transformers' generate), transformers, or vlmkit's decoder in "
                   "fp32 (token for token transformers'), bf16, int8 or int4. Figures: docs/decode.md")


def _add_page_address(p, port: int) -> None:
    """--host and --port of a local web page (the UI, the review page)."""
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=port, help=f"port to serve on (default {port})")


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "yes", "1", "on"):
        return True
    if value in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: give true or false")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmkit", description="Build, train, evaluate and run vision-language models.", epilog=EPILOG
    )
    from vlmkit import __version__

    parser.add_argument("--version", action="version", version=f"vlmkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="make a dataset, train a small VLM from real parts, evaluate it",
                       description="Generate the built-in shapes dataset, evaluate the untrained model, train it "
                       "(EfficientNet-Lite0 + SmolLM2-135M, offline), evaluate again and save everything.")
    p.add_argument("--output", default="runs/quickstart", help="run folder (default runs/quickstart)")
    p.add_argument("--minutes", type=float, default=None,
                   help="train for about this many minutes on this machine (max_minutes: the steps are fixed by "
                   "timing a few; default: 10 on CPU, on a GPU the recipe's steps); 0: the recipe's own "
                   "steps (six epochs, 3,000 steps of 4: about 22 minutes on 2 CPU cores). Measured results: "
                   "docs/generality.md")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training config overrides, as for `vlmkit train`")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("train", help="train or fine-tune a VLM on a JSONL dataset",
                       description="Train a VLM. Config keys come from CONFIG.yaml and/or key=value arguments "
                       "(e.g. vision=./my_clip llm=./my_lm stage=align max_steps=100 lr=1e-4); every key and its default: "
                       "docs/config.md. Keys you leave unset follow the default recipe, chosen from the parts, the "
                       "device and the data's size (LoRA on the LM's attention beside a new projector, batch 4 on CPU, "
                       "3x3 image tokens, at least 4,000 steps and one epoch, at most six epochs...); the log, config.yaml and "
                       "train_summary.json say what was chosen and why. max_minutes=N trains for about N minutes. "
                       "objective=contrastive trains a dual encoder for retrieval instead (loss=clip|siglip, text=...; "
                       "docs/retrieval.md).")
    p.add_argument("config", nargs="?", default=None, help="optional YAML config file")
    p.add_argument("--data", help="training data (JSONL chat format or LLaVA JSON)")
    p.add_argument("--eval-data", help="held-out data for eval loss")
    p.add_argument("--output", help="run folder (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="load the model, print parameter counts and a peak-memory "
                   "estimate for this method, batch and max_length, and the recipe's choices, and stop (nothing is written)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="answer a prompt about images (text to stdout)")
    p.add_argument("--model", required=True, help="model folder (from train/quickstart) or hub id")
    p.add_argument("--image", action="append", default=[], help="an image; repeat for several images in one prompt")
    p.add_argument("--prompt", help="the user's message")
    p.add_argument("--system", help="a system message")
    p.add_argument("--messages", help="a JSON file holding a whole conversation (list of messages)")
    p.add_argument("--batch", help="a JSONL dataset: one reply per line, as JSON, to stdout")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--video", action="append", default=[], help="a video (mp4/webm/avi/mkv); keyframes go into the prompt")
    p.add_argument("--frames", type=int, default=None, help="keyframes to sample evenly from each video (default 8)")
    p.add_argument("--fps", type=float, default=None, help="sample keyframes at this rate instead of --frames")
    _add_sampling(p)
    _add_decode(p)
    p.set_defaults(func=cmd_generate)

    presets = (
        ("caption", cmd_caption, "describe images (one, several, or whole folders)", 96),
        ("ocr", cmd_ocr, "read all the text in images, keeping line breaks", 512),
        ("ask", cmd_ask, "answer a question about an image (or every image in a folder)", 64),
    )
    for name, func, text, max_new in presets:
        p = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}. One image prints the reply; "
                           "several images or --output write JSON lines, appended as each batch finishes, and a re-run "
                           "with the same --output resumes where it stopped. Unreadable images are skipped and listed.")
        if name == "ask":
            p.add_argument("image", help="an image file or a folder of images")
            p.add_argument("question")
        else:
            p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
        p.add_argument("--model", default=DEFAULT_VLM, help=f"model folder or hub id (default {DEFAULT_VLM})")
        p.add_argument("--prompt", help="replace the preset prompt of the model's family")
        p.add_argument("--output", help="JSONL file to append results to (resumable); default: stdout")
        p.add_argument("--batch-size", type=int, default=8, help="images per generation batch (default 8)")
        _add_sampling(p, max_new)
        _add_decode(p)
        p.set_defaults(func=func)

    p = sub.add_parser("chat", help="interactive multi-turn chat; /image PATH adds an image")
    p.add_argument("--model", required=True)
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    _add_decode(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ui", help="chat with a model in the browser: images, settings, what the model sees, compare two",
                       description="Serve a web page (Gradio) to chat with a model: text and images in any turn, "
                       "streamed replies, what the model receives for the last turn, and a tab comparing two models "
                       "whose chosen answers are appended to a DPO preference file. Docs: docs/ui.md.")
    p.add_argument("--model", help="model folder or hub id (with --api-base: the model's name at the server)")
    p.add_argument("--model-b", help="a second model for the compare tab (e.g. a base model and its LoRA run)")
    p.add_argument("--api-base", help="chat with an OpenAI-compatible server instead, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", help="the server's API key (default: $OPENAI_API_KEY, or none)")
    _add_page_address(p, 7860)
    p.add_argument("--share", nargs="?", const=True, default=False, type=_yes_no, metavar="true|false",
                   help="also open a public gradio.live link (default false)")
    p.add_argument("--preferences", default="preferences.jsonl",
                   help="JSONL file the compare tab appends chosen pairs to, images beside it (default preferences.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the settings panel's starting value (default 256)")
    _add_decode(p)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("distill", help="label a folder of images with a teacher VLM: filtered SFT data, resumable",
                       description="A teacher (a model folder, LoRA run or hub id, or an OpenAI-compatible API) captions, "
                       "answers and reads each image; every reply goes through the automatic filters (empty, length, "
                       "refusal, repetition, non-text, self-consistency, duplicates; image-text similarity with --scorer) and into "
                       "OUT/manifest.jsonl; the kept "
                       "ones make OUT/data.jsonl for `vlmkit train`. A re-run resumes; unreadable images are listed and "
                       "skipped. Then `vlmkit review OUT`. Docs: docs/distill.md.")
    p.add_argument("--teacher", help="teacher model: a vlmkit run, a LoRA run, a transformers VLM folder or hub id")
    p.add_argument("--teacher-api", metavar="URL", help="or an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--teacher-model", help="the model's name at --teacher-api (default: the first it lists)")
    p.add_argument("--teacher-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key (default OPENAI_API_KEY; none needed if unset)")
    p.add_argument("--images", nargs="+", required=True, help="image files and/or folders (searched recursively)")
    p.add_argument("--tasks", default="caption", help="comma-separated: caption, qa, ocr (default caption)")
    p.add_argument("--questions", metavar="FILE", help="questions for qa: a .txt file (one a line, for every image) or "
                   "JSONL of {\"question\"} and {\"image\", \"question\"}; without it the teacher proposes --propose questions")
    p.add_argument("--propose", type=int, default=3, help="questions the teacher proposes per image for qa (default 3)")
    p.add_argument("--samples", type=int, default=1, help="replies per prompt, sampled (needs --temperature > 0); for qa "
                   "the majority answer is kept (self-consistency)")
    p.add_argument("--output", required=True, help="folder for manifest.jsonl, data.jsonl, summary.json, sheet.html")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch (and concurrent API requests; default 8)")
    p.add_argument("--min-words", type=int, default=None, help="drop shorter replies (default: 3 for captions, 1 otherwise)")
    p.add_argument("--max-words", type=int, default=None, help="drop longer replies (default: 1000 for ocr, 300 otherwise)")
    p.add_argument("--min-agreement", type=float, default=0.5,
                   help="self-consistency: the majority answer's share must be above this (default 0.5)")
    p.add_argument("--scorer", metavar="R", help="a dual encoder (run or model folder of `vlmkit train "
                   "objective=contrastive`): record each reply's image-text similarity and drop those below --min-similarity")
    p.add_argument("--min-similarity", type=float, default=None, metavar="S",
                   help="with --scorer: the cosine similarity a reply needs (default 0.2; what suits depends on the "
                   "encoder: look at the similarities in manifest.jsonl)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed and the contact sheet's sample (default 0)")
    _add_sampling(p, 128)
    _add_decode(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("review", help="review a distilled folder in the browser: accept, edit, reject, pick the better reply",
                       description="Serve a local page (Gradio) showing each kept pair of `vlmkit distill OUT`: accept (a), "
                       "reject (r), edit and save (Ctrl+Enter); a pairwise tab picks the better of two replies (1 / 2, "
                       "0 skips) into OUT/preferences.jsonl for method=dpo. Every action is saved at once to "
                       "OUT/reviews.jsonl and OUT/data.jsonl is rewritten: stop it any time and start it again.")
    p.add_argument("folder", help="the --output folder of vlmkit distill")
    _add_page_address(p, 7861)
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("eval", help="score a model (or predictions) on a dataset; writes a JSON report",
                       description="Score a VLM's replies (--task generate), or a dual encoder's retrieval "
                       "(--task retrieval) or zero-shot classification (--task zeroshot), on a dataset.")
    p.add_argument("--model", help="model folder or hub id")
    p.add_argument("--data", required=True, help="test data; the last assistant turn of each sample is the reference")
    p.add_argument("--output", default="eval.json", help="report path (default eval.json); predictions go beside it")
    p.add_argument("--predictions", help="score this JSONL of {\"prediction\": ...} lines instead of running a model")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=32)
    _add_decode(p)
    p.add_argument("--task", choices=("generate", "retrieval", "zeroshot"), default="generate",
                   help="generate (default): a VLM's replies scored against the references; retrieval: a dual "
                   "encoder's R@1/5/10 and ranks, text->image and image->text; zeroshot: its classification accuracy")
    p.add_argument("--match-captions", action="store_true",
                   help="retrieval: a caption also finds every image that has the same caption")
    p.add_argument("--classes", help='zeroshot: class names, "zero,one,..." or a file with one a line')
    p.add_argument("--templates", help='zeroshot: caption templates separated by |, "a photo of a {}." (default), '
                   'or a file with one a line')
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("index", help="embed a folder of images with a dual encoder into a search index",
                       description="Embed every image of --images DIR (recursively) or of --data FILE.jsonl with a dual "
                       "encoder (`vlmkit train objective=contrastive`) into the index folder --output: embeddings.npy, "
                       "paths.jsonl, skipped.jsonl (unreadable images, listed and skipped), index.json. A build that "
                       "stops resumes when run again with the same arguments. Format: docs/retrieval.md.")
    p.add_argument("--model", required=True, help="the dual encoder (a run folder or its model/ folder)")
    p.add_argument("--images", help="a folder of images, searched recursively")
    p.add_argument("--data", help="a caption data file (JSONL); its images are indexed")
    p.add_argument("--output", required=True, help="the index folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="find the images of an index nearest a text or an image",
                       description="Rank the images of an index (`vlmkit index`) by cosine similarity to --text or "
                       "--image; prints rank, score and path (JSON with --json).")
    p.add_argument("--index", required=True, help="the index folder")
    p.add_argument("--text", help="a description to search for")
    p.add_argument("--image", help="an image to find similar ones to")
    p.add_argument("-k", type=int, default=5, help="how many results (default 5)")
    p.add_argument("--model", help="the dual encoder (default: the one that built the index)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("data", help="dataset tools: check, shapes")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    q = dsub.add_parser("check", help="validate every row and image; show one rendered sample")
    q.add_argument("file")
    q.add_argument("--model", help="render with this model's processor (default: the quickstart parts' tokenizer)")
    q.add_argument("--no-sample", action="store_true", help="skip rendering a sample")
    q.set_defaults(func=cmd_data_check)
    q = dsub.add_parser("shapes", help="write the built-in synthetic shapes dataset")
    q.add_argument("--output", default="data/shapes")
    q.add_argument("--split", default="train")
    q.add_argument("--n", type=int, default=1000, help="number of images")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--questions", type=int, default=1, help="questions per image (multi-turn)")
    q.add_argument("--question-first", action="store_true",
                   help="put the first question before the image (by default, as in the quickstart, the image comes first)")
    q.set_defaults(func=cmd_data_shapes)

    p = sub.add_parser("inspect", help="components, parameter counts, image -> tokens, chat template")
    p.add_argument("model")
    p.add_argument("--image", help="show how this image becomes tokens")
    p.add_argument("--prompt", default="What is in the image?")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="merge a LoRA run's adapter into its base: a standalone transformers model",
                       description="Load the base model of a `vlmkit train model=... method=lora` run, merge the adapter "
                       "into it and save a complete model (weights, config, processor, chat template, generation config) "
                       "that plain transformers loads without peft.")
    p.add_argument("adapter", help="the run folder (or its model/ adapter folder)")
    p.add_argument("out", help="folder to write the merged model to")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (chat completions)",
                       description="Serve a model (a vlmkit run, a LoRA run, a pretrained VLM folder or hub id) over "
                       "OpenAI's chat-completions API: POST /v1/chat/completions (streaming too), GET /v1/models, "
                       "GET /health. Concurrent requests are decoded together in batches. Images come as data: URLs; "
                       "http(s) URLs and local files only when allowed below. Limits and design: docs/serve.md.")
    p.add_argument("--model", required=True, help="model folder (from train/quickstart), LoRA run, or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $VLMKIT_API_KEY; none if unset)")
    p.add_argument("--allow-media-url", action="store_true",
                   help="fetch http(s) image URLs (off by default); public addresses only, never loopback, private "
                   "or link-local ones, with a size cap and a 10 s timeout")
    p.add_argument("--media-root", metavar="DIR", help="allow local image paths and file:// URLs, inside DIR only")
    p.add_argument("--max-images", type=int, default=8, help="images per request (default 8)")
    p.add_argument("--max-body-mb", type=float, default=32.0,
                   help="largest request body, and largest image fetched or read, in MB (default 32)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together (a request with n choices counts n; default 16)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for the model; beyond it a 503 with Retry-After (default 64)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long to wait for more requests before starting a batch that is not full (default 20)")
    p.add_argument("--log-requests", action="store_true",
                   help="log each request's messages and replies (off by default: only ids, token counts and times)")
    p.add_argument("--threads", type=int, help="torch threads for the model (default: every CPU core but one, at least 1; "
                   "the event loop needs the other)")
    _add_decode(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="write a standard transformers Llava checkpoint (CLIP/SigLIP towers)")
    p.add_argument("model")
    p.add_argument("out")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except VlmkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

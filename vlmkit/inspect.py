"""`vlmkit inspect`: what a model folder holds and how an image and a prompt become tokens.

A plain-text report: the three parts (vision tower, projector, language model) with their parameter
counts, the image path through them with real tensor shapes (a blank image, or the user's own), the
prompt as the model sees it, and the chat template. Everything is measured by running the processor
and the modules, not recomputed from configs, so the report cannot drift from what the code does.
"""

from __future__ import annotations

import torch
from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.data.messages import user_turn
from vlmkit.data.processor import IMAGE_TOKEN
from vlmkit.model.projector import grid_side

DEFAULT_PROMPT = "What is in the image?"
FIRST_TOKENS = 24


def inspect_model(path: str, image: str | None = None, prompt: str = DEFAULT_PROMPT) -> str:
    """A readable report on the model folder at `path`; `image` is run through the processor and tower."""
    from vlmkit.infer.load import load

    picture = load_image(image) if image is not None else None  # a bad image fails before the model loads
    vlm = load(path, device="cpu")
    if vlm.family.name != "vlmkit":
        return inspect_pretrained(vlm, path, picture, prompt)
    model, processor = vlm.model, vlm.processor
    config = model.config
    lines: list[str] = [f"model: {path}", ""]

    lines += ["components"]
    lines += [f"  vision tower  {_tower_name(config.vision)}  (feature size {model.vision_tower.hidden_size})"]
    shuffle = f", pixel shuffle x{config.pixel_shuffle_factor}" if config.projector == "pixel_shuffle" else ""
    lines += [f"  projector     {config.projector}{shuffle}  ({_first_in(model.projector)} -> {config.text_config.hidden_size})"]
    text = config.text_config
    arch = ", ".join(getattr(text, "architectures", None) or [type(model.language_model).__name__])
    lines += [
        f"  language      {arch} ({text.model_type}): {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
        f"vocab {text.vocab_size}"
    ]

    _as_trained_by_default(model)
    lines += ["", "parameters (trainable: what `vlmkit train` trains by default, stage=sft, LoRA r16 on the LM's attention + the projector)"]
    lines += [f"  {'part':<14}{'total':>14}{'trainable':>14}"]
    for name, module in (("vision tower", model.vision_tower), ("projector", model.projector), ("language", model.language_model)):
        lines += [_param_row(name, module)]
    lines += [_param_row("all", model)]  # shared (tied) weights counted once

    lines += ["", "image -> tokens" + (f" ({image})" if picture is not None else " (a blank image)")]
    lines += _image_path(model, processor, picture)

    lines += ["", "prompt -> tokens (one image and the prompt, ready for the reply)"]
    lines += _prompt_path(processor, prompt)

    lines += ["", "chat template (newlines shown as \\n)", "  " + processor.chat_template.replace("\n", "\\n")]
    return "\n".join(lines)


def _as_trained_by_default(model) -> None:
    """Mark parameters trainable as the default training run would: the projector in full and LoRA
    adapters on the LM (added to `model`), the tower frozen."""
    from vlmkit.config import TrainConfig
    from vlmkit.recipe import resolve
    from vlmkit.train.stages import set_trainable

    set_trainable(model, resolve(TrainConfig(), "cpu")[0])


def _tower_name(spec: dict) -> str:
    kind = spec["kind"]
    if kind == "hf":
        cfg = spec["config"]
        source = cfg.get("_name_or_path") or "?"
        return f"hf {cfg.get('model_type', '?')} from {source}, features of layer {spec.get('feature_layer', -2)}"
    if kind == "timm":
        return f"timm {spec['name']}"
    if kind == "efficientnet_lite0":
        from vlmkit.model.vision import EfficientNetTower

        layer = EfficientNetTower.feature_layer(spec)
        return f"{kind}, features of its " + {-1: "head", -2: "last block"}.get(layer, f"block {-layer - 1} from the end")
    return kind


def _first_in(module: torch.nn.Module) -> int:
    linear = next(m for m in module.modules() if isinstance(m, torch.nn.Linear))
    return linear.in_features


def _param_row(name: str, module) -> str:
    """The module's own parameters (LoRA adapters left out) and the trainable ones (adapters included)."""
    named = list(module.named_parameters())
    total = sum(p.numel() for n, p in named if "lora_" not in n)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    return f"  {name:<14}{total:>14,}{trainable:>14,}"


@torch.inference_mode()
def _image_path(model, processor, picture: Image.Image | None) -> list[str]:
    ip = processor.image_processor
    steps = f"resize to {_size_text(getattr(ip, 'size', None))}"
    if getattr(ip, "do_center_crop", False):
        steps += f", centre crop {_size_text(getattr(ip, 'crop_size', None))}"
    lines = [f"  image processor  {type(ip).__name__}: {steps}"]
    if picture is not None:
        lines += [f"  image            {picture.width}x{picture.height} {picture.mode}"]
    blank = Image.new("RGB", (256, 256), (128, 128, 128))
    pixels = processor.pixel_values([picture or blank])  # (1, 3, H, W)
    grid = model.vision_tower(pixels.to(model.dtype_of(model.vision_tower)))  # (1, h, w, D)
    pooled = model.encode_images(pixels)  # (1, g, g, D)
    embeds = model.project(pooled)  # (1, image_tokens, H)
    g = grid_side(model.config.image_tokens)
    lines += [
        f"  pixel values     {_shape(pixels)}",
        f"  tower grid       {_shape(grid)}  ({grid.shape[1]}x{grid.shape[2]} cells of {grid.shape[3]})",
        f"  pooled grid      {_shape(pooled)}",
        f"  projected        {_shape(embeds)}  ({g}x{g} = {embeds.shape[1]} tokens per image, "
        f"processor inserts {processor.image_seq_len})",
    ]
    if getattr(processor, "column_words", None):
        lines += [f"  layout           column by column, each after its word: {', '.join(map(repr, processor.column_words))}"]
    if picture is not None:
        lines += [f"  embedding stats  mean {embeds.mean().item():.4f}, std {embeds.std().item():.4f}"]
    return lines


def _prompt_path(processor, prompt: str) -> list[str]:
    messages = user_turn(prompt)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids, _ = processor.render(messages, add_generation_prompt=True)
    # the two paths (the template for generation, `render` for training) must give the same tokens
    via_template = processor.tokenizer(processor.expand_image_tokens(text), add_special_tokens=False)["input_ids"]
    n = processor.image_seq_len
    shown = text.replace(IMAGE_TOKEN, f"<image x{n}>")
    lines = ["  " + line for line in shown.splitlines()]
    lines += [
        f"  {len(ids)} tokens, {n} of them image tokens; template and render "
        + ("agree" if list(via_template) == ids else f"DISAGREE ({len(via_template)} tokens from the template)")
    ]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids[:FIRST_TOKENS + n])
    collapsed: list[str] = []  # each run of image tokens as one <image xK>
    run = 0
    for k, token in enumerate(tokens):
        run = run + 1 if token == IMAGE_TOKEN else 0
        if token == IMAGE_TOKEN and k + 1 < len(tokens) and tokens[k + 1] == IMAGE_TOKEN:
            continue
        collapsed.append(f"<image x{run}>" if token == IMAGE_TOKEN else repr(token))
    lines += ["  first tokens: " + " ".join(collapsed[:FIRST_TOKENS])]
    return lines


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(d) for d in t.shape) + ")"


def _size_text(size) -> str:
    if size is None:
        return "?"
    if not isinstance(size, dict):
        size = dict(size.__dict__) if hasattr(size, "__dict__") else {"size": size}
    size = {k: v for k, v in size.items() if v is not None}
    if "height" in size and "width" in size:
        return f"{size['width']}x{size['height']}"
    return ", ".join(f"{k} {v}" for k, v in size.items())


# -- pretrained transformers VLMs -------------------------------------------------------------------
# report label -> part name in vlmkit.model.parts, which knows where each family keeps it
PART_LABELS = {"vision tower": "vision", "projector": "projector", "language": "language"}


def inspect_pretrained(vlm, path: str, picture: Image.Image | None, prompt: str) -> str:
    """The same report for a pretrained transformers VLM, measured through its own processor."""
    model, processor, engine = vlm.model, vlm.processor, vlm.engine
    config = model.config
    lines = [f"model: {path}", f"family: {vlm.family.name} ({config.model_type}, {type(model).__name__})", ""]

    _as_trained_by_default(model)
    lines += ["components and parameters (trainable: what `vlmkit train model=...` trains by default: LoRA r16 on the LM's attention + the projector)"]
    lines += [f"  {'part':<14}{'total':>14}{'trainable':>14}  module"]
    from vlmkit.model.parts import find_part

    for part, key in PART_LABELS.items():
        found = find_part(model, key)
        if found is None:
            lines += [f"  {part:<14}{'-':>14}{'-':>14}  (not a separate module)"]
            continue
        name, module = found
        lines += [_param_row(part, module) + f"  {name} ({type(module).__name__})"]
    lines += [_param_row("all", model)]

    messages = user_turn(prompt)
    blank = Image.new("RGB", (256, 256), (128, 128, 128))
    shown = picture or blank
    inputs = engine.inputs([messages], [[shown]])
    ids = inputs["input_ids"][0].tolist()
    image_token_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    n_image = sum(1 for i in ids if i == image_token_id)
    lines += ["", "image -> tokens" + (" (your image)" if picture is not None else " (a blank 256x256 image)")]
    lines += [f"  image processor  {type(processor.image_processor).__name__}"]
    lines += [f"  image            {shown.width}x{shown.height} {shown.mode}"]
    for key, value in inputs.items():
        if key not in ("input_ids", "attention_mask") and torch.is_tensor(value):
            lines += [f"  {key:<16} {_shape(value)}"]
    lines += [f"  image tokens     {n_image} in the prompt (token id {image_token_id})"]

    lines += ["", "prompt -> tokens (one image and the prompt, ready for the reply)"]
    text = engine.prompt(engine.prepare(messages, [shown])[0])
    lines += ["  " + line for line in text.splitlines()]
    lines += [f"  {len(ids)} tokens, {n_image} of them image tokens"]
    template = getattr(processor, "chat_template", None)
    lines += ["", "chat template (newlines shown as \\n)"]
    lines += ["  " + template.replace("\n", "\\n") if template else "  (none: the prompt is plain text)"]
    return "\n".join(lines)

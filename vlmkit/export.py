"""Export a composed vlmkit model as a standard transformers Llava checkpoint.

A vlmkit model is exactly a `LlavaForConditionalGeneration` when its parts are Llava's: a CLIP or SigLIP
tower read at `feature_layer`, every patch token kept (no pooling, so `image_tokens` == patches), and an
`mlp` projector (Linear -> exact GELU -> Linear, Llava's `projector_hidden_act="gelu"`) or a `linear` one
(written as Linear -> identity -> identity matrix, `projector_hidden_act="linear"`, which is exact). The
exported folder loads with plain transformers (`AutoModelForImageTextToText`, `AutoProcessor`), gives the
same logits and the same greedy generations as vlmkit (on CPU in float32 the logits are bitwise equal:
the same ops run in the same order). Other parts raise a `VlmkitError` saying why.

Weight layout (transformers 5):
    vision_tower.model.*        -> model.vision_tower.*
    projector.fc1 / fc2 (.proj) -> model.multi_modal_projector.linear_1 / linear_2
    language_model.<base>.*     -> model.language_model.*   (<base>: the LM's base_model_prefix)
    language_model.lm_head.*    -> lm_head.*
Llava ties `lm_head.weight` to `model.language_model.embed_tokens.weight` only; an LM whose embedding is
named otherwise (GPT-2's `wte`) cannot be loaded tied (transformers raises AttributeError), so such an LM
is written untied: `lm_head.weight` is a copy and `tie_word_embeddings` is False in both configs.

vlmkit never adds the tokenizer's own special tokens (a BOS) around a prompt, while transformers'
processors do by default; a tokenizer that adds them is written with `add_bos_token`/`add_eos_token`
off, so the Llava processor gives vlmkit's ids. Batched generation needs
`processor.tokenizer.padding_side = "left"`, as in vlmkit's engine.

The export is checked before it is published: the folder is written to a temporary sibling, loaded
back with transformers, run on a probe prompt and image next to the vlmkit model (same input ids, same
pixels, same logits), and only then renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlmkit.build import load_model, model_folder
from vlmkit.data.messages import user_turn
from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write_folder
from vlmkit.model.vlm import VlmkitConfig, is_vlmkit_dir

# tower model_type -> (Llava's vision_feature_select_strategy, tokens before the patches)
LLAVA_TOWERS = {"clip_vision_model": ("default", 1), "siglip_vision_model": ("full", 0)}
LLAVA_PROJECTORS = {"mlp": "gelu", "linear": "linear"}  # vlmkit projector -> projector_hidden_act
PROJECTOR_LAYERS = {"fc1": "linear_1", "fc2": "linear_2", "proj": "linear_1"}  # vlmkit -> Llava layer names
PROBE_PROMPT = "Describe the image."


def check_llava_exportable(config) -> None:
    """Raise a one-line `VlmkitError` unless a `VlmkitConfig` describes a model Llava can express."""
    spec = config.vision
    model_type = spec.get("config", {}).get("model_type") if spec.get("kind") == "hf" else None
    if model_type not in LLAVA_TOWERS:
        tower = f"hf {model_type}" if spec.get("kind") == "hf" else spec.get("name", spec.get("kind"))
        raise VlmkitError(
            f"cannot export to Llava: the vision tower is {tower}, Llava needs a CLIP or SigLIP tower; "
            "build the model with vision= a CLIP or SigLIP model (e.g. openai/clip-vit-base-patch32) to export it"
        )
    if config.projector not in LLAVA_PROJECTORS:
        raise VlmkitError(
            f"cannot export to Llava: projector {config.projector!r} has no Llava equivalent "
            "(Llava's is Linear -> GELU -> Linear); build the model with projector=mlp or projector=linear"
        )
    if getattr(config, "image_positions", False):
        raise VlmkitError(
            "cannot export to Llava: the model adds a learned position embedding to its image tokens, which "
            "Llava's projector has no place for; train it with image_positions=false to export"
        )
    if getattr(config, "image_column_major", False):
        raise VlmkitError(
            "cannot export to Llava: the model lays out each image column by column after column words, "
            "which Llava's processor does not write; train it with column_words=false to export"
        )
    if getattr(config, "image_embed_norm", 0.0) > 0:
        raise VlmkitError(
            "cannot export to Llava: the model rescales image embeddings (norm_image_embeds), which Llava "
            "does not; train it with norm_image_embeds=false to export"
        )
    vision = spec["config"]
    side = vision["image_size"] // vision["patch_size"]
    if config.image_tokens != side * side:
        raise VlmkitError(
            f"cannot export to Llava: image_tokens={config.image_tokens} pools the tower's {side}x{side} patch "
            f"grid, and Llava feeds every patch to the LM; build the model with image_tokens={side * side} to export"
        )


def _llava_config(model, tie: bool):
    from transformers import LlavaConfig

    config = model.config
    spec = config.vision
    strategy, _ = LLAVA_TOWERS[spec["config"]["model_type"]]
    text_config = type(config.text_config).from_dict(config.text_config.to_dict())
    text_config.tie_word_embeddings = tie  # LlavaConfig re-ties when the text config says so
    return LlavaConfig(
        vision_config=model.vision_tower.model.config.to_dict(),
        text_config=text_config,
        image_token_index=config.image_token_id,
        image_seq_length=config.image_tokens,
        projector_hidden_act=LLAVA_PROJECTORS[config.projector],
        vision_feature_select_strategy=strategy,
        vision_feature_layer=spec.get("feature_layer", -2),
        multimodal_projector_bias=True,
        tie_word_embeddings=tie,
    )


def _module_name(root: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in root.named_modules() if m is module)


def _llava_state_dict(model) -> tuple[dict[str, torch.Tensor], bool]:
    """vlmkit weights under Llava's names, and whether the LM head can stay tied in Llava."""
    from transformers import LlavaForConditionalGeneration

    lm = model.language_model
    prefix = lm.base_model_prefix
    embed = f"model.language_model.{_module_name(lm.base_model, lm.get_input_embeddings())}.weight"
    head = _module_name(lm, lm.get_output_embeddings())
    tie = bool(model.config.text_config.tie_word_embeddings) and (
        LlavaForConditionalGeneration._tied_weights_keys.get("lm_head.weight") == embed
    )

    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        part, _, rest = key.partition(".")
        if part in ("feature_mean", "feature_std"):  # folded into linear_1 below
            continue
        if part == "vision_tower":
            state["model.vision_tower." + rest.removeprefix("model.")] = value
        elif part == "projector":
            layer, _, param = rest.partition(".")
            state[f"model.multi_modal_projector.{PROJECTOR_LAYERS[layer]}.{param}"] = value
        elif rest.startswith(prefix + "."):
            state["model.language_model." + rest.removeprefix(prefix + ".")] = value
        elif rest.startswith(head + "."):
            param = rest.removeprefix(head + ".")
            if not (tie and param == "weight"):  # a copy: safetensors refuses tensors that share memory
                state[f"lm_head.{param}"] = value.clone()
        else:
            raise VlmkitError(f"cannot export to Llava: the LM has a weight {rest!r} outside its base model and head")

    # vlmkit standardises projector inputs, (x - mean) / std; Llava feeds x to linear_1 directly, so fold
    # it: W' = W / std, b' = b - W' @ mean (exact for identity statistics).
    first = "model.multi_modal_projector.linear_1"
    weight = state[f"{first}.weight"] / model.feature_std
    state[f"{first}.weight"] = weight
    state[f"{first}.bias"] = state[f"{first}.bias"] - weight @ model.feature_mean
    if model.config.projector == "linear":  # Linear -> identity act -> identity matrix: exactly the Linear
        hidden = model.config.text_config.hidden_size
        state["model.multi_modal_projector.linear_2.weight"] = torch.eye(hidden)
        state["model.multi_modal_projector.linear_2.bias"] = torch.zeros(hidden)
    return {k: v.contiguous() for k, v in state.items()}, tie


def _check_layout(llava_config, state: dict[str, torch.Tensor], tie: bool) -> None:
    """The mapped weights must be exactly the parameters Llava builds from the config, shape for shape."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        expected = {k: v.shape for k, v in LlavaForConditionalGeneration(llava_config).state_dict().items()}
    if tie:
        expected.pop("lm_head.weight")
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        diff = sorted(set(expected) ^ set(got)) or [k for k in expected if expected[k] != got[k]]
        raise VlmkitError(f"cannot export to Llava: the weights don't map onto Llava's layout (first: {diff[:3]})")


def _llava_processor(model, processor):
    from transformers import LlavaProcessor

    vision = model.config.vision["config"]
    strategy, extra_tokens = LLAVA_TOWERS[vision["model_type"]]
    tokenizer = processor.tokenizer
    if tokenizer("a")["input_ids"] != tokenizer("a", add_special_tokens=False)["input_ids"]:
        tokenizer.add_bos_token = tokenizer.add_eos_token = False  # rewrites its post-processor
    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=tokenizer,
        patch_size=vision["patch_size"],
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=extra_tokens,  # the CLS token "default" drops again
        chat_template=processor.chat_template,
        image_token=processor.image_token,
    )


def _probe_image(size: int):
    """A deterministic, non-uniform RGB image (gradients), so every patch sees different pixels."""
    from PIL import Image

    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    rgb = torch.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], -1).to(torch.uint8)
    return Image.fromarray(rgb.numpy(), "RGB")


@torch.inference_mode()
def _verify(model, processor, folder: Path) -> None:
    """Load the written folder with plain transformers and check it reproduces the vlmkit model."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    llava = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    llava_processor = AutoProcessor.from_pretrained(folder)
    messages = user_turn(PROBE_PROMPT)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image = _probe_image(model.config.vision["config"]["image_size"])
    ours = processor(images=[image], text=prompt)
    theirs = llava_processor(images=[image], text=prompt, return_tensors="pt")
    if llava_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) != prompt:
        raise VlmkitError("export check failed: the Llava processor's chat template renders differently")
    if not all(torch.equal(ours[k], theirs[k]) for k in ("input_ids", "pixel_values")):
        raise VlmkitError("export check failed: the Llava processor doesn't give vlmkit's input ids and pixels")
    pixels = ours["pixel_values"]
    expected_image = model.get_image_features(pixels)[0]  # (image_tokens, H)
    expected = model(input_ids=ours["input_ids"], pixel_values=pixels).logits
    out = llava(input_ids=ours["input_ids"], pixel_values=pixels)
    # Both paths run the same ops in the same order, so in practice the differences are exactly 0.
    if not torch.allclose(out.image_hidden_states, expected_image, rtol=1e-5, atol=1e-5):
        raise VlmkitError("export check failed: Llava's image features differ from vlmkit's (tower or projector)")
    err = (expected - out.logits).abs().max().item()
    if err > 1e-4 * max(1.0, expected.abs().max().item()):
        raise VlmkitError(
            f"export check failed: Llava's logits differ from vlmkit's by {err:.3g}; the LM's head likely does "
            "more than a Linear (softcapping, logit scaling), which Llava doesn't do; keep the vlmkit format"
        )


def export_llava(model_dir: str, out_dir: str, verify: bool = True) -> str:
    """Write the vlmkit model at `model_dir` as a transformers Llava checkpoint + processor at `out_dir`.

    `out_dir` must not exist (or be empty): it appears whole or not at all. `verify=False` skips loading
    the export back for the logits check (which holds two copies of the model in memory)."""

    src, out = Path(model_folder(model_dir)), Path(out_dir)  # a run folder names its model
    if not is_vlmkit_dir(src):
        raise VlmkitError(f"{src}: not a vlmkit model folder (no config.json with model_type 'vlmkit')")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise VlmkitError(f"{out} already exists and is not empty; give a new folder for the Llava export")
    check_llava_exportable(VlmkitConfig.from_pretrained(src))  # before loading any weights

    model, processor = load_model(src)  # float32: the check compares in full precision
    saved_dtype = json.loads((src / "config.json").read_text()).get("dtype") or "float32"
    dtype = getattr(torch, saved_dtype)
    state, tie = _llava_state_dict(model)
    llava_config = _llava_config(model, tie)
    _check_layout(llava_config, state, tie)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    llava_config.dtype = dtype

    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        llava_config.architectures = ["LlavaForConditionalGeneration"]
        llava_config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        _llava_processor(model, processor).save_pretrained(tmp)
        if verify:
            _verify(model, processor, tmp)

    atomic_write_folder(out, write)
    vision, text = llava_config.vision_config, llava_config.text_config
    return (
        f"wrote Llava checkpoint {out}: {vision.model_type} layer {llava_config.vision_feature_layer} "
        f"({llava_config.vision_feature_select_strategy}), {llava_config.image_seq_length} image tokens, "
        f"{text.model_type} LM, lm_head {'tied' if tie else 'untied'}{', checked against vlmkit' if verify else ''}"
    )

"""Tiny random VLM folders, one per family, saved exactly as a user would download them from the hub (weights,
config, generation config, processor + image/video processor, tokenizer and the family's real chat template), so
that `AutoProcessor.from_pretrained(folder)` and `AutoModelForImageTextToText.from_pretrained(folder)` load them and
`model.generate(**processor(images=..., text=...))` works. Everything is built offline, in well under 2 s per family.

Caller quirks, per family (see also `IMAGES_NESTED`, `NO_CHAT_TEMPLATE`, `VIDEO_FAMILIES`):
- smolvlm / idefics3: pass images nested per sample (`images=[[img]]` for one prompt). Every image is resized to
  64 px on its longest edge and split into up to 2x2 tiles of 32 px plus a global view; each view costs
  `processor.image_seq_len` (= 4) `<image>` tokens, e.g. 20 for a 40x48 image. smolvlm video: the prompt holds
  `<video>` (its chat template renders `{"type": "video"}`); pass `videos=[frames]` with frames (T, H, W, C) uint8
  and `video_metadata=[{"total_num_frames": T, "fps": f, "frames_indices": list(range(T))}]` (without it the
  processor warns and assumes 24 fps); each frame costs `image_seq_len` tokens.
- llava: flat `images=[img]`; one image = 16 `<image>` tokens (32 px, patch 8, CLS dropped), `config.image_seq_length`.
- llava_next: flat images; the count depends on the image size (anyres over the tiny grid pinpoints, e.g. 70 for
  40x48), ask `processor._get_num_multimodal_tokens(image_sizes=[(h, w)])`. Its (real, mistral) template has no
  generation-prompt branch: user turns always end with " [/INST]".
- qwen2_vl / qwen2_5_vl: flat images; an image is resized to 28..56 px a side, so it costs 1 to 4 `<|image_pad|>`
  tokens (`image_grid_thw.prod() // 4`). Video: `{"type": "video"}` in the messages, `videos=[frames]`; every 2
  frames cost 1..4 `<|video_pad|>` tokens (`video_grid_thw.prod() // 4`).
- paligemma: no chat template; prompt "<image>question" (or the bare question: the processor then prepends the
  `<image>`s, with a logged warning) -> 16 `<image>` tokens, then `<bos>`, the question and "\n". Its processor
  adds 1024 `<locXXXX>` + 128 `<segXXX>` tokens, so its vocabulary is ~1.5k.
- No family's real template rejects a system message: smolvlm/idefics3 render "System: ...", llava drops the
  role name and keeps the text, llava_next renders <<SYS>>, qwen a system turn.
"""

from __future__ import annotations

from pathlib import Path

from tiny import make_tokenizer

FAMILIES = ("smolvlm", "idefics3", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "paligemma")

# Families whose hub checkpoints ship no chat template: build the prompt by hand.
NO_CHAT_TEMPLATE = {
    "paligemma": "PaliGemma (pt/mix) checkpoints ship no chat template; prompts are plain task prefixes like "
    "'caption en' and the processor prepends the image tokens and <bos>.",
}
# Families whose processor wants `images` nested per sample: `[[img_a], [img_b, img_c]]`.
IMAGES_NESTED = frozenset({"smolvlm", "idefics3"})
# Families whose processor also takes `videos=`.
VIDEO_FAMILIES = frozenset({"smolvlm", "qwen2_vl", "qwen2_5_vl"})

# --- the families' real chat templates (from their hub processor / tokenizer configs) -------------------------
_IDEFICS_BODY = (
    "{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{VIDEO}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# HuggingFaceTB/SmolVLM2-*-Instruct (the video-aware variant of HuggingFaceTB/SmolVLM-*-Instruct's template)
SMOLVLM_TEMPLATE = "<|im_start|>" + _IDEFICS_BODY.replace(
    "{VIDEO}", "{% elif line['type'] == 'video' %}{{ '<video>' }}"
)
# HuggingFaceM4/Idefics3-8B-Llama3
IDEFICS3_TEMPLATE = "<|begin_of_text|>" + _IDEFICS_BODY.replace("{VIDEO}", "")
# llava-hf/llava-1.5-7b-hf
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf (including its '<\\s>' typo)
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '<\\s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# Qwen/Qwen2-VL-2B-Instruct (Qwen/Qwen2.5-VL-*-Instruct ship the same one)
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# sizes shared by every family
HIDDEN = 64  # text hidden size
VISION_HIDDEN = 32
VISION_IMAGE = 32  # vision tower input, px
PATCH = 8


def _text_config(model_type: str, tokenizer, **extra) -> dict:
    ids = {
        k: tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{k[:-3]}"))
        for k in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(tokenizer, k[:-3], None) is not None
    }
    cfg = dict(
        model_type=model_type, vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=HIDDEN * 2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, **ids,
    )
    cfg.update(extra)
    return cfg


def _vision_kw(**extra) -> dict:
    kw = dict(hidden_size=VISION_HIDDEN, intermediate_size=VISION_HIDDEN * 2, num_hidden_layers=1,
              num_attention_heads=4, image_size=VISION_IMAGE, patch_size=PATCH)
    kw.update(extra)
    return kw


def _idefics_tokens(bos: str, eos: str, pad: str) -> list[str]:
    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tokens = [bos, eos, pad, "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>", *rows]
    return list(dict.fromkeys(tokens))


def _smolvlm_like(family: str):
    import transformers as tf

    smol = family == "smolvlm"
    if smol:  # HuggingFaceTB/SmolVLM2: <|im_start|> bos, <end_of_utterance> eos, <|im_end|> pad
        bos, eos, pad, unk = "<|im_start|>", "<end_of_utterance>", "<|im_end|>", "<|endoftext|>"
        specials = ["<|endoftext|>", *_idefics_tokens(bos, eos, pad)]
    else:  # HuggingFaceM4/Idefics3-8B-Llama3: llama-3 tokens
        bos, eos, pad, unk = "<|begin_of_text|>", "<end_of_utterance>", "<|reserved_special_token_0|>", None
        specials = ["<|end_of_text|>", *_idefics_tokens(bos, eos, pad)]
    tokenizer = make_tokenizer(
        vocab_size=400, special_tokens=specials, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad
    )
    scale = 2
    image_seq_len = (VISION_IMAGE // PATCH) ** 2 // scale**2
    image_kw = dict(size={"longest_edge": 2 * VISION_IMAGE}, max_image_size={"longest_edge": VISION_IMAGE})
    cls = tf.SmolVLMConfig if smol else tf.Idefics3Config
    config = cls(
        vision_config=_vision_kw(), text_config=_text_config("llama", tokenizer), scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=tokenizer.pad_token_id,
    )
    if smol:
        video = tf.SmolVLMVideoProcessor(
            size={"longest_edge": VISION_IMAGE}, max_image_size={"longest_edge": VISION_IMAGE}, num_frames=4, fps=1,
            video_sampling={"fps": 1, "max_frames": 4, "video_size": {"longest_edge": VISION_IMAGE}},
        )
        processor = tf.SmolVLMProcessor(
            tf.SmolVLMImageProcessor(**image_kw), tokenizer, video, image_seq_len=image_seq_len,
            chat_template=SMOLVLM_TEMPLATE,
        )
    else:
        processor = tf.Idefics3Processor(
            tf.Idefics3ImageProcessor(**image_kw), tokenizer, image_seq_len=image_seq_len,
            chat_template=IDEFICS3_TEMPLATE,
        )
    return config, processor


_LLAMA_SPECIALS = dict(special_tokens=["<unk>", "<s>", "</s>", "<image>", "<pad>"], bos_token="<s>",
                       eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos=True)


def _llava(family: str):
    import transformers as tf

    tokenizer = make_tokenizer(**_LLAMA_SPECIALS)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision = dict(model_type="clip_vision_model", **_vision_kw(num_hidden_layers=2), projection_dim=VISION_HIDDEN)
    clip_kw = dict(size={"shortest_edge": VISION_IMAGE}, crop_size={"height": VISION_IMAGE, "width": VISION_IMAGE})
    proc_kw = dict(patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava":  # llava-hf/llava-1.5: CLIP + Llama
        config = tf.LlavaConfig(
            vision_config=vision, text_config=_text_config("llama", tokenizer), image_token_index=image_token_id,
            image_seq_length=(VISION_IMAGE // PATCH) ** 2, pad_token_id=tokenizer.pad_token_id,
        )
        processor = tf.LlavaProcessor(
            tf.CLIPImageProcessor(**clip_kw), tokenizer, chat_template=LLAVA_TEMPLATE, **proc_kw
        )
    else:  # llava-hf/llava-v1.6-mistral: CLIP + Mistral, anyres over a tiny grid
        pinpoints = [[VISION_IMAGE, 2 * VISION_IMAGE], [2 * VISION_IMAGE, VISION_IMAGE], [2 * VISION_IMAGE] * 2]
        config = tf.LlavaNextConfig(
            vision_config=vision, text_config=_text_config("mistral", tokenizer), image_token_index=image_token_id,
            image_grid_pinpoints=pinpoints, image_seq_length=(VISION_IMAGE // PATCH) ** 2,
            pad_token_id=tokenizer.pad_token_id,
        )
        processor = tf.LlavaNextProcessor(
            tf.LlavaNextImageProcessor(**clip_kw, image_grid_pinpoints=pinpoints), tokenizer,
            chat_template=LLAVA_NEXT_TEMPLATE, **proc_kw,
        )
    return config, processor


def _qwen(family: str):
    import transformers as tf

    specials = [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
        "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    ]
    tokenizer = make_tokenizer(
        special_tokens=specials, bos_token=None, eos_token="<|im_end|>", unk_token=None, pad_token="<|endoftext|>"
    )
    ids = {f"{n}_token_id": tokenizer.convert_tokens_to_ids(f"<|{t}|>") for n, t in
           [("image", "image_pad"), ("video", "video_pad"), ("vision_start", "vision_start"),
            ("vision_end", "vision_end")]}
    head_dim = HIDDEN // 4
    text = _text_config(
        f"{family}_text", tokenizer, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    assert sum(text["rope_parameters"]["mrope_section"]) * 2 == head_dim
    common = dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, num_heads=4)
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=VISION_HIDDEN, hidden_size=HIDDEN, mlp_ratio=2, **common)
        config_cls, processor_cls = tf.Qwen2VLConfig, tf.Qwen2VLProcessor
    else:
        vision = dict(depth=2, hidden_size=VISION_HIDDEN, intermediate_size=VISION_HIDDEN * 2,
                      out_hidden_size=HIDDEN, fullatt_block_indexes=[1], window_size=56, **common)
        config_cls, processor_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLProcessor
    config = config_cls(text_config=text, vision_config=vision, **ids)
    pixels = dict(min_pixels=28 * 28, max_pixels=56 * 56)  # every image/frame pair -> 1..4 tokens
    processor = processor_cls(
        tf.Qwen2VLImageProcessor(**pixels), tokenizer, tf.Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        chat_template=QWEN2_VL_TEMPLATE,
    )
    return config, processor


def _paligemma(family: str):
    import transformers as tf

    # Gemma's special-token layout: <pad>=0, <eos>=1, <bos>=2, <unk>=3, then <image>
    tokenizer = make_tokenizer(
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos_token="<bos>", eos_token="<eos>",
        unk_token="<unk>", pad_token="<pad>", add_bos=True,
    )
    num_image_tokens = (VISION_IMAGE // PATCH) ** 2
    image_processor = tf.SiglipImageProcessor(
        size={"height": VISION_IMAGE, "width": VISION_IMAGE}, image_seq_length=num_image_tokens
    )
    image_processor.image_seq_length = num_image_tokens  # the processor requires this attribute
    processor = tf.PaliGemmaProcessor(image_processor, tokenizer)  # adds 1024 <locXXXX> + 128 <segXXX> tokens
    tokenizer = processor.tokenizer
    text = _text_config("gemma", tokenizer, head_dim=16, num_key_value_heads=1)
    config = tf.PaliGemmaConfig(
        vision_config=dict(model_type="siglip_vision_model", **_vision_kw(), vision_use_head=False),
        text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vocab_size=len(tokenizer),
        projection_dim=HIDDEN, hidden_size=HIDDEN, pad_token_id=tokenizer.pad_token_id,
    )
    assert config.text_config.num_image_tokens == num_image_tokens
    return config, processor


_BUILDERS = {
    "smolvlm": _smolvlm_like, "idefics3": _smolvlm_like, "llava": _llava, "llava_next": _llava,
    "qwen2_vl": _qwen, "qwen2_5_vl": _qwen, "paligemma": _paligemma,
}


def make_vlm(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random `family` VLM (model + processor + tokenizer + chat template) to `folder`."""
    import torch
    import transformers as tf

    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    config, processor = _BUILDERS[family](family)
    tokenizer = processor.tokenizer
    if family not in NO_CHAT_TEMPLATE:
        tokenizer.chat_template = processor.chat_template  # hub repos carry it in tokenizer_config too
    torch.manual_seed(seed)
    model = tf.AutoModelForImageTextToText.from_config(config)
    eos = tokenizer.eos_token_id
    if family in ("qwen2_vl", "qwen2_5_vl"):  # like the hub generation configs: stop on <|im_end|> or <|endoftext|>
        eos = [eos, tokenizer.pad_token_id]
    model.generation_config = tf.GenerationConfig(
        bos_token_id=model.config.get_text_config().bos_token_id, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder

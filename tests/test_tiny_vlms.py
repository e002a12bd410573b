"""The tiny VLM folders of tests/tiny_vlms.py load through the Auto classes, render their real chat templates, and
generate; the processor puts exactly as many image/video placeholder tokens in `input_ids` as it says it will."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_vlms import (  # noqa: E402
    FAMILIES, IMAGES_NESTED, NO_CHAT_TEMPLATE, REJECTS_SYSTEM, VIDEO_FAMILIES, make_vlm,
)

CLASSES = {  # family -> (processor class, model class)
    "smolvlm": ("SmolVLMProcessor", "SmolVLMForConditionalGeneration"),
    "idefics3": ("Idefics3Processor", "Idefics3ForConditionalGeneration"),
    "llava": ("LlavaProcessor", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextProcessor", "LlavaNextForConditionalGeneration"),
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration"),
    "paligemma": ("PaliGemmaProcessor", "PaliGemmaForConditionalGeneration"),
}
GENERATION_PROMPT = {  # what the real template ends with when add_generation_prompt=True
    "smolvlm": "<end_of_utterance>\nAssistant:",
    "idefics3": "<end_of_utterance>\nAssistant:",
    "llava": "ASSISTANT:",
    "llava_next": " [/INST]",
    "qwen2_vl": "<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_end|>\n<|im_start|>assistant\n",
}
# llava-v1.6-mistral's template has no generation-prompt branch: every user turn already ends with " [/INST]".
IGNORES_GENERATION_PROMPT = {"llava_next"}
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}


def _image(h: int, w: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    import transformers as tf

    root = tmp_path_factory.mktemp("tiny_vlms")
    cache = {}

    def get(family):
        if family not in cache:
            folder = make_vlm(family, root / family)
            processor = tf.AutoProcessor.from_pretrained(folder)
            model = tf.AutoModelForImageTextToText.from_pretrained(folder).eval()
            cache[family] = folder, processor, model
        return cache[family]

    return get


def _prompt(family, processor, system: bool = True) -> str:
    if family in NO_CHAT_TEMPLATE:
        return "<image>What is this?"  # the processor expands <image> and puts <bos> after it
    messages = [SYSTEM, USER] if system and family not in REJECTS_SYSTEM else [USER]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _images(family, *imgs):
    return [list(imgs)] if family in IMAGES_NESTED else list(imgs)


def _expected_image_tokens(family, processor, model, inputs, sizes) -> list[int]:
    """Per image, how many placeholder tokens the processor / config say it costs."""
    if family in ("smolvlm", "idefics3"):
        info = processor.image_processor(images=[[_image(h, w)] for h, w in sizes], return_row_col_info=True)
        views = [r[0] * c[0] + 1 for r, c in zip(info["rows"], info["cols"])]  # tiles + the global view
        return [processor.image_seq_len * v for v in views]
    if family == "llava":
        return [model.config.image_seq_length] * len(sizes)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        merge = processor.image_processor.merge_size ** 2
        return [int(thw.prod()) // merge for thw in inputs["image_grid_thw"]]
    if family == "paligemma":
        assert processor.image_seq_length == model.config.text_config.num_image_tokens
        return [processor.image_seq_length] * len(sizes)
    assert family == "llava_next"
    return list(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_via_auto_classes(family, vlms):
    import transformers as tf

    folder, processor, model = vlms(family)
    proc_cls, model_cls = CLASSES[family]
    assert type(processor).__name__ == proc_cls
    assert type(model).__name__ == model_cls
    assert tf.AutoConfig.from_pretrained(folder).model_type == family
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert sum(p.numel() for p in model.parameters()) < 500_000  # tiny
    assert model.get_input_embeddings().num_embeddings >= len(processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == processor.image_token
    if family in NO_CHAT_TEMPLATE:
        assert processor.chat_template is None
    else:
        assert processor.chat_template and tf.AutoTokenizer.from_pretrained(folder).chat_template
    if family in VIDEO_FAMILIES:
        assert processor.video_processor is not None


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")  # llava_next's real '<\\s>'
@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in NO_CHAT_TEMPLATE])
def test_chat_template_renders(family, vlms):
    _, processor, _ = vlms(family)
    if family in REJECTS_SYSTEM:
        with pytest.raises(Exception):
            processor.apply_chat_template([SYSTEM, USER], add_generation_prompt=True, tokenize=False)
    text = _prompt(family, processor)
    assert text.endswith(GENERATION_PROMPT[family]), text
    assert text.count(processor.image_token if "qwen" not in family else "<|vision_start|><|image_pad|>") == 1
    assert "What is this?" in text
    assert ("Be brief." in text) == (family not in REJECTS_SYSTEM)
    no_gen = processor.apply_chat_template([USER], add_generation_prompt=False, tokenize=False)
    assert no_gen.endswith(GENERATION_PROMPT[family]) == (family in IGNORES_GENERATION_PROMPT)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_image_token_count(family, vlms):
    import torch

    _, processor, model = vlms(family)
    size = (40, 48)
    inputs = processor(images=_images(family, _image(*size)), text=[_prompt(family, processor)], return_tensors="pt")
    ids = inputs["input_ids"]
    n_image = int((ids == processor.image_token_id).sum())
    assert n_image > 0
    assert n_image == sum(_expected_image_tokens(family, processor, model, inputs, [size]))
    if hasattr(processor, "_get_num_multimodal_tokens"):  # the vLLM-style helper agrees, where the family has one
        helper = sum(processor._get_num_multimodal_tokens(image_sizes=[size]).num_image_tokens)
        if family == "idefics3":  # it counts the whole expansion, <fake_token_around_image> to the last one
            fake = (ids[0] == processor.fake_image_token_id).nonzero().flatten()
            assert helper == int(fake[-1] - fake[0]) + 1
        else:
            assert helper == n_image
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    assert 1 <= out.shape[1] - ids.shape[1] <= 5
    assert isinstance(processor.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)[0], str)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_differently_sized_images(family, vlms):
    import torch

    _, processor, model = vlms(family)
    processor.tokenizer.padding_side = "left"
    sizes = [(40, 48), (64, 30)]
    prompt = _prompt(family, processor, system=False)
    images = [[_image(*sizes[0])], [_image(*sizes[1], seed=1)]] if family in IMAGES_NESTED else [
        _image(*sizes[0]), _image(*sizes[1], seed=1)]
    inputs = processor(images=images, text=[prompt, prompt], padding=True, return_tensors="pt")
    per_row = (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()
    assert per_row == _expected_image_tokens(family, processor, model, inputs, sizes)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", sorted(VIDEO_FAMILIES))
def test_video(family, vlms):
    import torch

    _, processor, model = vlms(family)
    frames = np.random.RandomState(2).randint(0, 256, (8, 40, 48, 3), dtype=np.uint8)  # (T, H, W, C)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    kwargs = {}
    if family == "smolvlm":  # pre-sampled frames: give fps so the frame timestamps are right
        meta = {"total_num_frames": 8, "fps": 4.0, "duration": 2.0, "frames_indices": list(range(8))}
        kwargs["video_metadata"] = [meta]
    inputs = processor(videos=[frames], text=[prompt], return_tensors="pt", **kwargs)
    ids = inputs["input_ids"]
    if family == "smolvlm":  # every frame becomes one global image view
        assert inputs["pixel_values"].shape[:2] == (1, 8)
        assert int((ids == processor.image_token_id).sum()) == 8 * processor.image_seq_len
        assert "Frame from 00:01" in processor.decode(ids[0])
    else:
        merge = processor.video_processor.merge_size ** 2
        expected = int(inputs["video_grid_thw"].prod()) // merge
        assert int((ids == processor.video_token_id).sum()) == expected > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert 1 <= out.shape[1] - ids.shape[1] <= 5


def test_seed_makes_weights_reproducible(tmp_path):
    from safetensors.torch import load_file

    a = load_file(make_vlm("llava", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(make_vlm("llava", tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(make_vlm("llava", tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys() == c.keys()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert not all(np.array_equal(a[k].numpy(), c[k].numpy()) for k in a)


def test_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        make_vlm("blip9000", tmp_path)

"""vlmkit on the tiny VLM folders of tests/tiny_vlms.py: `vlmkit.load` gives each its family, the engine
renders each family's real prompt, expands every image into exactly the tokens the family's processor says
it costs (batched, left-padded), and hands native video processors every frame. Checked against what the
real templates and processors are known to do, not against vlmkit itself. (Greedy output and batching
equal plain transformers: tests/test_pretrained.py.) The last test checks the fixture itself."""

from __future__ import annotations

import jinja2
import numpy as np
import pytest

import vlmkit
from tiny_vlms import FAMILIES, IMAGES_NESTED, NO_CHAT_TEMPLATE, VIDEO_FAMILIES

CLASSES = {  # family -> (processor class, model class)
    "smolvlm": ("SmolVLMProcessor", "SmolVLMForConditionalGeneration"),
    "idefics3": ("Idefics3Processor", "Idefics3ForConditionalGeneration"),
    "llava": ("LlavaProcessor", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextProcessor", "LlavaNextForConditionalGeneration"),
    "qwen2_vl": ("Qwen2VLProcessor", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2_5_VLForConditionalGeneration"),
    "paligemma": ("PaliGemmaProcessor", "PaliGemmaForConditionalGeneration"),
}
FAMILY_NAME = {  # model_type -> vlmkit's family (`vlmkit.model.families`); an unknown one would be "generic"
    "smolvlm": "smolvlm", "idefics3": "idefics3", "llava": "llava", "llava_next": "llava-next",
    "qwen2_vl": "qwen2-vl", "qwen2_5_vl": "qwen2-vl", "paligemma": "paligemma",
}
SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}
_IDEFICS = "System: Be brief.<end_of_utterance>\nUser:<image>What is this?<end_of_utterance>\nAssistant:"
_QWEN = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
         "What is this?<|im_end|>\n<|im_start|>assistant\n")
PROMPT = {  # [SYSTEM, USER] as each family's real template renders it, generation prompt included
    "smolvlm": "<|im_start|>" + _IDEFICS,
    "idefics3": "<|begin_of_text|>" + _IDEFICS,
    "llava": "Be brief. USER: <image>\nWhat is this? ASSISTANT:",  # llava-1.5 drops the system role's name
    "llava_next": "<<SYS>>\nBe brief.\n<</SYS>>\n\n[INST] <image>\nWhat is this? [/INST]",
    "qwen2_vl": _QWEN,
    "qwen2_5_vl": _QWEN,
    "paligemma": "<image><image>What is this?",  # no template: vlmkit writes the image tokens, then the text
}


def _image(h: int, w: int, seed: int = 0):
    from PIL import Image

    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def vlms(folders):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = vlmkit.load(folders[family], device="cpu")
        return cache[family]

    return get


def _expected_image_tokens(family, vlm, inputs, sizes) -> list[int]:
    """Per image, how many placeholder tokens the family's processor / config say it costs."""
    processor, config = vlm.processor, vlm.model.config
    if family in ("smolvlm", "idefics3"):
        info = processor.image_processor(images=[[_image(h, w)] for h, w in sizes], return_row_col_info=True)
        views = [r[0] * c[0] + 1 for r, c in zip(info["rows"], info["cols"])]  # tiles + the global view
        return [processor.image_seq_len * v for v in views]
    if family == "llava":
        return [config.image_seq_length] * len(sizes)
    if family in ("qwen2_vl", "qwen2_5_vl"):
        merge = processor.image_processor.merge_size ** 2
        return [int(thw.prod()) // merge for thw in inputs["image_grid_thw"]]
    if family == "paligemma":
        return [config.text_config.num_image_tokens] * len(sizes)
    assert family == "llava_next"
    return list(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_gives_each_model_its_family(family, vlms):
    vlm = vlms(family)
    assert (type(vlm.processor).__name__, type(vlm.model).__name__) == CLASSES[family]  # the model's own classes
    assert not vlm.model.training and vlm.model.device.type == "cpu"
    assert vlm.family.name == FAMILY_NAME[family]
    assert vlm.family.chat_template == (family not in NO_CHAT_TEMPLATE)
    assert vlm.family.system_turn == (family not in NO_CHAT_TEMPLATE)  # every real template here has a system turn
    assert vlm.family.native_video == (family in VIDEO_FAMILIES)
    if family in IMAGES_NESTED:  # their processors take no flat list
        assert vlm.family.nested_images


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")  # llava_next's real '<\\s>'
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_prompt_is_the_family_template(family, vlms):
    engine = vlms(family).engine
    if family in NO_CHAT_TEMPLATE:  # one user turn with two images
        assert engine.prompt([{**USER, "content": [{"type": "image"}, *USER["content"]]}]) == PROMPT[family]
    else:
        assert engine.prompt([SYSTEM, USER]) == PROMPT[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_engine_batches_two_image_sizes_left_padded(family, vlms):
    vlm = vlms(family)
    sizes = [(40, 48), (64, 30)]
    long = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture in detail."}]}
    inputs = vlm.engine.inputs([[USER], [long]], [[_image(*sizes[0])], [_image(*sizes[1], seed=1)]])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    per_row = (ids == vlm.model.config.image_token_id).sum(dim=1).tolist()
    assert per_row == _expected_image_tokens(family, vlm, inputs, sizes)
    assert all(n > 0 for n in per_row)
    assert not mask.all()  # the prompts differ in length ...
    assert mask[:, -1].all() and (mask.diff(dim=1) >= 0).all()  # ... and are padded on the left: each ends at the end


@pytest.mark.parametrize("family", sorted(VIDEO_FAMILIES))
def test_engine_gives_native_video_every_frame(family, vlms):
    from vlmkit.data.video import Frame

    vlm = vlms(family)
    frames = [Frame(0.5 * t, _image(40, 48, seed=t)) for t in range(8)]  # 0.0 .. 3.5 s
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    inputs = vlm.engine.inputs([messages], [[frames]])
    ids, processor = inputs["input_ids"], vlm.processor
    if family == "smolvlm":  # every frame becomes one global view; the processor would keep 4 if it sampled
        assert inputs["pixel_values"].shape[:2] == (1, 8)
        assert int((ids == processor.image_token_id).sum()) == 8 * processor.image_seq_len
    else:  # a temporal patch is 2 frames
        thw = inputs["video_grid_thw"]
        assert int(thw[0, 0]) == 8 // processor.video_processor.temporal_patch_size
        merge = processor.video_processor.merge_size ** 2
        assert int((ids == processor.video_token_id).sum()) == int(thw.prod()) // merge


@pytest.mark.filterwarnings("ignore:invalid escape sequence:DeprecationWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_is_a_tiny_hub_like_folder(family, folders, vlms):
    """tests/tiny_vlms.py itself: what the tests above rely on."""
    from pathlib import Path

    vlm = vlms(family)
    folder, processor, model = Path(folders[family]), vlm.processor, vlm.model
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert sum(p.numel() for p in model.parameters()) < 500_000
    assert model.get_input_embeddings().num_embeddings >= len(processor.tokenizer)
    assert processor.tokenizer.convert_ids_to_tokens(model.config.image_token_id) == processor.image_token
    assert bool(processor.chat_template) == bool(processor.tokenizer.chat_template) == (family not in NO_CHAT_TEMPLATE)
    assert (getattr(processor, "video_processor", None) is not None) == (family in VIDEO_FAMILIES)
    if family == "llava_next":  # the real template's one refusal, kept
        with pytest.raises(jinja2.exceptions.TemplateError, match="^Only user and assistant roles are supported!$"):
            tool = {"role": "tool", "content": [{"type": "text", "text": "4"}]}
            processor.apply_chat_template([tool], tokenize=False)


def test_a_conversation_the_template_refuses_is_one_clear_error(vlms):
    """llava_next's template raises on a `tool` role: generation and training both turn that into a
    VlmkitError (one line for the CLI) naming the model's family and, when training, the sample."""
    from vlmkit.data.template import TemplateRenderer
    from vlmkit.errors import VlmkitError

    vlm = vlms("llava_next")
    tool = [{"role": "tool", "content": [{"type": "text", "text": "4"}]}]
    with pytest.raises(VlmkitError, match=r"llava-next model's chat template refuses .*Only user and assistant roles"):
        vlm.engine.prompt(tool)
    answer = {"role": "assistant", "content": [{"type": "text", "text": "5"}]}
    with pytest.raises(VlmkitError, match=r"^d\.jsonl:3: the llava-next model's chat template refuses"):
        TemplateRenderer(vlm.processor, vlm.family).render(tool + [answer], [], "d.jsonl:3")

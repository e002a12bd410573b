"""Llava export: a vlmkit model built from Llava's parts loads with plain transformers and behaves the same.

Tiny random parts on disk (CLIP or SigLIP 32 px / patch 8 -> 16 patches; Llama or GPT-2 LM), composed,
saved, exported; the export is loaded with the Auto classes only and compared with vlmkit on a real
photo: same input ids and pixels, logits within 1e-4, same 8 greedy tokens.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from skimage.data import astronaut
from tiny import make_clip_vision, make_gpt2, make_llama, make_vision
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine
from vlmkit.build import compose
from vlmkit.export import export_llava
from vlmkit.model.vlm import VlmkitConfig, VlmkitForConditionalGeneration

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return {
        "clip": make_clip_vision(root / "clip"),
        "siglip": make_vision(root / "siglip", "siglip"),
        "llama": make_llama(root / "llama"),
        "gpt2": make_gpt2(root / "gpt2"),
    }


@pytest.fixture(scope="module")
def photo():
    # a real photo, not square, so resizing and cropping are exercised
    return Image.fromarray(astronaut()).resize((48, 40), Image.BICUBIC)


def save_composed(parts, folder, vision="clip", llm="llama", **kwargs):
    kwargs = {"projector": "mlp", "norm_image_embeds": False, **kwargs}  # what Llava can express
    model, processor = compose(vision=str(parts[vision]), llm=str(parts[llm]), **kwargs)
    with torch.no_grad():  # zero biases and std 0.02 hide slips (GELU's tanh form): make them count
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p) * 0.5)
        # non-identity input standardisation, as training sets it: export must fold it into linear_1
        model.set_feature_stats(torch.randn(8, 4, 4, model.feature_mean.shape[0]) * 0.5 + 0.3)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


@pytest.mark.parametrize(
    "vision, llm, projector, layer",
    [
        ("clip", "llama", "mlp", -2),
        ("clip", "gpt2", "mlp", -2),
        ("siglip", "llama", "mlp", -1),
        ("clip", "llama", "linear", -1),
    ],
)
def test_export_matches_vlmkit(parts, photo, tmp_path, vision, llm, projector, layer):
    model, processor = save_composed(
        parts, tmp_path / "vlmkit", vision, llm, projector=projector, image_tokens=16, vision_feature_layer=layer
    )
    message = export_llava(str(tmp_path / "vlmkit"), str(tmp_path / "llava"))
    assert str(tmp_path / "llava") in message and "\n" not in message

    out = tmp_path / "llava"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava" and config["image_seq_length"] == 16
    assert config["vision_feature_layer"] == layer
    assert config["vision_feature_select_strategy"] == {"clip": "default", "siglip": "full"}[vision]
    llava = AutoModelForImageTextToText.from_pretrained(out).eval()
    llava_processor = AutoProcessor.from_pretrained(out)
    assert type(llava).__name__ == "LlavaForConditionalGeneration"
    assert type(llava_processor).__name__ == "LlavaProcessor"

    prompt = llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert prompt == processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ours = processor(images=[photo], text=prompt)
    theirs = llava_processor(images=[photo], text=prompt, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert int((theirs["input_ids"] == processor.image_token_id).sum()) == 16
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])

    with torch.inference_mode():
        expected_image = model.get_image_features(ours["pixel_values"])[0]  # (16, H)
        expected = model(**ours).logits
        out = llava(**theirs)
    assert expected.abs().max() > 0.1  # logits that could differ
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-4)
    # the image features enter the LM through a norm that shrinks slips; compare them before it (the
    # folded standardisation rounds differently from vlmkit's explicit one: float32 noise, ~1e-5)
    torch.testing.assert_close(out.image_hidden_states, expected_image, atol=5e-5, rtol=1e-4)

    reply = Engine(model, processor).generate([MESSAGES], [[photo]], max_new_tokens=8)[0]
    with torch.inference_mode():
        ids = model.generate(**ours, max_new_tokens=8, do_sample=False)
        llava_ids = llava.generate(**theirs, max_new_tokens=8, do_sample=False)
    new = llava_ids[:, theirs["input_ids"].shape[1] :]
    assert new.shape[1] > 0 and torch.equal(llava_ids, ids)
    assert llava_processor.batch_decode(new, skip_special_tokens=True)[0].strip() == reply


def test_tied_head_is_kept_where_llava_can_tie_it(parts, tmp_path):
    for llm, tied in [("llama", True), ("gpt2", False)]:  # GPT-2's embedding is `wte`, not `embed_tokens`
        save_composed(parts, tmp_path / llm, llm=llm, image_tokens=16)
        export_llava(str(tmp_path / llm), str(tmp_path / f"{llm}-llava"))
        config = json.loads((tmp_path / f"{llm}-llava" / "config.json").read_text())
        assert config["tie_word_embeddings"] is tied and config["text_config"]["tie_word_embeddings"] is tied
        with safe_open(tmp_path / f"{llm}-llava" / "model.safetensors", "pt") as f:
            assert ("lm_head.weight" in f.keys()) is not tied
        llava = AutoModelForImageTextToText.from_pretrained(tmp_path / f"{llm}-llava")
        shares = llava.lm_head.weight.data_ptr() == llava.get_input_embeddings().weight.data_ptr()
        assert shares is tied
        assert torch.equal(llava.lm_head.weight, llava.get_input_embeddings().weight)  # GPT-2: an equal copy


def test_tokenizer_that_adds_bos_is_exported_without(parts, photo, tmp_path):
    from tokenizers import processors
    from transformers import AutoTokenizer

    llm = tmp_path / "llama-bos"
    make_llama(llm)
    tokenizer = AutoTokenizer.from_pretrained(llm)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)]
    )
    tokenizer.save_pretrained(llm)
    assert AutoTokenizer.from_pretrained(llm)("a")["input_ids"][0] == tokenizer.bos_token_id
    _, processor = save_composed({**parts, "llama": llm}, tmp_path / "vlmkit", image_tokens=16)
    export_llava(str(tmp_path / "vlmkit"), str(tmp_path / "llava"))

    llava_processor = AutoProcessor.from_pretrained(tmp_path / "llava")
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    theirs = llava_processor(images=[photo], text=prompt, return_tensors="pt")
    assert torch.equal(theirs["input_ids"], processor(images=[photo], text=prompt)["input_ids"])


@pytest.mark.parametrize(
    "kwargs, why",
    [
        ({"image_tokens": 4}, "image_tokens=16"),  # vlmkit would pool 4x4 patches to 2x2
        ({"image_tokens": 4, "projector": "pixel_shuffle"}, "projector=mlp or projector=linear"),
        ({"image_tokens": 16, "image_positions": True}, "image_positions=false"),
        ({"image_tokens": 4, "column_words": True}, "column_words=false"),
    ],
)
def test_refuses_what_llava_cannot_express(parts, tmp_path, kwargs, why):
    save_composed(parts, tmp_path / "vlmkit", **kwargs)
    with pytest.raises(VlmkitError, match=why) as e:
        export_llava(str(tmp_path / "vlmkit"), str(tmp_path / "llava"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "llava").exists() and [p.name for p in tmp_path.iterdir()] == ["vlmkit"]


def test_refuses_a_cnn_tower(parts, tmp_path):
    lm, _ = compose(vision=str(parts["clip"]), llm=str(parts["llama"]), image_tokens=16)  # borrow a text config
    config = VlmkitConfig(vision={"kind": "efficientnet_lite0"}, text_config=lm.config.text_config, image_tokens=16)
    VlmkitForConditionalGeneration(config).save_pretrained(tmp_path / "vlmkit")
    with pytest.raises(VlmkitError, match="CLIP or SigLIP"):
        export_llava(str(tmp_path / "vlmkit"), str(tmp_path / "llava"))
    assert not (tmp_path / "llava").exists()


def test_exports_a_run_folder(parts, tmp_path):
    """`vlmkit export RUN` takes the run folder `vlmkit generate --model RUN` takes: its model/."""
    save_composed(parts, tmp_path / "run" / "model", image_tokens=16)
    (tmp_path / "run" / "train_summary.json").write_text("{}")
    export_llava(str(tmp_path / "run"), str(tmp_path / "llava"), verify=False)
    assert json.loads((tmp_path / "llava" / "config.json").read_text())["model_type"] == "llava"


def test_does_not_overwrite(parts, tmp_path):
    save_composed(parts, tmp_path / "vlmkit", image_tokens=16)
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "keep.txt").write_text("mine")
    with pytest.raises(VlmkitError, match="not empty"):
        export_llava(str(tmp_path / "vlmkit"), str(tmp_path / "llava"))
    assert (tmp_path / "llava" / "keep.txt").read_text() == "mine"

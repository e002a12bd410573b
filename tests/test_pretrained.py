"""Pretrained transformers VLMs through vlmkit: tiny random models of each family with their real
processor classes and chat templates, driven exactly as a user would (library and CLI), checked
against direct transformers calls."""

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

import vlmkit
from tiny_vlms import FAMILIES, VIDEO_FAMILIES
from vlmkit.cli import main
from vlmkit.data.video import read_frames
from vlmkit.errors import VlmkitError

SYSTEM = {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}


def _image(seed, size=(40, 48)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _question(text="What is this?", n_images=1):
    return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    paths = []
    for i in range(5):
        path = root / f"p{i}.png"
        _image(i, (40 + 8 * i, 48)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 3 s, 10 fps mpeg4 AVI whose frames grow brighter over time."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def _direct(folder, family, messages, images):
    """What plain transformers gives for the same conversation: the reference vlmkit must equal."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor.tokenizer.padding_side = "left"
    if family == "paligemma":
        text = "<image>" * len(images) + messages[-1]["content"][-1]["text"]
        inputs = processor(text=[text], images=[images], return_tensors="pt")
    else:
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        nested = family in ("smolvlm", "idefics3")
        inputs = processor(text=[text], images=[images] if nested else images, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.batch_decode(new, skip_special_tokens=True)[0].strip(), inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_and_image_tokens_equal_plain_transformers(folders, pictures, family):
    messages = [_question()] if family == "paligemma" else [SYSTEM, _question()]
    image = Image.open(pictures[1]).convert("RGB")
    expected, direct_inputs = _direct(folders[family], family, messages, [image])
    vlm = vlmkit.load(folders[family], device="cpu")
    assert vlm.generate(messages, [pictures[1]], max_new_tokens=6) == expected
    ours = vlm.engine.inputs([messages], [[pictures[1]]])
    image_id = vlm.model.config.image_token_id
    assert int((ours["input_ids"] == image_id).sum()) == int((direct_inputs["input_ids"] == image_id).sum()) > 0
    assert torch.equal(ours["input_ids"], direct_inputs["input_ids"])


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_by_one(folders, pictures, family):
    # fp32: the path that equals transformers token for token; in bf16/int8 a near tie on these random
    # weights can go another way in a batch (docs/decode.md)
    vlm = vlmkit.load(folders[family], device="cpu")
    if vlm.engine.decode != "transformers":
        vlm = vlmkit.load(folders[family], device="cpu", decode="fp32")
    prompts = ["What is this?", "Describe the picture in detail please.", "Colour?"]
    conversations = [[_question(p)] for p in prompts]
    media = [[pictures[i]] for i in range(3)]  # different sizes, so prompts differ in length
    batched = vlm.engine.generate(conversations, media, max_new_tokens=5, batch_size=3)
    single = [vlm.generate(c, m, max_new_tokens=5) for c, m in zip(conversations, media)]
    assert batched == single


@pytest.mark.parametrize("family", ["smolvlm", "qwen2_vl", "llava"])
def test_several_images_in_one_prompt(folders, pictures, family):
    vlm = vlmkit.load(folders[family], device="cpu")
    one = vlm.engine.inputs([[_question(n_images=1)]], [[pictures[0]]])["input_ids"]
    two = vlm.engine.inputs([[_question(n_images=2)]], [[pictures[0], pictures[0]]])["input_ids"]
    image_id = vlm.model.config.image_token_id
    assert int((two == image_id).sum()) == 2 * int((one == image_id).sum())
    images = [Image.open(p).convert("RGB") for p in pictures[:2]]
    expected, direct = _direct(folders[family], family, [_question(n_images=2)], images)
    ours = vlm.engine.inputs([[_question(n_images=2)]], [pictures[:2]])  # both images, in order
    assert torch.equal(ours["input_ids"], direct["input_ids"])
    assert torch.equal(ours["pixel_values"], direct["pixel_values"])
    assert vlm.generate([_question(n_images=2)], pictures[:2], max_new_tokens=6) == expected


def test_media_count_mismatch_is_one_clear_error(folders, pictures):
    vlm = vlmkit.load(folders["llava"], device="cpu")
    with pytest.raises(VlmkitError, match="2 image/video parts but 1"):
        vlm.generate([_question(n_images=2)], [pictures[0]])


@pytest.mark.parametrize("family", FAMILIES)
def test_video(folders, clip, family):
    """Native video processors get the frames as a video; the others get timestamped frames as images."""
    vlm = vlmkit.load(folders[family], device="cpu")
    frames = read_frames(clip, frames=4)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    prepared, images, videos = vlm.engine.prepare(messages, [frames])
    if family in VIDEO_FAMILIES:
        assert videos == [frames] and images == []
        inputs = vlm.engine.inputs([messages], [[frames]])
        video_keys = [k for k in inputs if "video" in k and k.startswith("pixel_values")] or ["pixel_values"]
        assert inputs[video_keys[0]].numel() > 0
        if family == "smolvlm":  # its processor writes the timestamps from our metadata
            text = vlm.processor.tokenizer.decode(inputs["input_ids"][0])
            assert all(f.label in text for f in frames), text
        else:
            assert all(f.label in vlm.engine.prompt(prepared) for f in frames)
    else:
        assert videos == [] and len(images) == 4
        texts = [p["text"] for p in prepared[0]["content"] if p["type"] == "text"]
        assert texts[:4] == [f"Frame at {f.label}: " for f in frames]
    assert isinstance(vlm.generate(messages, [frames], max_new_tokens=3), str)


def _run(capfd, *args):
    code = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return code, out, err


def test_cli_generate_with_system_and_two_images(folders, pictures, capfd):
    messages = [SYSTEM, _question("Compare them.", n_images=2)]
    images = [Image.open(p).convert("RGB") for p in pictures[:2]]
    expected, _ = _direct(folders["smolvlm"], "smolvlm", messages, images)
    code, out, err = _run(capfd, "generate", "--model", folders["smolvlm"], "--image", pictures[0], "--image", pictures[1],
                          "--system", "Be brief.", "--prompt", "Compare them.", "--max-new-tokens", 6)
    assert code == 0, err
    assert out.strip() == expected


def test_cli_messages_file(folders, pictures, capfd, tmp_path):
    conversation = [SYSTEM, {"role": "user", "content": [{"type": "image", "image": str(pictures[2])}, {"type": "text", "text": "What is this?"}]}]
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(conversation))
    code, out, err = _run(capfd, "generate", "--model", folders["qwen2_vl"], "--messages", path, "--max-new-tokens", 6)
    assert code == 0, err
    expected, _ = _direct(folders["qwen2_vl"], "qwen2_vl", [SYSTEM, _question()], [Image.open(pictures[2]).convert("RGB")])
    assert out.strip() == expected


def test_cli_generate_video_prints_frames(folders, clip, capfd):
    code, out, err = _run(capfd, "generate", "--model", folders["llava"], "--video", clip, "--frames", 3,
                          "--prompt", "What happens?", "--max-new-tokens", 3)
    assert code == 0, err
    assert "3 frames at 00:00, 00:01, 00:02" in err


def test_caption_folder_appends_resumes_and_skips_bad_files(folders, pictures, capfd, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(pictures):
        (folder / ("sub" if i % 2 else "") / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "captions.jsonl"
    vlm = vlmkit.load(folders["idefics3"], device="cpu")
    everything = sorted(p for p in folder.rglob("*.png") if p.name != "broken.png")
    expected = dict(zip(map(str, everything), vlm.caption(everything, max_new_tokens=4)))

    # a run killed after its first batch, mid-way through writing a line
    code, _, err = _run(capfd, "caption", folder, "--model", folders["idefics3"], "--output", out, "--batch-size", 2, "--max-new-tokens", 4)
    assert code == 0, err
    assert "broken.png" in err and "1 failed" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["image"]: r["caption"] for r in rows} == expected  # batched == one by one, bad file skipped
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"image": "torn')

    code, _, err = _run(capfd, "caption", folder, "--model", folders["idefics3"], "--output", out, "--batch-size", 2, "--max-new-tokens", 4)
    assert code == 0, err
    assert "2 already in" in err and "3 images done" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows].count(rows[0]["image"]) == 1 and len(rows) == 5
    assert {r["image"]: r["caption"] for r in rows} == expected


def test_ask_and_ocr_presets(folders, pictures, capfd, tmp_path):
    vlm = vlmkit.load(folders["paligemma"], device="cpu")
    code, out, err = _run(capfd, "ask", pictures[0], "what colour?", "--model", folders["paligemma"], "--max-new-tokens", 4)
    assert code == 0, err
    assert out.strip() == vlm.ask(pictures[0], "what colour?", max_new_tokens=4)
    prepared = vlm.engine.prompt(vlm.engine.prepare([_question("answer en what colour?")], [pictures[0]])[0])
    assert prepared.endswith("answer en what colour?")  # PaliGemma's task prefix

    code, out, err = _run(capfd, "ocr", pictures[0], pictures[1], "--model", folders["smolvlm"], "--output", tmp_path / "o.jsonl", "--max-new-tokens", 4)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["image"] for r in rows] == [str(pictures[0]), str(pictures[1])] and all("text" in r for r in rows)


def test_inspect_pretrained(folders, pictures, capfd):
    code, out, err = _run(capfd, "inspect", folders["qwen2_vl"], "--image", pictures[0])
    assert code == 0, err
    assert "model.visual" in out and "model.language_model" in out and "<|vision_start|>" in out
    vlm = vlmkit.load(folders["qwen2_vl"], device="cpu")
    n = int((vlm.engine.inputs([[_question("What is in the image?")]], [[pictures[0]]])["input_ids"] == vlm.model.config.image_token_id).sum())
    assert f"image tokens     {n} in the prompt" in out
    total = sum(p.numel() for p in vlm.model.parameters())
    assert f"{total:,}" in out


def test_stream_equals_generate(folders, pictures):
    vlm = vlmkit.load(folders["llava_next"], device="cpu")
    streamed = "".join(vlm.stream([_question()], [pictures[0]], max_new_tokens=6)).strip()
    assert streamed == vlm.generate([_question()], [pictures[0]], max_new_tokens=6)


def test_unknown_hub_id_offline_is_one_clear_error(capfd, pictures):
    code, _, err = _run(capfd, "caption", pictures[0], "--model", "no-such-org/no-such-vlm")
    assert code == 2
    assert "no-such-org/no-such-vlm" in err and "local folder" in err and "Traceback" not in err


def test_chat_with_a_pretrained_model_keeps_images_and_video(folders, pictures, clip):
    """Scripted `vlmkit chat`: an image, then a video in a later turn; every turn sees all earlier media."""
    import io

    from vlmkit.infer.chat import chat_loop

    vlm = vlmkit.load(folders["qwen2_vl"], device="cpu")
    seen = []

    class Recorder:
        def stream(self, messages, media, **kwargs):
            seen.append((messages, list(media)))
            return vlm.engine.stream(messages, media, **kwargs)

    lines = iter([f"/image {pictures[0]}", "What is it?", f"/video {clip}", "And now?", "/quit"])
    out = io.StringIO()
    chat_loop(Recorder(), max_new_tokens=3, input_fn=lambda _: next(lines), output=out)
    assert len(seen) == 2
    messages, media = seen[1]
    kinds = [p["type"] for m in messages for p in m["content"] if p["type"] != "text"]
    assert kinds == ["image", "video"] and len(media) == 2 and isinstance(media[1], list)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert "error" not in out.getvalue()


def test_inspect_counts_what_training_would_train(folders, capfd):
    code, out, err = _run(capfd, "inspect", folders["llava"])
    assert code == 0, err
    rows = {line.split("  ")[1].strip(): line.split() for line in out.splitlines() if line.startswith("  vision tower") or
            line.startswith("  projector") or line.startswith("  language")}
    vlm = vlmkit.load(folders["llava"], device="cpu")
    tower = sum(p.numel() for p in vlm.model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in vlm.model.model.multi_modal_projector.parameters())
    assert rows["vision tower"][2:4] == [f"{tower:,}", "0"]  # frozen by default
    assert rows["projector"][1:3] == [f"{projector:,}", f"{projector:,}"]

"""Fine-tuning pretrained VLMs (model=M): every family, full and LoRA, exact loss masks, gradient
checkpointing, resume, and the --dry-run memory plan."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlmkit
from tiny_vlms import FAMILIES
from vlmkit.cli import main
from vlmkit.config import load_config
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.template import TemplateRenderer
from vlmkit.errors import VlmkitError
from vlmkit.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Multi-turn shapes data, and a single-turn set (PaliGemma trains on one question per image)."""
    from vlmkit.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    multi = make_shapes_dataset(root, "multi", 8, seed=0, questions_per_image=2)
    single = make_shapes_dataset(root, "single", 8, seed=0, questions_per_image=1, captions=False)
    return {"multi": multi, "single": single}


def _cfg(folder, data_file, out, *extra):
    overrides = [f"model={folder}", "method=full", "max_steps=6", "batch_size=4", "lr=3e-3", "projector_lr=3e-3", "save_every=0", *extra]
    return load_config(None, overrides, data=str(data_file), output=str(out))


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "history.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_saves_and_reloads(folders, data, tmp_path, family, method):
    data_file = data["single" if family == "paligemma" else "multi"]
    out = tmp_path / "run"
    # tiny adapters on a random model need big and more steps
    extra = ["lr=3e-2", "max_steps=16", "lora_targets=all"] if method == "lora" else ["lr=3e-3", "max_steps=8"]
    summary = train(_cfg(folders[family], data_file, out, f"method={method}", *extra))
    losses = _losses(out)
    # the two batches alternate, so compare the same pair of batches at the start and at the end
    assert sum(losses[-2:]) < sum(losses[:2]) * (0.9 if method == "full" else 0.99), losses
    # the saved folder is a plain transformers checkpoint of the same family (LoRA merged in)
    # full: a plain transformers checkpoint of the same family; LoRA: an adapter on the base (merged on load)
    saved = out / "model" / ("config.json" if method == "full" else "vlmkit_adapter.json")
    assert json.loads(saved.read_text())["model_type"] == json.loads(open(f"{folders[family]}/config.json").read())["model_type"]
    vlm = vlmkit.load(summary["model"], device="cpu")
    assert not any("lora" in n for n, _ in vlm.model.named_parameters())
    base_model = vlmkit.load(folders[family], device="cpu").model
    trained, base = vlm.model.state_dict(), base_model.state_dict()
    attention = [k for k in base if k.endswith("q_proj.weight") and "vision" not in k and "visual" not in k]
    assert attention and all(not torch.equal(trained[k], base[k]) for k in attention)  # the LM itself moved
    vision = [k for k in base if ("vision" in k or "visual" in k) and "merger" not in k]
    assert vision and all(torch.equal(trained[k], base[k]) for k in vision)  # the frozen tower did not
    from vlmkit.data.schema import load_samples

    sample = load_samples(data_file)[0]
    messages = [sample.messages[0]]
    reply = vlm.generate(messages, [sample.images[0]], max_new_tokens=4)
    base = vlmkit.load(folders[family], device="cpu").generate(messages, [sample.images[0]], max_new_tokens=4)
    assert isinstance(reply, str) and (reply != base or method == "lora")


@pytest.mark.parametrize("family", ["smolvlm", "qwen2_vl", "llava_next"])
def test_labels_are_exactly_the_assistant_turns(folders, data, family):
    from transformers import AutoProcessor

    from vlmkit.data.schema import load_samples
    from vlmkit.model.families import family_of

    processor = AutoProcessor.from_pretrained(folders[family])
    model_type = json.loads(open(f"{folders[family]}/config.json").read())["model_type"]
    sample = load_samples(data["multi"])[0]
    example = TemplateRenderer(processor, family_of(model_type)).render(sample.messages, list(sample.images), sample.where)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(example.input_ids, example.labels))
    text = processor.tokenizer.decode(trained)
    answers = [p["text"] for m in sample.messages if m["role"] == "assistant" for p in m["content"] if p["type"] == "text"]
    questions = [p["text"] for m in sample.messages if m["role"] == "user" for p in m["content"] if p["type"] == "text"]
    for answer in answers:
        assert answer in text
    assert not any(q in text for q in questions)
    # every trained span starts right after the generation prompt: nothing of the answer is left untrained
    assert len(trained) >= sum(len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)


def test_gradient_checkpointing_gives_the_same_gradients(folders, data, tmp_path):
    from vlmkit.data.schema import load_samples
    from vlmkit.data.collate import tokenize
    from vlmkit.model.families import family_of
    from vlmkit.model.pretrained import load_pretrained

    grads = []
    for checkpointing in (False, True):
        model, processor = load_pretrained(folders["qwen2_vl"])
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        renderer = TemplateRenderer(processor, family_of("qwen2_vl"))
        examples, _ = tokenize(load_samples(data["multi"])[:2], renderer, 512)
        loss = model(**renderer.collate(examples)).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_lora_resume_of_a_pretrained_model_is_exact(folders, data, tmp_path):
    whole = train(_cfg(folders["llava"], data["multi"], tmp_path / "a", "method=lora", "max_steps=6"))
    cut = _cfg(folders["llava"], data["multi"], tmp_path / "b", "method=lora", "max_steps=6")
    assert train(cut, stop_after=3) == {"stopped_at": 3}
    resumed = train(cut, resume=True)
    a = vlmkit.load(whole["model"], device="cpu").model.state_dict()
    b = vlmkit.load(resumed["model"], device="cpu").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_paligemma_refuses_multi_turn_data_clearly(folders, data, tmp_path):
    with pytest.raises(VlmkitError, match="multi.jsonl:1: paligemma models train on one user turn"):
        train(_cfg(folders["paligemma"], data["multi"], tmp_path / "run"))


def test_dry_run_prints_the_plan_and_writes_nothing(folders, tmp_path, capfd):
    out = tmp_path / "run"
    code = main(["train", "--dry-run", "--output", str(out), f"model={folders['qwen2_vl']}", "method=lora", "lora_targets=all", "batch_size=4"])
    printed, err = capfd.readouterr()
    assert code == 0, err
    assert "plan: lora (r=16), batch 4 x 512 tokens" in printed and "LoRA on:" in printed and "total" in printed
    assert not out.exists()
    model = vlmkit.load(folders["qwen2_vl"], device="cpu").model
    lm = model.model.language_model
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapters = sum(16 * (m.in_features + m.out_features) for n, m in lm.named_modules() if n.rsplit(".", 1)[-1] in targets)
    total = sum(p.numel() for p in model.parameters()) + adapters
    assert re.search(rf"^total\s+{total / 1e3:.2f}K\s", printed, re.M), printed


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_qlora_trains_a_pretrained_model(folders, data, tmp_path, family):
    from vlmkit.model.quantize import qlora_available

    if qlora_available() is not None:
        pytest.skip(qlora_available())
    out = tmp_path / "run"
    summary = train(_cfg(folders[family], data["multi"], out, "method=qlora", "lr=3e-2", "max_steps=12", "gradient_checkpointing=true"))
    losses = _losses(out)
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    assert (out / "model" / "vlmkit_adapter.json").is_file()
    vlm = vlmkit.load(summary["model"], device="cpu")  # the adapter merged into the full-precision base
    assert isinstance(vlm.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]}],
                                   [data["multi"].parent / "images" / "multi_00000.png"], max_new_tokens=3), str)


def test_qlora_of_a_composed_model_saves_a_dequantized_merge(parts, shapes, tmp_path):
    from vlmkit.model.quantize import qlora_available

    if qlora_available() is not None:
        pytest.skip(qlora_available())
    train_file, _ = shapes
    out = tmp_path / "run"
    cfg = load_config(None, [f"vision={parts['clip']}", f"llm={parts['llama']}", "method=qlora", "max_steps=6", "batch_size=4",
                             "lr=3e-2", "save_every=0"], data=str(train_file), output=str(out))
    summary = train(cfg)
    model = vlmkit.load(summary["model"], device="cpu").model
    assert not any("lora" in n or "absmax" in n for n in model.state_dict())
    assert "quantization_config" not in json.loads((out / "model" / "config.json").read_text())


def test_lora_run_saves_a_small_adapter_that_loads_and_merges(folders, data, tmp_path, capfd):
    out = tmp_path / "run"
    summary = train(_cfg(folders["qwen2_vl"], data["multi"], out, "method=lora", "lr=3e-2"))
    adapter = out / "model"
    assert (adapter / "vlmkit_adapter.json").is_file() and not (adapter / "model.safetensors").exists()
    base_bytes = (Path(folders["qwen2_vl"]) / "model.safetensors").stat().st_size
    assert (adapter / "adapter.safetensors").stat().st_size < base_bytes

    from vlmkit.data.schema import load_samples

    sample = load_samples(data["multi"])[1]
    messages, image = [sample.messages[0]], sample.images[0]
    via_adapter = vlmkit.load(summary["model"], device="cpu").generate(messages, [image], max_new_tokens=6)

    merged = tmp_path / "merged"
    code = main(["merge", str(out), str(merged)])
    printed, err = capfd.readouterr()
    assert code == 0, err
    assert printed.strip() == str(merged)
    assert vlmkit.load(str(merged), device="cpu").generate(messages, [image], max_new_tokens=6) == via_adapter

    # plain transformers, with peft made unimportable, loads the merged folder and gives the same reply
    script = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForImageTextToText, AutoProcessor\n"
        f"m = AutoModelForImageTextToText.from_pretrained({str(merged)!r}); p = AutoProcessor.from_pretrained({str(merged)!r})\n"
        "print(type(m).__name__, p.chat_template is not None, (m.generation_config.eos_token_id is not None))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["Qwen2VLForConditionalGeneration", "True", "True"]


def test_merge_refuses_a_folder_that_is_not_an_adapter(folders, capfd):
    code = main(["merge", folders["llava"], "/tmp/never-written"])
    _, err = capfd.readouterr()
    assert code == 2 and "not a LoRA adapter folder" in err
    assert not Path("/tmp/never-written").exists()


# -- DPO ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preferences(data, tmp_path_factory):
    """Preference pairs from the shapes data: the right answer chosen, a wrong one rejected. The
    conversational form for one file, TRL's plain form (strings + images) for the other."""
    from vlmkit.data.schema import load_samples

    root = tmp_path_factory.mktemp("prefs")
    chat, plain = [], []
    for sample in load_samples(data["single"]):
        question = next(p["text"] for p in sample.messages[0]["content"] if p["type"] == "text")
        answer = sample.messages[1]["content"][0]["text"]
        wrong = "no" if answer == "yes" else "yes" if answer == "no" else "purple" if answer != "purple" else "red"
        image = str(sample.images[0])
        chat.append({"images": [image], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                     "chosen": [{"role": "assistant", "content": answer}], "rejected": [{"role": "assistant", "content": wrong}]})
        plain.append({"images": [image], "prompt": question, "chosen": answer, "rejected": wrong})
    files = {}
    for name, rows in (("chat", chat), ("plain", plain)):
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def _dpo_history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def test_dpo_full_on_a_composed_model(parts, preferences, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, [f"vision={parts['clip']}", f"llm={parts['llama']}", "method=dpo", "beta=0.5", "max_steps=8",
                             "batch_size=4", "lr=1e-3", "projector_lr=1e-3", "save_every=0", "warmup_ratio=0",
                             "precision=fp32"], data=str(preferences["chat"]), output=str(out))
    train(cfg)
    history = _dpo_history(out)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as the reference
    assert history[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert history[-1]["rewards/margins"] > 0.5 and history[-1]["rewards/accuracy"] == 1.0
    assert history[-1]["loss"] < 0.5 * math.log(2)
    assert (out / "ref_logps.pt").is_file() and (out / "model" / "config.json").is_file()


def test_dpo_lora_on_a_pretrained_model_resumes_exactly(folders, preferences, tmp_path):
    args = [f"model={folders['qwen2_vl']}", "method=dpo", "lora_r=8", "lora_targets=all", "beta=0.5", "max_steps=6", "batch_size=4",
            "lr=3e-2", "projector_lr=3e-3", "save_every=0", "warmup_ratio=0", "precision=fp32"]
    whole = train(load_config(None, args, data=str(preferences["plain"]), output=str(tmp_path / "a")))
    history = _dpo_history(tmp_path / "a")
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] + 0.1
    assert (tmp_path / "a" / "model" / "vlmkit_adapter.json").is_file()

    cut = load_config(None, args, data=str(preferences["plain"]), output=str(tmp_path / "b"))
    assert train(cut, stop_after=3) == {"stopped_at": 3}
    resumed = train(cut, resume=True)
    a = vlmkit.load(whole["model"], device="cpu").model.state_dict()
    b = vlmkit.load(resumed["model"], device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _dpo_history(tmp_path / "b")[-1]["loss"] == pytest.approx(history[-1]["loss"], abs=1e-6)


def test_dpo_on_chat_data_says_what_it_expects(folders, data, tmp_path):
    with pytest.raises(VlmkitError, match="field `prompt`: missing"):
        train(_cfg(folders["llava"], data["multi"], tmp_path / "run", "method=dpo"))


def test_data_check_renders_with_a_pretrained_models_template(folders, data, capfd):
    code = main(["data", "check", str(data["multi"]), "--model", folders["qwen2_vl"]])
    out, err = capfd.readouterr()
    assert code == 0, err
    assert f"the processor and chat template of {folders['qwen2_vl']} (qwen2-vl)" in out
    assert "<|im_start|>assistant\n[[" in out  # the answer right after the generation prompt is trained
    from vlmkit.data.schema import load_samples

    sample = load_samples(data["multi"])[0]
    answer = sample.messages[1]["content"][0]["text"]
    question = next(p["text"] for p in sample.messages[0]["content"] if p["type"] == "text")
    assert f"[[{answer}<|im_end|>" in out and f"[[{question}" not in out


def test_lora_targets_and_qlora_resume(folders, data, tmp_path):
    """User-chosen LoRA layers reach the adapter; a QLoRA run killed and resumed equals an uninterrupted one;
    `--model RUN` (the run folder) loads the adapter."""
    from vlmkit.model.quantize import qlora_available

    args = ["method=qlora" if qlora_available() is None else "method=lora", "lora_targets=q_proj,v_proj", "lr=3e-2", "max_steps=4"]
    train(_cfg(folders["llava"], data["multi"], tmp_path / "a", *args))
    meta = json.loads((tmp_path / "a" / "model" / "vlmkit_adapter.json").read_text())
    assert meta["target_modules"] == ["q_proj", "v_proj"]
    cut = _cfg(folders["llava"], data["multi"], tmp_path / "b", *args)
    assert train(cut, stop_after=2) == {"stopped_at": 2}
    train(cut, resume=True)
    a = vlmkit.load(str(tmp_path / "a"), device="cpu").model.state_dict()  # the run folder
    b = vlmkit.load(str(tmp_path / "b" / "model"), device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(VlmkitError, match="lora_targets.*nope_proj"):
        train(_cfg(folders["llava"], data["multi"], tmp_path / "c", "method=lora", "lora_targets=q_proj,nope_proj"))


def test_a_generation_prompt_ending_with_a_space_trains_on_what_inference_sees(folders, data, tmp_path):
    """Older LLaVA-style templates end the generation prompt with a space ("ASSISTANT: "), which the whole
    conversation merges into the answer's first token, so the turn-by-turn mask cannot be located. The
    example is then the prompt exactly as inference tokenizes it, followed by the answer's tokens."""
    import shutil

    from transformers import AutoProcessor

    from vlmkit.data.collate import tokenize
    from vlmkit.data.images import load_image
    from vlmkit.data.schema import load_samples
    from vlmkit.model.families import family_of

    folder = tmp_path / "llava-space"
    shutil.copytree(folders["llava"], folder)
    processor = AutoProcessor.from_pretrained(folder)
    assert "'ASSISTANT:'" in processor.chat_template
    processor.chat_template = processor.chat_template.replace("'ASSISTANT:'", "'ASSISTANT: '")
    processor.save_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder)

    renderer = TemplateRenderer(processor, family_of("llava"))
    samples = load_samples(data["single"])
    sample = samples[0]
    example = renderer.render(sample.messages, list(sample.images), sample.where)
    assert example.completion  # the turn-by-turn render was not token-aligned
    prompt = processor.apply_chat_template(sample.messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("ASSISTANT: ")
    prompt_ids = processor(text=[prompt], images=[load_image(sample.images[0])], return_tensors="pt")["input_ids"][0].tolist()
    assert example.input_ids[: len(prompt_ids)] == prompt_ids  # what generation feeds the model
    answer = sample.messages[1]["content"][0]["text"]
    trained = processor.tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert trained.strip() == answer and example.labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)

    examples, _ = tokenize(samples[:3], renderer, 512)  # a batch of such rows pads and keeps every label
    batch = renderer.collate(examples)
    for row, e in enumerate(examples):
        assert batch["input_ids"][row, : e.length].tolist() == e.input_ids
        assert batch["attention_mask"][row].sum() == e.length
    out = tmp_path / "run"
    train(_cfg(folder, data["single"], out, "max_steps=2", "batch_size=2"))
    assert (out / "model" / "config.json").is_file()

"""DPO: the loss against its closed form, log-probs against a hand loop, preference data parsing, and
training on a tiny composed VLM with a frozen reference copy or with LoRA's base weights as reference."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from vlmkit.data.images import load_image
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.errors import VlmkitError
from vlmkit.model.build import compose
from vlmkit.train.dpo import (
    adapters_disabled,
    collate_pairs,
    concat_pairs,
    dpo_loss,
    dpo_step_loss,
    load_preferences,
    read_preferences,
    reference_logps,
    sequence_logps,
    tokenize_pair,
)

# ------------------------------------------------------------------------------------------ the maths


def test_dpo_loss_matches_the_closed_form():
    pc = [-3.0, -10.0, -1.5, -7.25]
    pr = [-4.0, -8.0, -6.0, -7.0]
    rc = [-3.5, -9.0, -2.0, -7.0]
    rr = [-3.0, -9.5, -5.0, -7.5]
    for beta in (0.1, 0.5, 2.0):
        rewards_c = [beta * (a - b) for a, b in zip(pc, rc)]
        rewards_r = [beta * (a - b) for a, b in zip(pr, rr)]
        expected = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(rewards_c, rewards_r)) / len(pc)
        loss, m = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)), beta=beta)
        assert loss.item() == pytest.approx(expected, rel=1e-12)
        assert m["rewards/chosen"] == pytest.approx(sum(rewards_c) / 4)
        assert m["rewards/rejected"] == pytest.approx(sum(rewards_r) / 4)
        assert m["rewards/margins"] == pytest.approx((sum(rewards_c) - sum(rewards_r)) / 4)
        assert m["rewards/accuracy"] == sum(c > r for c, r in zip(rewards_c, rewards_r)) / 4
    # the numbers above are chosen so that accuracy is informative: pairs 0 and 2 win, 1 and 3 lose
    assert dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=1.0)[1]["rewards/accuracy"] == 0.5
    # identical policy and reference: every pair is a coin flip
    same = torch.tensor([-2.0, -5.0])
    assert dpo_loss(same, same - 1, same, same - 1, beta=0.3)[0].item() == pytest.approx(math.log(2))


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = torch.tensor([-2.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    loss, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.25) and pr.grad.item() == pytest.approx(0.25)  # -beta * sigmoid(0)


def test_sequence_logps_matches_a_hand_loop():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :4] = IGNORE_INDEX
    labels[1, ::2] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # nothing labelled: 0
    expected = torch.zeros(3)
    for b in range(3):
        for t in range(1, 7):
            if labels[b, t] != IGNORE_INDEX:
                expected[b] += torch.log_softmax(logits[b, t - 1], dim=-1)[labels[b, t]]
    got = sequence_logps(logits, labels)
    assert got.shape == (3,)
    assert torch.allclose(got, expected, atol=1e-5)
    assert got[2] == 0 and got[0] != 0 and got[1] != 0
    # the label at position 0 is never scored (nothing predicts it)
    shifted = labels.clone()
    shifted[:, 0] = 5
    assert torch.equal(sequence_logps(logits, shifted), got)


# ------------------------------------------------------------------------------------------ data


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def images(tmp_path):
    (tmp_path / "imgs").mkdir()
    for name, colour in (("red.png", "red"), ("blue.png", "blue"), ("green.png", "green")):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "imgs" / name)
    return tmp_path


def _conversational(question, good, bad, image):
    return {
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "chosen": [{"role": "assistant", "content": good}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": bad}]}],
        "images": [image],
    }


def test_both_formats_load_to_the_same_pair(images):
    path = _write(images / "prefs.jsonl", [
        _conversational("What colour is the circle?", "red", "blue", "imgs/red.png"),
        {"prompt": "What colour is the circle?", "chosen": "red", "rejected": "blue", "images": ["imgs/red.png"]},
        {"prompt": "Hello world", "chosen": "yes", "rejected": "no"},  # plain, no image
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Is there a triangle?"},
                {"role": "assistant", "content": "no"},
                {"role": "user", "content": [{"type": "image", "image": "imgs/blue.png"}, {"type": "text", "text": "And here?"}]},
            ],
            "chosen": [{"role": "assistant", "content": "yes"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
    ])
    a, b, c, d = load_preferences(path)
    assert (a.prompt, a.chosen, a.rejected, a.images) == (b.prompt, b.chosen, b.rejected, b.images)
    assert a.prompt == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]
    assert a.chosen == [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    assert a.images == ((images / "imgs" / "red.png").resolve(),)
    assert (a.where, b.where) == (f"{path}:1", f"{path}:2")
    assert c.images == () and c.prompt == [{"role": "user", "content": [{"type": "text", "text": "Hello world"}]}]
    assert [m["role"] for m in d.prompt] == ["system", "user", "assistant", "user"]
    assert d.images == ((images / "imgs" / "blue.png").resolve(),)


def test_bad_rows_are_all_reported_with_file_line_and_field(images):
    good = _conversational("What colour?", "red", "blue", "imgs/red.png")
    path = _write(images / "bad.jsonl", [
        good,
        {"prompt": "What colour?", "chosen": "red"},                                       # 2: rejected missing
        {"prompt": "What colour?", "chosen": 3, "rejected": "blue"},                       # 3: wrong type
        {**good, "images": ["imgs/missing.png"]},                                          # 4: missing image
        {**good, "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]},  # 5
        {**good, "rejected": [{"role": "user", "content": "blue"}]},                       # 6: reply not assistant
        {**good, "prompt": [{"role": "user", "content": [{"type": "txt", "text": "x"}]}]},  # 7: bad part type
        "{not json",                                                                        # 8
        {"prompt": {"text": "x"}, "chosen": "a", "rejected": "b"},                         # 9: prompt an object
        {**good, "images": ["imgs/red.png", "imgs/blue.png"]},                             # 10: 2 images, 1 slot
        {"prompt": "Q", "chosen": "a", "rejected": "b", "images": ["imgs/nope.png"]},      # 11: plain, missing image
        {**good, "chosen": [{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "red"}]}]},
    ])
    samples, problems = read_preferences(path)
    assert [s.line for s in samples] == [1]
    by_line = {}
    for p in problems:
        assert "\n" not in p and p.startswith(f"{path}:"), p
        by_line.setdefault(int(p[len(str(path)) + 1 :].split(":")[0]), []).append(p)
    assert sorted(by_line) == list(range(2, 13))
    expect = {
        2: "field `rejected`: missing",
        3: "field `chosen`: expected a string or a list",
        4: "missing.png not found",
        5: "field `chosen`: has 2 messages",
        6: "field `rejected[0].role`",
        7: "field `prompt[0].content[0].type`",
        8: "invalid JSON",
        9: "field `prompt`: expected a string or a list",
        10: "field `images`: 2 image(s) listed but 1",
        11: "field `images[0]`",
        12: "field `chosen[0].content`: has an image part",
    }
    for line, text in expect.items():
        assert any(text in p for p in by_line[line]), (line, by_line[line])
    assert "nope.png not found" in by_line[11][0]
    with pytest.raises(VlmkitError) as err:
        load_preferences(path)
    listed = str(err.value).splitlines()
    assert listed == problems  # one error listing every problem


def test_empty_or_missing_file(tmp_path):
    with pytest.raises(VlmkitError, match="not found"):
        load_preferences(tmp_path / "nope.jsonl")
    with pytest.raises(VlmkitError, match="empty"):
        load_preferences(_write(tmp_path / "empty.jsonl", []))


# ------------------------------------------------------------------------------------------ tiny VLM

PAIRS = [
    ("What colour is the circle?", "red", "blue", "imgs/red.png"),
    ("What colour is the square?", "blue", "green yellow", "imgs/blue.png"),
    ("What shape is there?", "a green circle", "a triangle", "imgs/green.png"),
]


@pytest.fixture
def tiny(parts, images):
    model, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    path = _write(images / "prefs.jsonl", [_conversational(*p) for p in PAIRS])
    pairs = [tokenize_pair(s, processor, max_length=64) for s in load_preferences(path)]

    def pixels(paths):
        return {"pixel_values": processor.pixel_values([load_image(p) for p in paths])}

    batch = collate_pairs(pairs, processor.tokenizer.pad_token_id, pixels)
    return model, processor, pairs, batch


def test_tokenize_pair_labels_only_the_response(tiny):
    _, processor, pairs, batch = tiny
    tok = processor.tokenizer
    for pair, (_, good, bad, _) in zip(pairs, PAIRS):
        assert tok.decode([i for i, l in zip(pair.chosen_ids, pair.chosen_labels) if l != IGNORE_INDEX]) == good + "<|im_end|>"
        assert tok.decode([i for i, l in zip(pair.rejected_ids, pair.rejected_labels) if l != IGNORE_INDEX]) == bad + "<|im_end|>"
        assert pair.chosen_ids.count(processor.image_token_id) == 4
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    assert batch["pixel_values"].shape[0] == len(PAIRS)  # images once per pair
    inputs, labels = concat_pairs(batch)
    assert inputs["input_ids"].shape[0] == labels.shape[0] == inputs["pixel_values"].shape[0] == 2 * len(PAIRS)


def test_tokenize_pair_masks_earlier_assistant_turns_and_checks_length(parts, images):
    _, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    path = _write(images / "multi.jsonl", [{
        "prompt": [{"role": "user", "content": "Is there a triangle?"}, {"role": "assistant", "content": "no"},
                   {"role": "user", "content": "And a circle?"}],
        "chosen": "yes", "rejected": "no",
    }])
    (sample,) = load_preferences(path)
    pair = tokenize_pair(sample, processor, max_length=64)
    trained = processor.tokenizer.decode([i for i, l in zip(pair.rejected_ids, pair.rejected_labels) if l != IGNORE_INDEX])
    assert trained == "no<|im_end|>"  # only the reply, not the "no" earlier in the prompt
    with pytest.raises(VlmkitError, match=r"multi\.jsonl:1: .*max_length=5"):
        tokenize_pair(sample, processor, max_length=5)


def _train(model, batch, ref_model, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    history = []
    for _ in range(steps):
        loss, metrics = dpo_step_loss(model, batch, ref_model=ref_model, beta=0.5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((loss.item(), metrics))
    return history


def test_dpo_with_a_reference_copy_learns_the_preference(tiny):
    model, _, _, batch = tiny
    torch.manual_seed(0)
    ref = copy.deepcopy(model).requires_grad_(False)
    model.requires_grad_(False)
    for part in (model.projector, model.language_model):
        part.requires_grad_(True)
    model.train()
    history = _train(model, batch, ref, steps=8, lr=3e-3)
    loss0, m0 = history[0]
    assert loss0 == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert m0["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        loss, m = dpo_step_loss(model, batch, ref_model=ref, beta=0.5)
    assert m["rewards/accuracy"] == 1.0
    assert m["rewards/margins"] > history[1][1]["rewards/margins"] > 0
    assert loss.item() < 0.5 * math.log(2)
    # the policy's LM moved, the reference copy did not
    q_proj = "language_model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ref.state_dict()[q_proj], model.state_dict()[q_proj])


def test_dpo_with_lora_uses_the_base_model_as_reference(tiny):
    from vlmkit.train.lora import add_lora

    model, _, _, batch = tiny
    base = copy.deepcopy(model).eval()
    inputs, labels = concat_pairs(batch)
    with torch.no_grad():
        base_logps = sequence_logps(base(**inputs).logits, labels)

    model.requires_grad_(False)
    lora_params = add_lora(model, SimpleNamespace(lora_r=8, lora_alpha=16, lora_dropout=0.0))
    for p in lora_params:
        p.requires_grad_(True)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    model.train()

    with torch.no_grad():
        ref0 = reference_logps(model, inputs, labels)  # ref_model=None: adapters switched off
        policy0 = sequence_logps(model(**inputs).logits, labels)
    assert torch.allclose(ref0, policy0, atol=1e-5)  # LoRA B starts at zero
    assert torch.allclose(ref0, base_logps, atol=1e-5)

    history = _train(model, batch, None, steps=6, lr=1e-2)
    assert history[0][0] == pytest.approx(math.log(2), abs=1e-6)
    with torch.no_grad():
        ref = reference_logps(model, inputs, labels)
        policy = sequence_logps(model(**inputs).logits, labels)
    assert torch.allclose(ref, base_logps, atol=1e-4)  # the reference is still the base model
    assert (policy - ref).abs().max() > 0.05  # while the policy has moved
    assert history[-1][1]["rewards/margins"] > history[1][1]["rewards/margins"]
    # switching the adapters off and on left the trainable set exactly as it was
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == frozen
    assert all(p.requires_grad for p in lora_params)
    assert not any(m.disable_adapters for m in model.modules() if hasattr(m, "lora_A"))
    # ... also when adapters were frozen (peft's re-enable would mark them trainable again)
    for p in lora_params:
        p.requires_grad_(False)
    reference_logps(model, inputs, labels)
    assert not any(p.requires_grad for p in lora_params)


def test_no_reference_and_no_adapters_is_an_error(tiny):
    model, _, _, batch = tiny
    with pytest.raises(VlmkitError, match="reference"):
        dpo_step_loss(model, batch)


def test_adapters_disabled_on_a_peft_model(parts):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(parts["llama"])
    ids = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        base = lm(input_ids=ids).logits
    peft_model = get_peft_model(lm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with adapters_disabled(peft_model):
            off = peft_model(input_ids=ids).logits
        again = peft_model(input_ids=ids).logits
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert torch.allclose(off, base, atol=1e-5)
    assert torch.equal(again, adapted)

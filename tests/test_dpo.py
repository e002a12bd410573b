"""DPO: the loss against its closed form, log-probs against a hand loop, preference data parsing, pair
tokenization, and DPO steps on a tiny composed VLM against its starting model's log-probs."""

import json
import math

import pytest
import torch
from PIL import Image

from vlmkit.build import compose
from vlmkit.data.collate import ComposedRenderer
from vlmkit.data.images import load_image
from vlmkit.data.preferences import collate_pairs, load_preferences, read_preferences, tokenize_pairs
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.errors import VlmkitError
from vlmkit.train.dpo import dpo_loss, dpo_step_loss, sequence_logps

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
    renderer = ComposedRenderer(processor)
    path = _write(images / "prefs.jsonl", [_conversational(*p) for p in PAIRS])
    pairs = tokenize_pairs(load_preferences(path), renderer, max_length=64)

    def pixels(paths):
        return {"pixel_values": processor.pixel_values([load_image(p) for p in paths])}

    batch = collate_pairs(pairs, renderer, pixels)
    return model, processor, pairs, batch


def test_tokenize_pairs_labels_only_the_response(tiny):
    _, processor, pairs, batch = tiny
    tok = processor.tokenizer
    for pair, (_, good, bad, _) in zip(pairs, PAIRS):
        for side, reply in ((pair.chosen, good), (pair.rejected, bad)):
            assert tok.decode([i for i, l in zip(side.input_ids, side.labels) if l != IGNORE_INDEX]) == reply + "<|im_end|>"
            assert side.input_ids.count(processor.image_token_id) == 4
    inputs, labels = batch["pair_inputs"], batch["pair_labels"]
    assert inputs["input_ids"].shape == labels.shape and labels.shape[0] == 2 * len(PAIRS)  # chosen rows, then rejected
    assert inputs["pixel_values"].shape[0] == 2 * len(PAIRS)  # each row's image


def test_tokenize_pairs_masks_earlier_assistant_turns_and_checks_length(parts, images):
    _, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    path = _write(images / "multi.jsonl", [{
        "prompt": [{"role": "user", "content": "Is there a triangle?"}, {"role": "assistant", "content": "no"},
                   {"role": "user", "content": "And a circle?"}],
        "chosen": "yes", "rejected": "no",
    }])
    (sample,) = load_preferences(path)
    (pair,) = tokenize_pairs([sample], ComposedRenderer(processor), max_length=64)
    trained = processor.tokenizer.decode([i for i, l in zip(pair.rejected.input_ids, pair.rejected.labels) if l != IGNORE_INDEX])
    assert trained == "no<|im_end|>"  # only the reply, not the "no" earlier in the prompt
    with pytest.raises(VlmkitError, match=r"multi\.jsonl:1: the chosen reply: .*max_length=5"):
        tokenize_pairs([sample], ComposedRenderer(processor), max_length=5)


def test_dpo_steps_against_the_starting_models_log_probs_learn_the_preference(tiny):
    """The loop's path: reference log-probs of the starting model, computed once, then DPO steps."""
    model, _, _, batch = tiny
    model.eval()  # dropout off: the reference and the first policy pass are the same computation
    with torch.no_grad():
        ref = sequence_logps(model(**batch["pair_inputs"]).logits, batch["pair_labels"])
    n = len(PAIRS)
    batch = {**batch, "ref_chosen_logps": ref[:n], "ref_rejected_logps": ref[n:]}
    model.requires_grad_(False)
    for part in (model.projector, model.language_model):
        part.requires_grad_(True)
    q_proj = "language_model.model.layers.0.self_attn.q_proj.weight"
    start = model.state_dict()[q_proj].clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    history = []
    for _ in range(8):
        loss, metrics = dpo_step_loss(model, batch, beta=0.5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append((loss.item(), metrics))
    loss0, m0 = history[0]
    assert loss0 == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    assert m0["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        loss, m = dpo_step_loss(model, batch, beta=0.5)
    assert m["rewards/accuracy"] == 1.0
    assert m["rewards/margins"] > history[1][1]["rewards/margins"] > 0
    assert loss.item() < 0.5 * math.log(2)
    assert not torch.equal(start, model.state_dict()[q_proj])  # the LM moved

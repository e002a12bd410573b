"""Training on tiny random parts: loss falls, resume is exact, the saved model reloads identically."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from vlmkit.config import load_config
from vlmkit.data.collate import ComposedRenderer, tokenize
from vlmkit.data.images import load_image
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.schema import Sample, load_samples
from vlmkit.errors import VlmkitError
from vlmkit.build import compose, load_model
from vlmkit.train.average import WeightAverage
from vlmkit.train.loop import train


def tiny_config(parts, shapes, out, *extra, lm="llama"):
    train_file, test_file = shapes
    overrides = [
        f"vision={parts['clip']}", f"llm={parts[lm]}", "method=full", "image_tokens=4", "batch_size=4", "max_steps=8",
        "projector_init=random", "group_by_length=false", "train_on_prompt=false",
        "lr=3e-3", "projector_lr=3e-3", "save_every=2", "precision=fp32", *extra,
    ]
    return load_config(None, overrides, data=str(train_file), eval_data=str(test_file), output=str(out))


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_loss_falls_and_model_reloads(parts, shapes, tmp_path, lm):
    cfg = tiny_config(parts, shapes, tmp_path / "run", "max_steps=20", "lr=1e-2", "warmup_ratio=0", lm=lm)
    summary = train(cfg)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    for name in ("loss.png", "config.yaml", "train_summary.json"):
        assert (tmp_path / "run" / name).is_file()
    assert list((tmp_path / "run" / "logs").glob("events.out.tfevents.*"))
    assert not (tmp_path / "run" / "checkpoint").exists()
    # saved files get the umask's permissions (transformers writes weights through a 0600 temp file)
    mask = os.umask(0)
    os.umask(mask)
    for saved in (tmp_path / "run" / "model").iterdir():
        assert saved.stat().st_mode & 0o777 == 0o666 & ~mask, saved.name

    model, processor = load_model(summary["model"])
    # projector inputs are standardised with the training images' statistics, outputs scaled to text norm
    assert model.feature_mean.abs().sum() > 0 and not torch.equal(model.feature_std, torch.ones_like(model.feature_std))
    embeds = model.project(torch.randn(3, 2, 2, model.feature_mean.shape[0]))
    assert torch.allclose(embeds.norm(dim=-1), torch.full(embeds.shape[:2], model.config.image_embed_norm), rtol=1e-4)
    sample = load_samples(shapes[1])[0]
    ids, labels = processor.render(sample.messages)
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
    pixels = processor.pixel_values([load_image(sample.images[0])])
    loss = model(**batch, pixel_values=pixels).loss
    assert loss.item() < history[0]["loss"]


def test_align_stage_trains_only_the_projector(parts, shapes, tmp_path):
    cfg = tiny_config(parts, shapes, tmp_path / "run", "stage=align", "max_steps=2")
    before, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4, projector="ln_mlp")
    summary = train(cfg)
    after, _ = load_model(summary["model"])
    lm_before = before.language_model.state_dict()
    for name, value in after.language_model.state_dict().items():
        assert torch.equal(value, lm_before[name]), name
    assert not torch.equal(after.projector.fc1.weight, before.projector.fc1.weight)
    assert summary["trainable_parameters"] == sum(p.numel() for p in before.projector.parameters())


def test_a_trained_cnn_tower_keeps_its_batchnorm_statistics(parts, shapes, tmp_path):
    """train_vision=true on the built-in CNN: its convolutions train, its BatchNorm statistics stay the
    ImageNet ones (batches of 4 images would make them noise)."""
    cfg = tiny_config(parts, shapes, tmp_path / "run", "vision=efficientnet-lite0", "image_size=64", "max_steps=2",
                      "train_vision=true", "vision_lr=1e-2")
    before, _ = compose(vision="efficientnet-lite0", llm=parts["llama"], image_tokens=4, image_size=64)
    after, _ = load_model(train(cfg)["model"])
    old = before.vision_tower.state_dict()
    stats = [k for k in old if k.endswith(("running_mean", "running_var"))]
    weights = [k for k in old if k.endswith("weight") and old[k].dim() == 4]
    assert stats and weights
    new = after.vision_tower.state_dict()
    assert all(torch.equal(new[k], old[k]) for k in stats)
    assert sum(not torch.equal(new[k], old[k]) for k in weights) > len(weights) // 2


def test_feature_dropout_drops_image_features_while_training_only(parts, shapes, tmp_path):
    """`feature_dropout`: the run's rate zeroes standardised image features before the projector in training
    mode; in eval mode the same features project the same way every time."""
    from vlmkit.train.stages import train_mode

    model, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    features = torch.randn(3, 2, 2, model.feature_mean.shape[0])
    model.eval()
    before = model.project(features)
    train_mode(model, tiny_config(parts, shapes, tmp_path / "run", "feature_dropout=0.5"))
    assert model.feature_dropout.p == 0.5
    first, second = model.project(features), model.project(features)
    assert not torch.equal(first, second) and not torch.equal(first, before)
    model.eval()
    assert torch.equal(model.project(features), before)
    with pytest.raises(VlmkitError, match="feature_dropout"):
        tiny_config(parts, shapes, tmp_path / "bad", "feature_dropout=1")
    with pytest.raises(VlmkitError, match="feature_dropout"):
        tiny_config(parts, shapes, tmp_path / "bad", "feature_dropout=0.1", "objective=contrastive")
    with pytest.raises(VlmkitError, match="feature_dropout"):  # a model without a vlmkit projector: said, not ignored
        train_mode(torch.nn.Linear(2, 2), tiny_config(parts, shapes, tmp_path / "run", "feature_dropout=0.5"))


@pytest.mark.parametrize("extra", [[], ["feature_dropout=0.3", "train_on_prompt=true"], ["ema=0.25"]],
                         ids=["plain", "feature_dropout_and_prompt", "ema"])
def test_resume_gives_the_same_weights(parts, shapes, tmp_path, extra):
    full = train(tiny_config(parts, shapes, tmp_path / "full", *extra))
    stopped = train(tiny_config(parts, shapes, tmp_path / "cut", *extra), stop_after=3)
    assert stopped == {"stopped_at": 3}
    resumed = train(tiny_config(parts, shapes, tmp_path / "cut", *extra), resume=True)
    a, _ = load_model(full["model"])
    b, _ = load_model(resumed["model"])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_weight_average_lags_the_weights_by_its_time_constant():
    weight = torch.nn.Parameter(torch.zeros(3))
    average = WeightAverage([("w", weight)], share=0.5, total_steps=20)  # a time constant of 10 steps
    for step in range(1, 61):  # the weight climbs one a step: the average trails by about the time constant
        with torch.no_grad():
            weight.fill_(float(step))
        average.update()
    assert 60 - 11 < average.shadow[0][0].item() < 60 - 8
    for _ in range(100):  # a weight that stays put: the average reaches it
        average.update()
    assert torch.allclose(average.shadow[0], weight.detach())
    with torch.no_grad():
        weight.zero_()
    average.apply()
    assert torch.allclose(weight.detach(), torch.full((3,), 60.0))


def test_ema_saves_the_average_not_the_last_weights(parts, shapes, tmp_path):
    last, _ = load_model(train(tiny_config(parts, shapes, tmp_path / "last"))["model"])
    averaged, _ = load_model(train(tiny_config(parts, shapes, tmp_path / "ema", "ema=0.5"))["model"])
    assert not torch.equal(last.projector.fc1.weight, averaged.projector.fc1.weight)
    frozen = last.vision_tower.state_dict()
    assert all(torch.equal(v, frozen[k]) for k, v in averaged.vision_tower.state_dict().items())
    with pytest.raises(VlmkitError, match="ema"):
        tiny_config(parts, shapes, tmp_path / "bad", "ema=0.1", "objective=contrastive")


def test_lora_trains_and_merges(parts, shapes, tmp_path):
    cfg = tiny_config(parts, shapes, tmp_path / "run", "lora_r=8", "max_steps=6")
    base, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    summary = train(cfg)
    merged, _ = load_model(summary["model"])
    assert not any("lora" in n for n in merged.state_dict())
    changed = [n for n, v in merged.language_model.state_dict().items() if not torch.equal(v, base.language_model.state_dict()[n])]
    assert any("q_proj" in n for n in changed)


def test_existing_run_needs_resume(parts, shapes, tmp_path):
    train(tiny_config(parts, shapes, tmp_path / "run"), stop_after=2)
    with pytest.raises(VlmkitError, match="--resume"):
        train(tiny_config(parts, shapes, tmp_path / "run"))


def test_too_long_sample_is_an_error_naming_the_line(parts, shapes):
    _, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    samples = load_samples(shapes[0])
    with pytest.raises(VlmkitError, match=r"train\.jsonl:1: .*max_length=3"):
        tokenize(samples, ComposedRenderer(processor), max_length=3)
    examples, skipped = tokenize(samples, ComposedRenderer(processor), max_length=3, skip_too_long=True)
    assert examples == [] and skipped == len(samples)


def test_untrained_tail_is_cut_but_never_an_image(parts):
    _, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    qa = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}, {"role": "assistant", "content": "red"}]
    for messages, images in ((qa, ("a.png",)), (qa + [{"role": "user", "content": [{"type": "image"}]}], ("a.png", "b.png"))):
        ids, labels = processor.render(messages)
        sample = Sample(messages, tuple(Path(p) for p in images), "x.jsonl", 1)
        (example,), _ = tokenize([sample], ComposedRenderer(processor), max_length=512)
        n = len(example.input_ids)
        assert ids[:n] == example.input_ids and labels[:n] == example.labels and n < len(ids)
        assert all(label == IGNORE_INDEX for label in labels[n:])  # only untrained tokens were cut
        assert example.labels[-1] != IGNORE_INDEX or example.input_ids[-1] == processor.image_token_id
        assert example.input_ids.count(processor.image_token_id) == 4 * len(images)


def test_labels_cover_exactly_the_assistant_tokens(parts):
    _, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]},
        {"role": "assistant", "content": "2"},
    ]
    ids, labels = processor.render(messages)
    # the token-by-token rendering equals tokenizing the chat template's text
    text = processor.apply_chat_template(messages, tokenize=False)
    assert ids == processor.tokenizer.encode(processor.expand_image_tokens(text), add_special_tokens=False)
    trained = processor.tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert trained == "red<|im_end|>2<|im_end|>"
    assert ids.count(processor.image_token_id) == 4
    # train_prompt: the user's words too, never the system turn, the role headers or the image tokens
    ids_too, labels = processor.render(messages, train_prompt=True)
    assert ids_too == ids
    trained = processor.tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert trained == "What colour is the circle?<|im_end|>red<|im_end|>How many shapes are there?<|im_end|>2<|im_end|>"


def test_a_question_alone_is_not_a_sample(parts):
    """With the prompt trained, a reply cut off by max_length is still an error: the question's words alone
    do not make a training sample."""
    _, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
                {"role": "assistant", "content": "red"}]
    sample = Sample(messages, (Path("a.png"),), "x.jsonl", 3)
    renderer = ComposedRenderer(processor, train_prompt=True)
    (example,), _ = tokenize([sample], renderer, max_length=512)
    reply = next(i for i, label in enumerate(processor.render(messages)[1]) if label != IGNORE_INDEX)
    assert example.reply_start == reply and any(label != IGNORE_INDEX for label in example.labels[:reply])
    with pytest.raises(VlmkitError, match=r"x\.jsonl:3: no assistant tokens left to train on within max_length"):
        tokenize([sample], renderer, max_length=reply)


def test_train_on_prompt_changes_what_the_loss_covers(parts, shapes, tmp_path):
    """The same weights (learning rates 0), the same batch: a different loss once the questions' words count."""
    losses = []
    for flag in ("true", "false"):
        cfg = tiny_config(parts, shapes, tmp_path / flag, f"train_on_prompt={flag}", "max_steps=1", "lr=0", "projector_lr=0")
        train(cfg)
        losses.append(json.loads((tmp_path / flag / "history.jsonl").read_text().splitlines()[0])["loss"])
    assert abs(losses[0] - losses[1]) > 1e-3
    with pytest.raises(VlmkitError, match="train_on_prompt"):
        tiny_config(parts, shapes, tmp_path / "c", "train_on_prompt=true", f"model={tmp_path}")
    with pytest.raises(VlmkitError, match="train_on_prompt"):
        tiny_config(parts, shapes, tmp_path / "d", "train_on_prompt=true", "method=dpo")


def test_position_words_start_each_token_at_its_column_and_row_words(parts, shapes, tmp_path):
    # learning rates 0: the one step leaves the positions and the word embeddings where training started them
    cfg = tiny_config(
        parts, shapes, tmp_path / "run", "image_positions=true", "position_words=true", "max_steps=1", "projector_lr=0", "lr=0"
    )
    model, processor = load_model(train(cfg)["model"])
    table = model.get_input_embeddings().weight
    left, right, top, bottom = (
        torch.nn.functional.normalize(table[processor.tokenizer(w, add_special_tokens=False).input_ids].mean(0), dim=0)
        for w in (" left", " right", " top", " bottom")
    )
    position = model.projector.position  # a 2x2 grid, row-major: top left, top right, bottom left, bottom right
    for row, word in zip(position, (left + top, right + top, left + bottom, right + bottom)):
        assert torch.nn.functional.cosine_similarity(row, word, dim=0) > 0.999
    assert torch.nn.functional.cosine_similarity(position[0], left, dim=0) < 0.9  # the row is there too
    # at the norm of the projector's own output on the training images, so neither part drowns the other
    features = torch.randn(8, 2, 2, model.feature_mean.shape[0]) * model.feature_std + model.feature_mean
    content = model.projector(model.standardize(features)).norm(dim=-1).mean()
    assert 0.5 < position.norm(dim=-1).mean() / content < 2


def test_position_words_need_image_positions(parts, shapes, tmp_path):
    with pytest.raises(VlmkitError, match="position_words.*image_positions=true"):
        tiny_config(parts, shapes, tmp_path / "run", "position_words=true", "image_positions=false")
    # left to the recipe, a CLIP tower gets no position embeddings: refused before anything is written
    with pytest.raises(VlmkitError, match="position_words.*image_positions=true"):
        train(tiny_config(parts, shapes, tmp_path / "run", "position_words=true"))
    assert not (tmp_path / "run").exists()


def test_group_by_length_pads_less_and_covers_each_epoch_once():
    from vlmkit.data.collate import Example
    from vlmkit.train.batches import batches_from

    rng = torch.Generator().manual_seed(0)
    examples = [Example([0] * int(n), [0] * int(n), (), f"d:{k}") for k, n in enumerate(torch.randint(5, 60, (400,), generator=rng))]

    def draw(group, start=0, n=100):  # 100 batches of 4 = one epoch
        batches = batches_from(examples, 4, seed=3, start=start, group_by_length=group)
        return [[id(e) for e in next(batches)] for _ in range(n)]

    def padded(batches):
        width = {id(e): len(e.input_ids) for e in examples}
        return sum(max(width[i] for i in b) * len(b) for b in batches)

    plain, grouped = draw(False), draw(True)
    assert sorted(sum(grouped, [])) == sorted(sum(plain, [])) == sorted(map(id, examples))  # every sample, once
    assert padded(grouped) < 0.8 * padded(plain)
    assert draw(True) == grouped and draw(True, start=37, n=63) == grouped[37:]  # deterministic, resumable
    assert draw(True, start=100, n=100) != grouped  # the next epoch reshuffles


@pytest.mark.parametrize("projector", ["linear", "ln_mlp", "pixel_shuffle", "shuffle_mlp"])
def test_projector_head_fit_solves_the_regression(parts, projector):
    model, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4, projector=projector)
    side = 2 * model.projector.pool_factor
    features = torch.randn(300, 1, 1, model.feature_mean.shape[0]).expand(-1, side, side, -1)  # cells alike
    with torch.no_grad():  # targets the head can reach exactly: a linear map of (every) token's head input
        inputs = model.projector.head_input(model.standardize(features))[:, 0]
    targets = inputs @ torch.randn(inputs.shape[1], model.config.text_config.hidden_size)
    if model.projector.head.bias is not None:
        targets += 0.5
    r2 = model.fit_projector_head(features, targets, ridge=1e-6)
    assert r2 > 0.999
    with torch.no_grad():
        out = model.projector(model.standardize(features))  # (N, 4, H): each token at its image's target
    assert torch.allclose(out, targets[:, None].expand_as(out), atol=1e-3 * targets.abs().max())


def reply_targets(model, examples):
    """(image paths, (N, H)): each image's rarity-weighted mean word, the target `projector_init=text` fits."""
    from vlmkit.train.initialise import embedding_table, reply_words, word_means

    paths, words = reply_words(model, examples)
    return paths, word_means(words, embedding_table(model))


def test_reply_targets_weigh_words_by_rarity(parts):
    from vlmkit.data.collate import Example

    model, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    end, x = 2, IGNORE_INDEX
    examples = [  # prompt token 9 is untrained; the end token closes every reply
        Example([9, 5, 7, end], [x, 5, 7, end], ("a.png",), "d:1"),
        Example([9, 6, 7, end], [x, 6, 7, end], ("b.png",), "d:2"),
        Example([9, 5, 8, end], [x, 5, 8, end], ("c.png",), "d:3"),
        Example([9, 4, end], [x, 4, end], ("a.png", "b.png"), "d:4"),  # two images: whose words? left out
    ]
    paths, targets = reply_targets(model, examples)
    table = model.get_input_embeddings().weight.detach()
    rare, common = math.log(3), math.log(3 / 2)  # in one image's replies of three, or in two
    assert paths == ["a.png", "b.png", "c.png"]
    assert torch.allclose(targets[0], (common * table[5] + common * table[7]) / (2 * common), atol=1e-6)
    assert torch.allclose(targets[1], (rare * table[6] + common * table[7]) / (rare + common), atol=1e-6)



def test_reply_targets_of_data_whose_samples_all_have_several_images(parts):
    """With fewer than two images alone in a sample, a reply counts for each of its sample's images, so
    projector_init=tokens (the default) and text also start on multi-image data (they used to refuse it)."""
    from vlmkit.data.collate import Example

    model, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    end, x = 2, IGNORE_INDEX
    examples = [
        Example([9, 5, end], [x, 5, end], ("a.png", "b.png"), "d:1"),
        Example([9, 6, end], [x, 6, end], ("b.png", "c.png"), "d:2"),
    ]
    paths, targets = reply_targets(model, examples)
    table = model.get_input_embeddings().weight.detach()
    assert paths == ["a.png", "b.png", "c.png"]
    assert torch.allclose(targets[0], table[5], atol=1e-6)  # only the first sample's reply, whose end is common
    assert torch.allclose(targets[2], table[6], atol=1e-6)

@pytest.mark.parametrize("init", ["text", "tokens"])
def test_projector_init_text_starts_image_tokens_near_their_words(parts, shapes, tmp_path, init):
    cfg = tiny_config(parts, shapes, tmp_path / "run", f"projector_init={init}", "max_steps=1", "projector_lr=0", "lr=0")
    model, processor = load_model(train(cfg)["model"])
    examples, _ = tokenize(load_samples(shapes[0]), ComposedRenderer(processor), 512)
    paths, targets = reply_targets(model, examples)
    with torch.no_grad():
        pixels = processor.pixel_values([load_image(p) for p in paths])
        tokens = model.get_image_features(pixels).mean(1)  # (N, H)
    similarity = torch.nn.functional.cosine_similarity(tokens[:, None], targets[None], dim=-1)  # (N, N)
    own = similarity.diagonal()
    others = (similarity.sum(1) - own) / (len(paths) - 1)
    assert (own > others).float().mean() > 0.9  # each image's tokens lean to its own replies' words


def test_token_targets_send_each_word_to_its_closest_token():
    from vlmkit.train.initialise import IMAGE_SHARE, token_targets, word_means

    e = torch.eye(4)
    predicted = torch.stack([e[0], e[1], 3 * e[2]])[None]  # (1 image, 3 tokens, H=4)
    table = torch.stack([2 * e[1], e[2], e[1] + 0.1 * e[0]])  # the embeddings of 3 words
    weight = torch.tensor([1.0, 2.0, 3.0])
    words = [(torch.tensor([0, 1, 2]), weight)]
    targets = token_targets(predicted, words, table, word_means(words, table))
    shared = IMAGE_SHARE * (weight @ table) / weight.sum()  # every token's part: all the image's words
    assert 0 < IMAGE_SHARE < 1
    assert torch.allclose(targets[0, 0], shared)  # no word is closest to it: the image's words only
    two = (1 * 2 * e[1] + 3 * (e[1] + 0.1 * e[0])) / 4  # two words, by rarity
    assert torch.allclose(targets[0, 1], shared + (1 - IMAGE_SHARE) * two)
    assert torch.allclose(targets[0, 2], shared + (1 - IMAGE_SHARE) * e[2])


@pytest.mark.parametrize("rounds", [0, 4])
def test_projector_init_tokens_starts_each_token_at_its_own_object(parts, rounds):
    """Images of 2x2 cells, one or two holding an object (a feature vector of its own) and the rest
    background, each image's words naming its objects: either fit starts each object's token nearest its
    own word; the image-level fit (`text`, no rounds) leans the background's tokens to the image's words as
    well, and after the rounds of `projector_init=tokens` they have under half the objects' tokens' norm."""
    from vlmkit.data.collate import Example
    from vlmkit.train.features import ImageSource
    from vlmkit.train.initialise import start_projector_at_text

    torch.manual_seed(0)
    model, _ = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    width = model.feature_mean.shape[0]
    objects, background = torch.randn(6, width), torch.randn(width)
    images, examples, holds = ImageSource(model, None, "cpu", cache=True), [], []
    for i in range(120):
        cells = torch.randperm(4)[: 1 + i % 2].tolist()
        kinds = torch.randperm(6)[: len(cells)].tolist()
        grid = background.repeat(4, 1) + 0.05 * torch.randn(4, width)
        grid[cells] = objects[kinds] + 0.05 * torch.randn(len(cells), width)
        images.cache[f"{i}.png"] = grid.reshape(2, 2, width)
        words = [10 + k for k in kinds] + [2]  # each object's word, and an end token every image has
        examples.append(Example([9, *words], [IGNORE_INDEX, *words], (f"{i}.png",), f"d:{i}"))
        holds.append(dict(zip(cells, kinds)))
    start_projector_at_text(model, examples, images, rounds)
    with torch.no_grad():
        tokens = model.projector(model.standardize(torch.stack(list(images.cache.values()))))  # (N, 4, H)
    table = model.get_input_embeddings().weight.detach()[10:16]
    nearest = torch.nn.functional.cosine_similarity(tokens[:, :, None], table[None, None], dim=-1).argmax(-1)
    own = [int(nearest[i, c]) == k for i, held in enumerate(holds) for c, k in held.items()]
    norms = tokens.norm(dim=-1)
    ratio = torch.stack([norms[i, [c for c in range(4) if c not in held]].mean() / norms[i, list(held)].mean()
                         for i, held in enumerate(holds)]).mean()
    assert sum(own) / len(own) > 0.95  # either fit: each object's token nearest its own word
    if rounds:
        assert ratio < 0.4  # measured 0.25: the background's tokens say the image's words more quietly
    else:
        assert ratio > 0.5  # measured 0.61: every token of an image leans to its words' mean


def test_projector_init_is_checked(parts, shapes, tmp_path):
    with pytest.raises(VlmkitError, match="projector_init"):
        tiny_config(parts, shapes, tmp_path / "a", "projector_init=words")
    with pytest.raises(VlmkitError, match="projector_init"):
        tiny_config(parts, shapes, tmp_path / "b", "projector_init=text", f"model={tmp_path}")
    with pytest.raises(VlmkitError, match="projector_init"):
        tiny_config(parts, shapes, tmp_path / "c", "projector_init=tokens", f"model={tmp_path}")


def test_the_budget_times_batches_from_the_narrowest_to_the_widest_of_an_epoch():
    from vlmkit.data.collate import Example
    from vlmkit.train.batches import batches_from, spread_batches

    # 90 short replies and 10 long ones: grouped by length, 3 of an epoch's 25 batches of 4 are wide
    examples = [Example([0] * n, [0] * n, (), f"d:{k}") for k, n in enumerate([20] * 90 + [200] * 10)]
    for seed in range(5):
        picked = spread_batches(examples, 4, seed, 6, group_by_length=True)
        widths = [max(e.length for e in b) for b in picked]
        assert widths == [20] * 5 + [200]  # whatever the shuffle
        epoch = batches_from(examples, 4, seed, 0, group_by_length=True)
        drawn = {tuple(map(id, next(epoch))) for _ in range(25)}
        assert all(tuple(map(id, b)) in drawn for b in picked)  # batches the run itself draws
    # the epoch's first six batches (a few steps timed in order) miss the wide ones on some seeds
    first = [[max(e.length for e in next(batches)) for _ in range(6)]
             for batches in (batches_from(examples, 4, seed, 0, True) for seed in range(5))]
    assert any(200 not in w for w in first)
    assert spread_batches(examples, 4, 0, 30, True)[0][0].length == 20  # more picks than batches: repeats, in order


def test_group_by_length_is_decided_from_the_data_and_resumes_exactly(parts, shapes, tmp_path):
    import yaml

    cut = tmp_path / "cut"
    assert train(tiny_config(parts, shapes, cut, "group_by_length=none"), stop_after=3) == {"stopped_at": 3}
    saved = yaml.safe_load((cut / "config.yaml").read_text())["group_by_length"]
    assert isinstance(saved, bool)  # the recipe's choice, saved so that --resume draws the same batches
    resumed = train(load_config(str(cut / "config.yaml")), resume=True)
    same = train(tiny_config(parts, shapes, tmp_path / "same", f"group_by_length={saved}"))
    assert "group_by_length" not in same["recipe"] and resumed["steps"] == same["steps"] == 8
    a, _ = load_model(resumed["model"])
    b, _ = load_model(same["model"])
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_max_minutes_fixes_the_steps_by_timing(parts, shapes, tmp_path):
    from vlmkit.train.budget import steps_for

    assert steps_for(10, 0.8) == 750 and steps_for(0.001, 5.0) == 1
    # 6 seconds of tiny steps (about 0.03 s each alone; over 1 s each on a machine busy with other runs)
    whole = train(tiny_config(parts, shapes, tmp_path / "whole", "max_steps=0", "max_minutes=0.1", "save_every=0", "epochs=2"))
    budget = whole["budget"]
    assert budget["seconds_per_step"] > 0 and budget["timing_seconds"] > 0
    # the timing's own seconds count in the minutes
    assert budget["timed_plan"] == steps_for(0.1 - budget["timing_seconds"] / 60, budget["seconds_per_step"])
    # the checks as it ran planned the steps it took, each from the pace since the one before
    assert whole["steps"] == budget["steps"] == (budget["plans"][-1]["steps"] if budget["plans"] else budget["timed_plan"])
    assert all(p["seconds_per_step"] > 0 for p in budget["plans"])
    samples = len(load_samples(shapes[0]))  # what two epochs of batch 4 would have been, reported beside the budget
    assert budget["steps_without_budget"] == math.ceil(2 * samples / 4)


def test_the_budget_is_checked_as_it_runs_and_resumes_exactly(parts, shapes, tmp_path, monkeypatch):
    """The timing takes 0.125 s of the 3 seconds and plans 46 steps of 0.0625 s; the run's steps take 0.125 s
    (a fake clock, in binary-exact steps), so the first check (at step 2) plans 23, and the later ones keep
    it. Runs cut before and after that check and resumed from their config.yaml end where the whole run
    does, with the same weights."""
    import yaml

    from vlmkit.train import loop

    ticks = iter(range(10**9))
    monkeypatch.setattr(loop, "time_steps", lambda *a: 0.0625)
    # read before and after the timing, once before the loop and once a step
    monkeypatch.setattr(loop, "clock", lambda: next(ticks) * 0.125)
    budget = ["max_steps=0", "max_minutes=0.05", "save_every=0"]
    whole = train(tiny_config(parts, shapes, tmp_path / "whole", *budget))
    assert whole["budget"]["timing_seconds"] == 0.125 and whole["budget"]["timed_plan"] == 46 and whole["steps"] == 23
    assert [(p["step"], p["seconds_per_step"], p["steps"]) for p in whole["budget"]["plans"]] == [
        (2, 0.125, 23), (6, 0.125, 23), (12, 0.125, 23), (17, 0.125, 23), (21, 0.125, 23), (22, 0.125, 23)]
    assert yaml.safe_load((tmp_path / "whole" / "config.yaml").read_text())["max_steps"] == 23
    reference, _ = load_model(whole["model"])
    for cut_at in (1, 10):  # before the first check (the checkpoint's checks are still to come) and after it
        cut = tmp_path / f"cut{cut_at}"
        assert train(tiny_config(parts, shapes, cut, *budget), stop_after=cut_at) == {"stopped_at": cut_at}
        assert yaml.safe_load((cut / "config.yaml").read_text())["max_steps"] == (46 if cut_at < 2 else 23)
        resumed = train(load_config(str(cut / "config.yaml")), resume=True)  # as `vlmkit train --resume` does
        assert resumed["steps"] == 23 and yaml.safe_load((cut / "config.yaml").read_text())["max_steps"] == 23
        for (name, x), (_, y) in zip(load_model(resumed["model"])[0].state_dict().items(), reference.state_dict().items()):
            assert torch.equal(x, y), (cut_at, name)

    # at the timed pace nothing changes, and the timing and the checks leave no trace: the same weights
    # as the same steps without a budget
    monkeypatch.setattr(loop, "time_steps", lambda *a: 0.125)
    steady = train(tiny_config(parts, shapes, tmp_path / "steady", *budget))
    assert steady["steps"] == 23 and all(p["steps"] == 23 for p in steady["budget"]["plans"])
    same = train(tiny_config(parts, shapes, tmp_path / "same", "max_steps=23", "save_every=0"))
    for (name, x), (_, y) in zip(load_model(steady["model"])[0].state_dict().items(), load_model(same["model"])[0].state_dict().items()):
        assert torch.equal(x, y), name


def test_a_budget_check_plans_what_the_minutes_left_buy_at_the_recent_pace():
    from vlmkit.train.budget import Replan

    def run(replan, paces, total, first=1):
        """Steps from `first` on, each taking paces(step) seconds, as the loop checks them: (total, spent)."""
        step = first - 1
        while step < total:
            step += 1
            total = replan.after_step(step, paces(step), total) or total
        return total, replan.spent

    replan = Replan(minutes=1)  # 120 steps planned from a timed 0.5 s
    assert run(replan, lambda step: 0.5, 120) == (120, 60)  # the timed pace held: nothing changes
    assert [p["step"] for p in replan.plans] == [6, 30, 60, 90, 108, 116]
    slower = Replan(minutes=1)  # twice as slow from step 7: the check at step 30 sees it
    total, spent = run(slower, lambda step: 0.5 if step <= 6 else 1.0, 120)
    assert slower.plans[1] == {"step": 30, "seconds_per_step": 1.0, "steps": 30 + (60 - 27)}
    assert total == 63 and spent == 60
    # a slow spell (steps 7-30 at 2.5 s) cuts the plan; the checks of the shorter plan see the pace come back
    def spell_pace(step):
        return 2.5 if 7 <= step <= 30 else 0.5

    spell = Replan(minutes=2)  # 240 steps planned
    total, spent = run(spell, spell_pace, 240)
    assert spell.plans[1]["steps"] < 70 and total > 120 and 120 - 0.5 < spent <= 120
    # a checkpoint carries the checks: a run resumed at step 40 ends as the whole run does
    part, total_at_40 = Replan(minutes=2), 240
    for step in range(1, 41):
        total_at_40 = part.after_step(step, spell_pace(step), total_at_40) or total_at_40
    saved = Replan(minutes=2)
    saved.load_state_dict(part.state_dict())
    assert run(saved, spell_pace, total_at_40, first=41) == (total, spent)
    over = Replan(minutes=0.01)  # the minutes are spent by the first check: stop there
    assert run(over, lambda step: 1.0, 100) == (5, 5.0)
    timed = Replan(minutes=1, spent=10.0)  # the timing took 10 s of the minute: 100 steps of 0.5 s are left
    assert run(timed, lambda step: 0.5, 100) == (100, 60)
    assert timed.plans[0] == {"step": 5, "seconds_per_step": 0.5, "steps": 100}


def test_compiled_blocks_train_as_the_plain_ones_and_the_model_is_saved_plain(parts, shapes, tmp_path):
    """compile=true: the LM's blocks run compiled, all of them through one graph per kind of batch (not one
    per block), the losses follow the plain run's within rounding, and each block has its own forward back
    before the model is saved."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from vlmkit.build import for_training
    from vlmkit.train.compiled import cxx_compiler, repeated_blocks

    if cxx_compiler() is None:
        pytest.skip("TorchInductor builds CPU kernels with a C++ compiler; none is installed")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(parts["llama"])
    config.num_hidden_layers = 6  # more blocks than kinds of batch: one graph a block would show
    deep = tmp_path / "llama6"
    AutoModelForCausalLM.from_config(config).save_pretrained(deep)
    AutoTokenizer.from_pretrained(parts["llama"]).save_pretrained(deep)
    keys = ["max_steps=6", "save_every=0", "group_by_length=false", f"llm={deep}"]
    plain = train(tiny_config(parts, shapes, tmp_path / "plain", *keys))
    cfg = tiny_config(parts, shapes, tmp_path / "compiled", *keys, "compile=true")
    model, processor = for_training(cfg)
    blocks = repeated_blocks(model)
    assert len(blocks) == 6

    def train_counting_graphs(cfg, model_and_processor=None) -> tuple[dict, int]:
        torch._dynamo.reset()
        counters.clear()
        summary = train(cfg, model_and_processor=model_and_processor)
        return summary, counters["stats"]["unique_graphs"]

    compiled, six = train_counting_graphs(cfg, (model, processor))
    _, two = train_counting_graphs(tiny_config(parts, shapes, tmp_path / "two", *keys[:-1], "compile=true"))
    assert six == two >= 1  # six blocks compile no more graphs than two: they share them
    assert all("forward" not in vars(block) for block in blocks)
    losses = [[json.loads(line)["loss"] for line in (run / "history.jsonl").read_text().splitlines()]
              for run in (tmp_path / "plain", tmp_path / "compiled")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert load_model(compiled["model"])[0].state_dict().keys() == load_model(plain["model"])[0].state_dict().keys()


def test_steps_without_a_budget_are_the_epochs_or_the_recipes_choice():
    from types import SimpleNamespace

    from vlmkit.recipe import choose_steps
    from vlmkit.train.loop import unbudgeted_steps

    def run(epochs, world=1):
        cfg = SimpleNamespace(epochs=epochs, batch_size=4, grad_accum=2)
        return SimpleNamespace(cfg=cfg, examples=[None] * 1000, dist=SimpleNamespace(world=world))

    assert unbudgeted_steps(run(3)) == (375, None) and unbudgeted_steps(run(0)) == (0, None)
    steps, choice = unbudgeted_steps(run(None, world=2))  # the recipe: from the samples a step takes on all ranks
    assert choice == choose_steps(1000, 16) and steps == choice.value


def test_feature_statistics_are_set_without_cached_features(parts, shapes, tmp_path):
    """`standardize_features` applies whether or not features are cached (it used to be skipped silently)."""
    summary = train(tiny_config(parts, shapes, tmp_path / "run", "cache_features=false", "max_steps=1", "lr=0", "projector_lr=0"))
    model, processor = load_model(summary["model"])
    paths = sorted({str(p) for s in load_samples(shapes[0]) for p in s.images})
    with torch.no_grad():
        features = model.encode_images(processor.pixel_values([load_image(p) for p in paths])).float()
    assert torch.allclose(model.feature_mean, features.mean((0, 1, 2)), atol=1e-4)


def test_the_projector_starts_the_same_with_or_without_cached_features(parts, shapes, tmp_path, capfd):
    """projector_init=text with a tower that is not cached (train_vision, cache_features=false) encodes the
    images once, with a progress bar, and starts the projector where cached features start it."""
    runs = {}
    for cache in ("true", "false"):
        summary = train(tiny_config(parts, shapes, tmp_path / cache, f"cache_features={cache}", "projector_init=text",
                                    "max_steps=1", "lr=0", "projector_lr=0"))
        runs[cache] = load_model(summary["model"])[0].projector.state_dict()
        assert ("encoding images to start the projector" in capfd.readouterr().err) == (cache == "false")
    for name, value in runs["true"].items():  # the two encode in different batches: equal to rounding
        assert (value - runs["false"][name]).abs().max() <= 1e-3 * value.abs().max(), name


@pytest.mark.parametrize("init", ["text", "tokens"])
def test_defaults_train_on_text_only_data(parts, shapes, tmp_path, init):
    """projector_init=tokens (the default for a new composition) and text have nothing to fit without
    images: the run says so and trains, rather than stopping."""
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ["cat", "dog", "sun", "sea"] * 4]
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(parts, (data, data), tmp_path / "run", f"projector_init={init}", "max_steps=2")
    assert train(cfg)["steps"] == 2

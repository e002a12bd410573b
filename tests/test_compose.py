"""Any vision tower x any causal LM: compose, forward, generate, save -> load -> same output."""

import pytest
import torch
from PIL import Image

from tiny import make_lm, make_vision
from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine
from vlmkit.build import compose, for_training, load_model
from vlmkit.config import load_config

MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]}]


def image(colour=(200, 30, 30)):
    im = Image.new("RGB", (40, 40), (255, 255, 255))
    im.paste(colour, (5, 5, 25, 25))
    return im


def roundtrip(model, processor, tmp_path):
    engine = Engine(model, processor)
    before = engine.generate([MESSAGES], [[image()]], max_new_tokens=5)
    inputs = processor(images=[image()], text=processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False))
    logits = model(**inputs).logits
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    model2, processor2 = load_model(tmp_path / "m")
    assert torch.allclose(model2(**inputs).logits, logits, atol=1e-5)
    assert Engine(model2, processor2).generate([MESSAGES], [[image()]], max_new_tokens=5) == before


@pytest.mark.parametrize("lm", ["llama", "qwen2", "phi3", "gemma", "gpt2"])
def test_every_language_model(lm, parts, tmp_path):
    model, processor = compose(vision=parts["clip"], llm=str(make_lm(tmp_path / lm, lm)), image_tokens=4)
    roundtrip(model, processor, tmp_path)


@pytest.mark.parametrize("tower", ["clip", "siglip", "vit", "dinov2"])
@pytest.mark.parametrize("projector", ["linear", "mlp", "pixel_shuffle", "shuffle_mlp"])
def test_every_tower_and_projector(tower, projector, parts, tmp_path):
    model, processor = compose(
        vision=str(make_vision(tmp_path / tower, tower)), llm=parts["llama"], projector=projector, image_tokens=4
    )
    pixels = processor.pixel_values([image()])
    # Every projector gives `image_tokens` tokens per image. The towers' grid is 4x4 (32 px, patch 8): linear and
    # mlp pool it to 2x2; pixel_shuffle and shuffle_mlp keep a grid twice as fine (4x4) and fold each 2x2 block
    # into one token.
    side = 4 if "shuffle" in projector else 2
    assert model.encode_images(pixels).shape == (1, side, side, model.config.vision_hidden_size)
    assert model.get_image_features(pixels).shape == (1, 4, model.config.text_config.hidden_size)
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = processor(images=[image()], text=text)["input_ids"]
    assert int((ids == processor.image_token_id).sum()) == 4  # and the processor writes as many image tokens
    roundtrip(model, processor, tmp_path)


def test_shuffled_tokens_keep_their_cells_apart():
    """pixel_shuffle and shuffle_mlp fold each 2x2 block of cells into one token in reading order (the cells
    side by side, not averaged), so two blocks that average alike still give different tokens."""
    from vlmkit.model.projector import ShuffleMLPProjector, shuffle_cells

    grid = torch.randn(1, 4, 4, 3)
    folded = shuffle_cells(grid, 2)
    assert folded.shape == (1, 2, 2, 12)
    assert torch.equal(folded[0, 0, 1], torch.cat([grid[0, 0, 2], grid[0, 0, 3], grid[0, 1, 2], grid[0, 1, 3]]))
    swapped = grid.clone()
    swapped[0, 0, 0], swapped[0, 1, 1] = grid[0, 1, 1], grid[0, 0, 0]  # the block's mean stays the same
    projector = ShuffleMLPProjector(3, 8)
    with torch.no_grad():
        before, after = projector(grid), projector(swapped)
    assert not torch.allclose(before[0, 0], after[0, 0]) and torch.equal(before[0, 1:], after[0, 1:])


def test_timm_tower(parts, tmp_path):
    timm = pytest.importorskip("timm")
    weights = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), weights)
    with pytest.raises(VlmkitError, match="its own features only"):
        compose(vision=f"timm:resnet18@{weights}", llm=parts["llama"], image_tokens=4, vision_feature_layer=-2)
    model, processor = compose(vision=f"timm:resnet18@{weights}", llm=parts["llama"], image_tokens=4, image_size=64)
    assert model.get_image_features(processor.pixel_values([image()])).shape[1] == 4
    roundtrip(model, processor, tmp_path)


def test_builtin_cnn_reads_its_head_or_its_last_block(parts, tmp_path):
    """vision_feature_layer -2 gives the EfficientNet's last block (320 channels, before the 1x1 head), -1 and
    a spec saved without the key (models composed before the key existed) its head (1280)."""
    from vlmkit.model.vision import build_vision_tower

    model, processor = compose(vision="efficientnet-lite0", llm=parts["llama"], image_tokens=4, image_size=64,
                               vision_feature_layer=-2)
    tower = model.vision_tower
    assert model.config.vision_hidden_size == 320 and tower.hidden_size == 320
    pixels = processor.pixel_values([image()])
    net = tower.net
    blocks = net(pixels, layer=-2).permute(0, 2, 3, 1)
    assert torch.equal(model.encode_images(pixels), blocks)  # the block map itself (64 px: 2x2, no pooling)
    assert not torch.equal(net(pixels)[:, :320], net(pixels, layer=-2))
    roundtrip(model, processor, tmp_path)
    # the training key, as `vlmkit train ... vision_feature_layer=-2` gives it, reaches the composition
    cfg = load_config(None, [f"llm={parts['llama']}", "image_tokens=4", "image_size=64", "vision_feature_layer=-2"])
    assert for_training(cfg)[0].config.vision["feature_layer"] == -2
    assert build_vision_tower({"kind": "efficientnet_lite0"}).hidden_size == 1280
    # the blocks before the last at the same stride: -3 is the map the last block reads (its input)
    earlier = build_vision_tower({"kind": "efficientnet_lite0", "feature_layer": -3})
    earlier.net.load_state_dict(net.state_dict())
    assert earlier.hidden_size == 192
    with torch.no_grad():
        stage = earlier.eval()(pixels).permute(0, 3, 1, 2)
        assert stage.shape[1:] == (192, 2, 2)
        assert torch.allclose(net.eval().blocks[-1](stage), net(pixels, layer=-2), atol=1e-5)
    from vlmkit.inspect import _tower_name

    assert _tower_name({"kind": "efficientnet_lite0", "feature_layer": -3}) == "efficientnet_lite0, features of its block 2 from the end"
    assert _tower_name({"kind": "efficientnet_lite0", "feature_layer": -2}).endswith("its last block")
    for wrong in (-7, 0, -2.5):
        with pytest.raises(VlmkitError, match="offers -1"):
            build_vision_tower({"kind": "efficientnet_lite0", "feature_layer": wrong})


def test_image_positions_tell_the_tokens_apart_train_and_save(parts, tmp_path):
    model, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4, image_positions=True)
    position = model.projector.position
    assert position.shape == (4, model.config.text_config.hidden_size) and not position.any()  # starts as a no-op
    same = torch.ones(1, 2, 2, model.config.vision_hidden_size)  # one feature in every cell
    assert torch.allclose(model.project(same)[0, 0], model.project(same)[0, 3])
    with torch.no_grad():
        position.normal_()
    tokens = model.project(same)[0]
    assert not torch.allclose(tokens[0], tokens[3])  # the same feature, told apart by where it is
    assert any(p is position for p in model.projector.parameters())  # trains and counts with the projector
    inputs = processor(images=[image()], text=processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False))
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    assert position.grad is not None and position.grad.abs().sum() > 0
    roundtrip(model, processor, tmp_path)
    assert torch.equal(load_model(tmp_path / "m")[0].projector.position, position)


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_column_words_lay_each_image_out_by_column(parts, lm, tmp_path):
    model, processor = compose(vision=parts["clip"], llm=parts[lm], image_tokens=4, column_words=True)
    ids, labels = processor.render(MESSAGES, add_generation_prompt=True)
    tok = processor.tokenizer
    left, right, img = tok.encode(" left", add_special_tokens=False), tok.encode(" right", add_special_tokens=False), processor.image_token_id
    piece = left + [img, img] + right + [img, img]
    assert any(ids[k : k + len(piece)] == piece for k in range(len(ids)))  # " left" TL BL " right" TR BR
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image()], text=text)
    assert inputs["input_ids"][0].tolist() == ids  # generation's path gives the training path's tokens
    features = torch.randn(2, 2, 2, model.config.vision_hidden_size)
    by_column = model.project(features)
    model.config.image_column_major = False
    by_row = model.project(features)
    model.config.image_column_major = True
    assert torch.equal(by_column, by_row[:, [0, 2, 1, 3]])  # each column's cells follow its word
    roundtrip(model, processor, tmp_path)
    model2, processor2 = load_model(tmp_path / "m")
    assert processor2.column_words == [" left", " right"] and model2.config.image_column_major
    from vlmkit.inspect import inspect_model

    report = inspect_model(str(tmp_path / "m"))
    assert "column by column" in report and "<image x2>" in report and "template and render agree" in report
    assert compose(vision=parts["clip"], llm=parts[lm], image_tokens=9, column_words=True)[1].column_words[1] == " middle"
    with pytest.raises(VlmkitError, match="2x2 or 3x3"):
        compose(vision=parts["clip"], llm=parts[lm], image_tokens=16, column_words=True)


def test_image_tokens_must_match_images(parts):
    model, processor = compose(vision=parts["clip"], llm=parts["llama"], image_tokens=4)
    text = processor.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    with pytest.raises(VlmkitError, match="1 image markers"):
        processor(images=[image(), image()], text=text)
    inputs = processor(images=[image()], text=text)
    with pytest.raises(VlmkitError, match="image tokens"):
        model(input_ids=inputs["input_ids"], pixel_values=torch.cat([inputs["pixel_values"]] * 2))


def test_unknown_parts_are_clear_errors(parts, tmp_path):
    with pytest.raises(VlmkitError, match="unknown vision tower 'no_such_tower'"):
        compose(vision="no_such_tower", llm=parts["llama"])
    with pytest.raises(VlmkitError, match="language model"):
        compose(vision=parts["clip"], llm=str(tmp_path / "missing_lm"))
    with pytest.raises(VlmkitError, match="timm vision tower 'no_such_net'"):
        compose(vision="timm:no_such_net", llm=parts["llama"])
    with pytest.raises(VlmkitError, match="unknown projector 'conv'"):
        compose(vision=parts["clip"], llm=parts["llama"], projector="conv")

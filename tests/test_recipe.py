"""The default recipe (vlmkit/recipe.py): each `auto` decision is a pure function of the parts, the
device and the data's size, and `resolve` leaves every key the user set alone."""

import pytest

from vlmkit.config import TrainConfig, load_config
from vlmkit.recipe import (
    CPU_BATCH, GPU_BATCH, GROUPING_SAVES, MAX_EPOCHS, MIN_STEPS, choose_batch_size, choose_column_words,
    choose_feature_layer, choose_group_by_length, choose_image_positions, choose_image_size, choose_layout,
    choose_image_tokens, choose_lr, choose_method, choose_projector_init, choose_steps, choose_train_on_prompt, resolve,
    tower_grid,
)


def test_method_is_lora_except_for_the_projector_alone():
    assert choose_method(new_model=True, stage="sft").value == "lora"
    assert choose_method(new_model=False, stage="sft").value == "lora"
    assert choose_method(new_model=True, stage="align").value == "full"


def test_learning_rate_follows_what_trains():
    assert choose_lr(adapters=True, new_model=True).value == 1e-3  # a new projector beside new adapters
    assert choose_lr(adapters=True, new_model=False).value == 5e-4  # adapters on a trained VLM
    assert choose_lr(adapters=False).value == 1e-4


def test_the_builtin_cnn_is_read_below_its_last_block_and_other_towers_keep_theirs():
    assert choose_feature_layer("efficientnet-lite0").value == -3
    assert choose_feature_layer("timm:resnet18") is None  # its only features
    assert choose_feature_layer("openai/clip-vit-base-patch32") is None  # a transformers tower's own -2
    assert choose_layout("efficientnet-lite0", None, None, None, None)[0].value == -3
    assert "vision_feature_layer" not in {c.key for c in choose_layout("efficientnet-lite0", None, None, None, None, -1)}


def test_batch_size_follows_the_device():
    assert choose_batch_size("cpu").value == CPU_BATCH == 4
    assert choose_batch_size("cuda").value == GPU_BATCH == 16


def test_image_layout_follows_the_tower():
    # EfficientNet-Lite0: stride 32, 224 px by default -> 192 px, a 6x6 grid pooled evenly to 3x3
    assert choose_image_size("efficientnet-lite0").value == 192
    assert tower_grid("efficientnet-lite0", 192) == 6 and tower_grid("efficientnet-lite0", None) == 7
    assert choose_image_size("timm:resnet18").value is None  # its own size
    assert choose_image_tokens(6).value == 9 and choose_image_tokens(None).value == 9
    assert choose_image_tokens(2).value == 4 and choose_image_tokens(1).value == 1  # a smaller tower: its whole grid


def test_position_help_only_for_towers_without_positions_of_their_own():
    assert choose_column_words(9).value is True and choose_column_words(4).value is True
    assert choose_column_words(16).value is False and choose_column_words(1).value is False  # no words for them
    assert choose_image_positions("efficientnet-lite0").value is True
    assert choose_image_positions("timm:resnet18").value is True
    # a transformers ViT's features carry its position embeddings, and Llava export needs neither
    assert choose_image_positions("google/siglip-base-patch16-224").value is False
    assert choose_column_words(9, "openai/clip-vit-base-patch32").value is False


def test_projector_init_from_replies_only_for_a_new_projector():
    assert choose_projector_init(new_model=True, method="lora").value == "tokens"
    assert choose_projector_init(new_model=False, method="lora").value == "random"
    assert choose_projector_init(new_model=True, method="dpo").value == "random"


def test_questions_train_only_for_a_new_composition_with_supervised_replies():
    assert choose_train_on_prompt(new_model=True, method="lora").value is True
    assert choose_train_on_prompt(new_model=True, method="full", stage="align").value is True
    assert choose_train_on_prompt(new_model=False, method="lora").value is False  # a pretrained chat template
    assert choose_train_on_prompt(new_model=True, method="dpo").value is False
    assert choose_train_on_prompt(new_model=True, method="full", stage="contrastive").value is False


@pytest.mark.parametrize("samples, per_step, steps", [
    (2000, 4, 6 * 500),          # 500 a epoch: six epochs, short of MIN_STEPS
    (2500, 4, 6 * 625),
    (8000, 4, MIN_STEPS),        # 2000 a epoch: two epochs
    (24000, 4, 6000),            # more than MIN_STEPS: one epoch
    (100, 4, 6 * 25),            # tiny data: at most six epochs
    (40000, 4, 10000),           # large data: one epoch
    (1500, 16, 6 * 94),          # 94 a epoch: capped at six
])
def test_steps_follow_the_data_size(samples, per_step, steps):
    choice = choose_steps(samples, per_step)
    assert choice.value == steps
    epoch = -(-samples // per_step)
    assert epoch <= choice.value <= MAX_EPOCHS * epoch
    assert f"{samples} samples" in choice.reason


def test_batches_are_sorted_by_length_only_where_that_saves_many_tokens():
    # one-question data: lengths within a few tokens of each other, sorting saves ~3%: shuffled batches
    near = [30 + i % 7 for i in range(600)]
    choice = choose_group_by_length(near, 4)
    assert choice.value is False and "would save" in choice.reason
    assert choose_group_by_length([32] * 100, 4).value is False  # nothing to save
    # one-word answers beside captions three times as long: sorting saves far more than GROUPING_SAVES
    mixed = [30 + i % 5 if i % 3 else 90 + i % 11 for i in range(600)]
    choice = choose_group_by_length(mixed, 4)
    assert choice.value is True and int(choice.reason.split("saves ")[1].split("%")[0]) / 100 > GROUPING_SAVES
    assert choose_group_by_length(mixed, 4) == choice  # a function of the lengths: a resumed run decides the same
    assert choose_group_by_length(mixed, 1).value is False  # a batch of one has no padding


def test_resolve_fills_the_auto_keys_and_keeps_the_users():
    cfg, choices = resolve(TrainConfig(data="d.jsonl"), "cpu")
    assert (cfg.method, cfg.lr, cfg.batch_size, cfg.image_size, cfg.image_tokens) == ("lora", 1e-3, 4, 192, 9)
    assert (cfg.lora_r, cfg.lora_targets, cfg.projector_init, cfg.column_words, cfg.position_words) == (16, "attention", "tokens", True, True)
    assert cfg.image_positions is True and cfg.vision_feature_layer == -3
    assert cfg.train_on_prompt is True
    assert {c.key for c in choices} == {"method", "lr", "lora_targets", "batch_size", "image_size", "image_tokens",
                                        "image_positions", "column_words", "position_words", "projector_init",
                                        "vision_feature_layer", "train_on_prompt"}
    assert all(c.reason for c in choices)
    # a resolved config resolves to itself: what config.yaml saves trains the same way again
    again, none = resolve(cfg, "cuda")
    assert again == cfg and none == []

    mine = load_config(None, ["method=full", "lr=3e-5", "batch_size=2", "image_tokens=4", "projector_init=random",
                              "column_words=false", "train_on_prompt=false"], data="d.jsonl")
    cfg, choices = resolve(mine, "cuda")
    assert (cfg.method, cfg.lr, cfg.batch_size, cfg.image_tokens, cfg.projector_init, cfg.column_words) == (
        "full", 3e-5, 2, 4, "random", False)
    assert cfg.train_on_prompt is False
    assert cfg.image_size is None  # image_tokens set: the tower keeps its own size
    assert cfg.position_words is False  # no column words to start from
    assert {c.key for c in choices} == {"vision_feature_layer", "image_positions", "position_words"}


def test_resolve_a_pretrained_model_keeps_its_layout():
    cfg, choices = resolve(TrainConfig(model="some/vlm", data="d.jsonl"), "cuda")
    assert (cfg.method, cfg.lr, cfg.batch_size, cfg.projector_init) == ("lora", 5e-4, 16, "random")
    assert cfg.train_on_prompt is False
    assert cfg.image_tokens is None and cfg.vision_feature_layer is None and cfg.column_words is None  # the model's own processor decides
    assert "image_tokens" not in {c.key for c in choices}


def test_lora_targets_attention_finds_each_lms_names(parts):
    from transformers import AutoModelForCausalLM

    from vlmkit.model.lora import chosen_targets

    llama = AutoModelForCausalLM.from_pretrained(parts["llama"])
    assert chosen_targets(llama, "attention") == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert "gate_proj" in chosen_targets(llama, "all")
    gpt2 = AutoModelForCausalLM.from_pretrained(parts["gpt2"])
    assert chosen_targets(gpt2, "attention") == ["c_attn"]


@pytest.mark.parametrize("lm", ["llama", "gpt2"])
def test_the_defaults_train_a_new_composition(parts, shapes, tmp_path, lm):
    """`vlmkit train` with no training keys: LoRA on the LM's attention beside the projector, 3x3 image
    tokens (a CLIP tower: no column words or position embeddings, so the model stays exportable); the
    summary and config.yaml say what was chosen, and the saved model (adapters merged) reloads and answers."""
    import json

    import yaml

    from vlmkit.build import load_model
    from vlmkit.infer.engine import Engine
    from vlmkit.train.loop import train

    train_file, _ = shapes
    cfg = load_config(None, [f"vision={parts['clip']}", f"llm={parts[lm]}", "save_every=0", "precision=fp32"],
                      data=str(train_file), output=str(tmp_path / "run"))
    summary = train(cfg)
    recipe = summary["recipe"]
    assert recipe["method"]["value"] == "lora" and recipe["image_tokens"]["value"] == 9
    assert recipe["steps"]["value"] == summary["steps"] == 6 * 6  # 24 samples, 6 steps an epoch, six epochs
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["method"], saved["lr"], saved["batch_size"], saved["column_words"], saved["image_positions"]) == (
        "lora", 1e-3, 4, False, False)
    assert saved["group_by_length"] is recipe["group_by_length"]["value"]  # decided from the data's lengths
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert history[-1]["loss"] < history[0]["loss"]
    model, processor = load_model(summary["model"])
    assert processor.column_words is None and model.config.image_tokens == 9 and not model.config.image_positions
    assert not any("lora_" in name for name in model.state_dict())  # merged
    row = json.loads(train_file.read_text().splitlines()[0])
    question = [m for m in row["messages"] if m["role"] == "user"][0]
    reply = Engine(model, processor).generate([[question]], [[str(train_file.parent / row["images"][0])]], max_new_tokens=3)
    assert isinstance(reply[0], str)

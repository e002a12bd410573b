"""The default training recipe: every key left at `auto` is decided here, from what the run sees.

A user who runs `vlmkit train --data mine.jsonl` sets no training keys, so the defaults must be the best
recipe we know for data we have never seen. Each decision below is a pure function of the parts (a new
composition or a trained model; the vision tower's feature grid), the device and the data's size, and
returns the value with its reason; `resolve` applies them to a config's `auto` keys (a key the user set
is kept as it is). The resolved values are what the run's `config.yaml` saves, so `--resume` and a later
run with that file train exactly the same way, and the log and `train_summary.json` say what was chosen
and why. The measurements behind each rule are in docs/generality.md and docs/experiments.md.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

from vlmkit.config import TrainConfig
from vlmkit.data.processor import COLUMN_WORDS
from vlmkit.device import resolve_device
from vlmkit.errors import VlmkitError
from vlmkit.model.vision import BUILTIN_SIZE, BUILTIN_STRIDE, BUILTIN_VISION

LORA_LR, NEW_LORA_LR, FULL_LR = 5e-4, 1e-3, 1e-4
CPU_BATCH, GPU_BATCH = 4, 16
TOKENS_SIDE = 3  # image tokens per side: a 3x3 grid keeps left / middle / right and top / middle / bottom apart
MIN_STEPS = 4000  # a new projector and adapters need about this many optimizer steps...
MAX_EPOCHS = 6  # ...but no sample is seen more than six times
GROUPING_SAVES = 0.07  # group_by_length: sorted batches where they save at least this share of the padded tokens
PAIR_MIN_STEPS = 750  # a contrastive run (vlmkit.train.contrastive): at least this many steps and one epoch


@dataclass(frozen=True)
class Choice:
    key: str
    value: object
    reason: str

    def __str__(self) -> str:
        return f"{self.key}={self.value} ({self.reason})"


def choose_method(new_model: bool, stage: str) -> Choice:
    if stage == "align":
        return Choice("method", "full", "stage=align trains the projector alone")
    where = "beside the new projector, trained in full" if new_model else "on the pretrained model"
    return Choice("method", "lora", f"LoRA r16 on the LM's attention {where}: more learned per step than the "
                  "projector alone, a cheaper step and far less optimizer memory than the whole LM")


def choose_lr(adapters: bool, new_model: bool = False) -> Choice:
    if adapters and new_model:
        return Choice("lr", NEW_LORA_LR, "a new projector and LoRA adapters both start from nothing")
    if adapters:
        return Choice("lr", LORA_LR, "LoRA adapters start at zero and take larger steps than pretrained weights")
    return Choice("lr", FULL_LR, "the LM's own weights train")


def choose_lora_targets() -> Choice:
    return Choice("lora_targets", "attention", "the attention projections: as accurate as every projection, a "
                  "third cheaper a step")


def choose_batch_size(device_type: str) -> Choice:
    if device_type == "cuda":
        return Choice("batch_size", GPU_BATCH, "a GPU runs 16 samples in about the time of one")
    return Choice("batch_size", CPU_BATCH, "on CPU a step costs in proportion to its samples: more, smaller "
                  "steps learn more in the same minutes")


def choose_image_size(vision: str) -> Choice:
    """A CNN tower's input size rounded down to a multiple of its stride x the token grid, so the feature
    grid pools evenly (each token the mean of whole cells); other towers keep their own size."""
    if vision not in BUILTIN_VISION:
        return Choice("image_size", None, "the tower's own input size")
    size, stride = BUILTIN_SIZE, BUILTIN_STRIDE
    step = stride * TOKENS_SIDE
    even = max(step, size // step * step)
    return Choice("image_size", even, f"{even // stride}x{even // stride} features pool evenly to "
                  f"{TOKENS_SIDE}x{TOKENS_SIDE}")


def choose_image_tokens(grid_side: int | None) -> Choice:
    """TOKENS_SIDE^2 tokens, or the tower's whole grid when it is smaller."""
    side = TOKENS_SIDE if grid_side is None else min(TOKENS_SIDE, grid_side)
    why = f"a {side}x{side} grid: few tokens keep steps cheap, and three per side keep objects in different " \
          "thirds of the image apart"
    if grid_side is not None and grid_side < TOKENS_SIDE:
        why = f"the tower's whole {grid_side}x{grid_side} feature grid"
    return Choice("image_tokens", side * side, why)


def positional_tower(vision: str) -> bool:
    """Whether the tower's features carry position embeddings of their own: a transformers ViT (CLIP, SigLIP,
    DINOv2...) does; the built-in CNN does not, and a timm tower is taken as a CNN (`image_positions` costs
    one vector a token either way)."""
    return vision not in BUILTIN_VISION and not vision.startswith("timm:")


def choose_image_positions(vision: str) -> Choice:
    if positional_tower(vision):
        return Choice("image_positions", False, "a transformers vision tower: its features carry its own position "
                      "embeddings, and the model stays exportable to Llava")
    return Choice("image_positions", True, "a CNN's pooled features say little about where they are: a learned "
                  "embedding per image-token position")


def choose_column_words(image_tokens: int, vision: str = "efficientnet-lite0") -> Choice:
    """Words for the image's columns (vlmkit.data.processor.COLUMN_WORDS) when the grid has 2 or 3, for a
    tower without position embeddings of its own."""
    if positional_tower(vision):
        return Choice("column_words", False, "a transformers vision tower: its features carry its own positions, "
                      "and the model stays exportable to Llava")
    side = math.isqrt(image_tokens)
    if side in COLUMN_WORDS and side * side == image_tokens:
        words = "/".join(w.strip() for w in COLUMN_WORDS[side])
        return Choice("column_words", True, f"each column of image tokens after its word ({words}), so the LM "
                      "can read where things are as it reads a sentence")
    return Choice("column_words", False, f"no words for a grid of {image_tokens} tokens")


def choose_projector_init(new_model: bool, method: str) -> Choice:
    if new_model and method != "dpo":
        return Choice("projector_init", "tokens", "a new projector starts by mapping each image to the words its "
                      "replies use, each word most in the image token closest to it")
    return Choice("projector_init", "random", "the model's projector is already trained" if not new_model
                  else "no supervised replies to start from")


def choose_train_on_prompt(new_model: bool, method: str, stage: str = "sft") -> Choice:
    """The user turns' words trained beside the replies, for a new composition's supervised replies."""
    if not new_model:
        return Choice("train_on_prompt", False, "a pretrained model: only the replies train, as its chat template says")
    if method == "dpo" or stage == "contrastive":
        return Choice("train_on_prompt", False, "no supervised replies: preference pairs or a contrastive alignment")
    return Choice("train_on_prompt", True, "the user's words are trained too: a question that names what the image "
                  "holds teaches a new projector and the LM to read it, beside the reply")


def choose_steps(samples: int, per_step: int) -> Choice:
    """At least MIN_STEPS steps and one epoch, at most MAX_EPOCHS epochs."""
    epoch = max(1, math.ceil(samples / per_step))
    steps = min(max(MIN_STEPS, epoch), MAX_EPOCHS * epoch)
    return Choice("steps", steps, f"{samples} samples, {per_step} a step: {steps / epoch:.2g} epochs (at least "
                  f"{MIN_STEPS} steps, at most {MAX_EPOCHS} epochs)")


def padded_tokens(lengths: list[int], batch_size: int, order: list[int]) -> int:
    """Tokens of the batches cut from `order` in turn, each padded to its longest sample."""
    return sum(len(batch) * max(lengths[i] for i in batch)
               for batch in (order[k : k + batch_size] for k in range(0, len(order), batch_size)))


def choose_group_by_length(lengths: list[int], batch_size: int) -> Choice:
    """Batches sorted by length only where that saves at least GROUPING_SAVES of the padded tokens.

    Sorting makes a step cheaper by the padding it saves, but samples of one kind (one question type, one
    reply form) have nearly one length, so a sorted batch holds fewer kinds, and a step's gradient follows
    fewer of them. The saving is what sorting the shuffled samples would save: batches cut from the samples
    in length order against the mean of three shuffled orders (a fixed seed, so the choice is a function of
    the lengths); the trainer sorts within runs of 50 batches, which saves a little less."""
    rng = random.Random(0)
    shuffled = []
    for _ in range(3):
        order = list(range(len(lengths)))
        rng.shuffle(order)
        shuffled.append(padded_tokens(lengths, batch_size, order))
    unsorted = sum(shuffled) / len(shuffled)
    saving = 1 - padded_tokens(lengths, batch_size, sorted(range(len(lengths)), key=lengths.__getitem__)) / unsorted
    if saving >= GROUPING_SAVES:
        return Choice("group_by_length", True, f"sorting by length saves {saving:.0%} of the padded tokens: cheaper "
                      "steps are worth batches that hold fewer kinds of sample")
    return Choice("group_by_length", False, f"sorting by length would save {saving:.0%} of the padded tokens: "
                  "shuffled batches that mix the data's kinds of sample learn more per step")


def choose_feature_layer(vision: str) -> Choice | None:
    """The built-in CNN's block before its last (the map its last block reads), rather than its head or its
    last block; other towers keep their own default (a transformers tower's -2, the only features of a timm
    tower or a contrastive run's)."""
    if vision not in BUILTIN_VISION:
        return None
    return Choice("vision_feature_layer", -3, "the CNN's block before its last (192 channels, the map its last block "
                  "reads), as LLaVA reads a ViT below its top: new data's colours, shapes and captions are learned in "
                  "fewer steps than from the last block")


def choose_layout(
    vision: str, image_size: int | None, image_tokens: int | None, image_positions: bool | None, column_words: bool | None,
    feature_layer: int | None = None,
) -> list[Choice]:
    """How a new composition reads and lays out its image tokens, for the keys left at None: the tower's
    layer, the input size (only when the token count is not given either), the token grid, position
    embeddings and column words."""
    from vlmkit.model.dual_encoder import tower_name

    choices = []
    if feature_layer is None and (layer := choose_feature_layer(vision)):
        choices.append(layer)
    vision = tower_name(vision)  # vision=RUN of a dual encoder: decided as for the tower it was built from
    if image_size is None and image_tokens is None:
        choices.append(choose_image_size(vision))
        image_size = choices[-1].value
    if image_tokens is None:
        choices.append(choose_image_tokens(tower_grid(vision, image_size)))
        image_tokens = choices[-1].value
    if image_positions is None:
        choices.append(choose_image_positions(vision))
    if column_words is None:
        choices.append(choose_column_words(image_tokens, vision))
    return choices


def tower_grid(vision: str, image_size: int | None) -> int | None:
    """The side of the tower's feature grid at `image_size`, when it is known without loading weights."""
    if vision in BUILTIN_VISION:
        size, stride = BUILTIN_SIZE, BUILTIN_STRIDE
        return math.ceil((image_size or size) / stride)
    if vision.startswith("timm:"):
        return None
    try:
        from vlmkit.model.vision import _hf_vision_config

        config = _hf_vision_config(vision)
    except Exception:  # the tower's own loading reports a bad name with the full message
        return None
    return (image_size or config.image_size) // config.patch_size


def resolve(cfg: TrainConfig, device_type: str | None = None) -> tuple[TrainConfig, list[Choice]]:
    """`cfg` with every `auto` key decided, and the choices made (the keys the user set are left alone).
    Steps (`epochs` auto) are decided later, from the data's size: see `choose_steps`."""
    device_type = device_type or resolve_device().type
    new_model = not cfg.model
    choices: list[Choice] = []
    values: dict = {}

    def take(choice: Choice) -> None:
        choices.append(choice)
        values[choice.key] = choice.value

    if cfg.method == "auto":
        take(choose_method(new_model, cfg.stage))
    method = values.get("method", cfg.method)
    adapters = method in ("lora", "qlora") or cfg.lora_r > 0
    if cfg.lr is None:
        take(choose_lr(adapters, new_model))
    if cfg.lora_targets == "auto" and adapters:
        take(choose_lora_targets())
    if cfg.batch_size is None:
        take(choose_batch_size(device_type))
    if new_model:
        for choice in choose_layout(cfg.vision, cfg.image_size, cfg.image_tokens, cfg.image_positions, cfg.column_words,
                                    cfg.vision_feature_layer):
            take(choice)
        if cfg.position_words is None:
            words = values.get("column_words", cfg.column_words) and values.get("image_positions", cfg.image_positions)
            take(Choice("position_words", bool(words), "the position embeddings start at the column and row words" if words
                        else "no column words to start from"))
    if cfg.position_words and not values.get("image_positions", cfg.image_positions):
        raise VlmkitError("config field `position_words` needs `image_positions=true` (the embeddings it starts)")
    if cfg.projector_init == "auto":
        take(choose_projector_init(new_model, method))
    if cfg.train_on_prompt is None and cfg.objective == "lm":
        take(choose_train_on_prompt(new_model, method, cfg.stage))
    return dataclasses.replace(cfg, **values), choices

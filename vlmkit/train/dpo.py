"""Direct Preference Optimisation: preference data, pair tokenisation and the sigmoid DPO loss.

Data is TRL's preference format, one pair a line:

    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
     "chosen": [{"role": "assistant", "content": "Red."}],
     "rejected": [{"role": "assistant", "content": "Blue."}],
     "images": ["imgs/a.png"]}

or the plain form, where `prompt`, `chosen` and `rejected` are strings and the prompt becomes one user
turn with one image part per listed image before the text. Rows are checked with the SFT schema's own
message parser (`vlmkit.data.schema`), and every problem is reported with file, line and field.

A pair renders as two conversations, prompt + chosen and prompt + rejected, through the same token-by-
token `processor.render` as SFT; only the response (its text and end-of-turn token) is labelled.

The loss (Rafailov et al. 2023, TRL's `loss_type="sigmoid"`), with log-probabilities summed over the
response tokens of the policy (p) and of the frozen reference (r):

    loss = -log sigmoid(beta * ((p_chosen - r_chosen) - (p_rejected - r_rejected)))

The reference is a separate frozen model, or, for a model with LoRA adapters, the same model with its
adapters switched off (the base weights are the reference and need no second copy in memory).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmkit.data.collate import Example, collate
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.schema import (
    MISSING,
    Reporter,
    check_data_file,
    kind_of,
    listed_images,
    parse_chat,
    parse_rows,
)
from vlmkit.errors import VlmkitError

MAX_LISTED = 20  # problems spelled out in one error; the rest are counted


@dataclass(frozen=True)
class PreferenceSample:
    """One validated pair: normalised prompt messages, the two replies and the prompt's images.

    Messages have the `vlmkit.data.schema.Sample` layout (content = list of text/image parts);
    `chosen` and `rejected` each hold exactly one assistant message; `images[k]` belongs to the k-th
    image part of the prompt.
    """

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    images: tuple[Path, ...]
    source: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass(frozen=True)
class PreferencePair:
    """A tokenised pair: ids and labels (-100 outside the response) for each reply."""

    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    images: tuple  # image paths, in order of appearance (shared by both replies)
    where: str

    @property
    def length(self) -> int:
        return max(len(self.chosen_ids), len(self.rejected_ids))


# ---------------------------------------------------------------------------------------- reading


class _FieldReporter(Reporter):
    """A reporter for the SFT parser that names the preference field instead of `messages`."""

    def __init__(self, parent: Reporter, field: str):
        super().__init__(parent.where)
        self.problems = parent.problems  # shared: one list per row
        self.field = field

    def __call__(self, field: str | None, message: str) -> None:
        if field and field.startswith("messages"):
            field = self.field + field[len("messages") :]
        super().__call__(field, message)


def read_preferences(
    path: str | os.PathLike, *, image_root: str | os.PathLike | None = None, check_images: bool = False
) -> tuple[list[PreferenceSample], list[str]]:
    """Parse every row of a preference `.jsonl` (or `.json` list); return good samples and ALL problems.

    Relative image paths resolve against `image_root`, else the data file's folder; with `check_images`
    each image is also decoded once.
    """
    path = Path(path)
    src = str(path)
    base_dir, problem = check_data_file(path, image_root, "preference data file", "use .jsonl with one pair a line")
    if problem:
        return [], [problem]

    def parse(obj, base, report):
        parsed = _parse_pair(obj, base, report)
        return None if parsed is None else (parsed[:3], parsed[3])

    rows, problems, n_rows = parse_rows(path, base_dir, parse, check_images)
    samples = [PreferenceSample(*value, images, src, line) for line, value, images in rows]
    if n_rows == 0 and not problems:
        problems.append(f"{src}: no preference pairs (the file is empty); add one {{prompt, chosen, rejected}} a line")
    return samples, problems


def load_preferences(path: str | os.PathLike, **kw: Any) -> list[PreferenceSample]:
    """`read_preferences`, but raise one `VlmkitError` listing every problem (the first 20, then a count)."""
    samples, problems = read_preferences(path, **kw)
    if problems:
        shown = problems[:MAX_LISTED]
        more = len(problems) - len(shown)
        tail = f"\n(and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise VlmkitError("\n".join(shown) + tail)
    return samples


def _parse_pair(obj: Any, base_dir: Path, report: Reporter):
    """(prompt, chosen, rejected, [(field, image path)]) or None; every problem goes to `report`."""
    if not isinstance(obj, dict):
        report(None, f"expected a JSON object, got {kind_of(obj)}; write each pair as {{\"prompt\", \"chosen\", \"rejected\"}}")
        return None
    values = {}
    for key in ("prompt", "chosen", "rejected"):
        value = obj.get(key, MISSING)
        if value is MISSING or value is None:
            report(key, "missing; give a string or a list of chat messages")
        elif not isinstance(value, (str, list)):
            report(key, f"expected a string or a list of chat messages, got {kind_of(value)}; fix the value")
        else:
            values[key] = value
    if "prompt" not in values:
        return None

    raw_prompt = values["prompt"]
    if isinstance(raw_prompt, str):
        # The plain form: one user turn, every listed image before the text.
        listed = listed_images(obj, report)
        if listed is None:
            return None
        raw_prompt = [{"role": "user", "content": [{"type": "image"}] * len(listed) + [{"type": "text", "text": raw_prompt}]}]
    row = {"messages": raw_prompt, **{k: obj[k] for k in ("images", "image") if k in obj}}
    parsed_prompt = parse_chat(row, base_dir, _FieldReporter(report, "prompt"))
    if parsed_prompt is not None and parsed_prompt[0][-1]["role"] == "assistant":
        report("prompt", "ends with an assistant message; the prompt should end with the user's turn")

    replies = {}
    for key in ("chosen", "rejected"):
        if key in values:
            replies[key] = _parse_reply(values[key], key, base_dir, report)
    if parsed_prompt is None or any(replies.get(k) is None for k in ("chosen", "rejected")):
        return None
    return parsed_prompt[0], replies["chosen"], replies["rejected"], parsed_prompt[1]


def _parse_reply(value: str | list, key: str, base_dir: Path, report: Reporter) -> list[dict] | None:
    """One assistant message from a string or a one-message list; images are not allowed in replies."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    elif len(value) != 1:
        report(key, f"has {len(value)} messages; give exactly one {{\"role\": \"assistant\", \"content\": ...}}")
        return None
    content = value[0].get("content") if isinstance(value[0], dict) else None
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "image" for p in content):
        report(f"{key}[0].content", "has an image part; images belong in the prompt, replies are text")
        return None
    n_before = len(report.problems)
    parsed = parse_chat({"messages": value}, base_dir, _FieldReporter(report, key))
    if parsed is None or len(report.problems) > n_before:
        return None
    messages = parsed[0]
    if messages[0]["role"] != "assistant":
        report(f"{key}[0].role", f"{messages[0]['role']!r} must be assistant; the reply is the assistant's turn")
        return None
    return messages


# ---------------------------------------------------------------------------------------- tokenising


def tokenize_pair(sample: PreferenceSample, processor, max_length: int) -> PreferencePair:
    """Render prompt+chosen and prompt+rejected; labels are -100 everywhere but the response.

    Both come from `processor.render` on the full conversation (the SFT path), and the prompt's share is
    masked by its own rendered length, so earlier assistant turns in the prompt are not trained. A reply
    longer than `max_length` is cut at the end; leaving no reply token to score is an error naming the
    sample (the prompt, with its image tokens, is never cut).
    """
    prompt_ids, _ = processor.render(sample.prompt)
    out = []
    for name, reply in (("chosen", sample.chosen), ("rejected", sample.rejected)):
        ids, labels = processor.render(sample.prompt + reply)
        if ids[: len(prompt_ids)] != prompt_ids:  # render is a concatenation per message; guard it anyway
            raise VlmkitError(f"{sample.where}: the prompt renders differently inside the conversation; report this bug")
        labels = ([IGNORE_INDEX] * len(prompt_ids) + labels[len(prompt_ids) :])[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise VlmkitError(
                f"{sample.where}: the prompt is {len(prompt_ids)} tokens, and max_length={max_length} leaves no "
                f"token of the {name} reply to score; raise max_length or shorten the prompt"
            )
        out += [ids[:max_length], labels]
    return PreferencePair(*out, images=tuple(str(p) for p in sample.images), where=sample.where)


def collate_pairs(pairs: list[PreferencePair], pad_id: int, image_source) -> dict:
    """Pad a list of pairs to one width; the batch `dpo_step_loss` takes.

    Keys: `chosen_input_ids`, `chosen_attention_mask`, `chosen_labels` and the same with `rejected_`,
    each (B, T), plus the images of each pair once, in pair order, as `image_source(paths)` gives them
    (`pixel_values` or `image_features`).
    """
    chosen = [Example(p.chosen_ids, p.chosen_labels, p.images, p.where) for p in pairs]
    rejected = [Example(p.rejected_ids, p.rejected_labels, (), p.where) for p in pairs]
    both = collate(chosen + rejected, pad_id, image_source)  # one width for all 2B rows, images once
    n = len(pairs)
    batch = {k: v for k, v in both.items() if k not in ("input_ids", "attention_mask", "labels")}
    for key in ("input_ids", "attention_mask", "labels"):
        batch[f"chosen_{key}"], batch[f"rejected_{key}"] = both[key][:n], both[key][n:]
    return batch


# ---------------------------------------------------------------------------------------- the loss


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B,) sum of log p(label) over labelled positions.

    Position t predicts token t+1 (logits[:, :-1] against labels[:, 1:]); -100 labels are skipped. Only
    the labelled rows of the logits are normalised, in float32.
    """
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE_INDEX
    picked = logits[:, :-1][keep].float()  # (N_labelled, V)
    token_logps = picked.gather(-1, targets[keep].unsqueeze(-1)).squeeze(-1) - picked.logsumexp(-1)  # (N,)
    rows = keep.nonzero()[:, 0]  # the sequence each labelled position belongs to
    return torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=logits.device).index_add(0, rows, token_logps)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO loss on (B,) summed log-probabilities; returns (mean loss, metrics).

    Metrics follow TRL: rewards/chosen = mean beta * (p_chosen - r_chosen), rewards/rejected likewise,
    rewards/margins = their difference, rewards/accuracy = share of pairs whose chosen reward is higher.
    """
    chosen_rewards = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    chosen_rewards, rejected_rewards = chosen_rewards.detach().double(), rejected_rewards.detach().double()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
    }
    return loss, metrics


def has_adapters(model) -> bool:
    """True if peft adapter layers (LoRA, injected or through a PeftModel) are inside `model`."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


@contextmanager
def adapters_disabled(model):
    """Run `model` as its base model: every peft adapter switched off, and restored afterwards.

    A `PeftModel` uses its own `disable_adapter()`. A model with adapters injected in place
    (`peft.inject_adapter_in_model`, as `vlmkit.train.lora.add_lora` does) has no such method: each
    adapter layer is switched with `enable_adapters(False)` (what `PeftModel.disable_adapter` does
    underneath). Switching back calls `set_adapter`, which marks adapter weights trainable, so each
    parameter's `requires_grad` is saved before and put back exactly as it was.
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel):
        with model.disable_adapter():
            yield
        return
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise VlmkitError("the model has no LoRA adapters to switch off; give DPO a reference model (ref_model=...)")
    was_disabled = [m.disable_adapters for m in layers]
    requires_grad = {p: p.requires_grad for m in layers for p in m.parameters()}
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, disabled in zip(layers, was_disabled):
            m.enable_adapters(not disabled)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)


def concat_pairs(batch: dict, pad_id: int | None = None) -> tuple[dict, torch.Tensor]:
    """A pair batch -> (model inputs for 2B rows, chosen first, then rejected; (2B, T) labels).

    The pairs' images are given once; both halves need them, in row order, so they are repeated.
    """
    if "pair_inputs" in batch:  # already laid out as 2B rows (pretrained models' processors)
        return batch["pair_inputs"], batch["pair_labels"]
    halves = [
        (batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], batch[f"{side}_labels"])
        for side in ("chosen", "rejected")
    ]
    width = max(h[0].shape[1] for h in halves)
    if any(h[0].shape[1] != width for h in halves):
        if pad_id is None:
            raise VlmkitError(
                "chosen and rejected ids differ in width and no pad id is known; build batches with collate_pairs"
            )
        halves = [
            (F.pad(ids, (0, width - ids.shape[1]), value=pad_id), F.pad(mask, (0, width - mask.shape[1]), value=0),
             F.pad(labels, (0, width - labels.shape[1]), value=IGNORE_INDEX))
            for ids, mask, labels in halves
        ]
    inputs = {
        "input_ids": torch.cat([halves[0][0], halves[1][0]]),  # (2B, T)
        "attention_mask": torch.cat([halves[0][1], halves[1][1]]),
    }
    for key in ("pixel_values", "image_features"):
        if batch.get(key) is not None:
            inputs[key] = torch.cat([batch[key], batch[key]])
    return inputs, torch.cat([halves[0][2], halves[1][2]])


def policy_logps(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """(2B,) summed response log-probabilities under `model` (with gradients)."""
    return sequence_logps(model(**inputs).logits, labels)


@torch.no_grad()
def reference_logps(model, inputs: dict, labels: torch.Tensor, ref_model=None) -> torch.Tensor:
    """(2B,) reference log-probabilities: `ref_model`, or `model` with its adapters switched off.

    Runs in each model's current train/eval mode: keep dropout at 0 in the LM (LoRA dropout does not
    matter, the adapters are off) or the reference is noisy.
    """
    if ref_model is not None:
        return sequence_logps(ref_model(**inputs).logits, labels)
    if not has_adapters(model):
        raise VlmkitError(
            "DPO needs a reference: pass ref_model (a frozen copy of the starting model) or train with LoRA "
            "(lora_r > 0), whose base weights serve as the reference"
        )
    with adapters_disabled(model):
        return sequence_logps(model(**inputs).logits, labels)


def dpo_step_loss(model, batch: dict, ref_model=None, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """The DPO loss of one pair batch (see `collate_pairs`); returns (loss, metrics).

    The policy runs once on chosen and rejected stacked into one (2B, T) batch. Reference log-probs come
    from `batch["ref_chosen_logps"]`/`batch["ref_rejected_logps"]` when precomputed, else from
    `reference_logps`. Metrics are `dpo_loss`'s plus the mean policy and reference log-probs.
    """
    n = batch["pair_labels"].shape[0] // 2 if "pair_labels" in batch else batch["chosen_input_ids"].shape[0]
    pad_id = getattr(getattr(model, "config", None), "pad_token_id", None)
    inputs, labels = concat_pairs(batch, pad_id)
    logps = policy_logps(model, inputs, labels)
    if batch.get("ref_chosen_logps") is not None and batch.get("ref_rejected_logps") is not None:
        ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).to(logps)
    else:
        ref = reference_logps(model, inputs, labels, ref_model)
    loss, metrics = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta)
    detached = logps.detach()
    metrics.update({
        "logps/chosen": detached[:n].mean().item(),
        "logps/rejected": detached[n:].mean().item(),
        "ref_logps/chosen": ref[:n].mean().item(),
        "ref_logps/rejected": ref[n:].mean().item(),
    })
    return loss, metrics

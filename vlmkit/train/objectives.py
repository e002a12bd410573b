"""What a training step optimises: supervised fine-tuning (SFT) or DPO, for any model.

The loop is the same for both; an objective supplies the parts that differ: how the data file is read
and tokenized (vlmkit's own `render` for composed models, the model's own processor and chat template
for pretrained ones), how a list of examples becomes a batch, and the loss of a batch (with metrics to
log). Evaluation is the mean loss over held-out examples.

DPO's reference log-probabilities come from the starting model, computed once before the first step
and saved in the run folder (`ref_logps.pt`): the reference costs no memory during training, stays
exactly the starting model even though the projector trains in full beside LoRA, and a resumed run
reuses the same values. They are computed in the run's precision and in the micro-batches of the
first epoch (padding and matrix shapes change low-order bits, which bf16 makes visible), so the first
step's policy equals its reference and its loss is exactly log 2 in bf16 as in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlmkit.data.collate import collate, tokenize_samples
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.schema import load_samples
from vlmkit.errors import VlmkitError

REF_LOGPS = "ref_logps.pt"


@dataclass(frozen=True)
class TemplatePair:
    """A preference pair rendered through a pretrained model's template; labels cover only the reply."""

    chosen: object  # vlmkit.data.template.TemplateExample
    rejected: object
    images: tuple
    where: str

    @property
    def length(self) -> int:
        return max(self.chosen.length, self.rejected.length)


class Sft:
    name = "sft"

    def __init__(self, cfg, processor, family, images):
        self.cfg, self.processor, self.family, self.images = cfg, processor, family, images
        self.own = family.name == "vlmkit"
        self.pad_id = processor.tokenizer.pad_token_id

    @staticmethod
    def read(path):
        return load_samples(path)

    def tokenize(self, samples):
        """(examples, n_skipped)."""
        cfg = self.cfg
        if self.own:
            return tokenize_samples(samples, self.processor, cfg.max_length, cfg.skip_too_long)
        from vlmkit.data.template import tokenize_with_template

        return tokenize_with_template(samples, self.processor, self.family, cfg.max_length, cfg.skip_too_long)

    def batch(self, chunk) -> dict:
        if self.own:
            return collate(chunk, self.pad_id, self.images)
        from vlmkit.data.template import collate_with_template

        return collate_with_template(chunk, self.processor, self.family)

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        return model(**batch).loss, {}

    @staticmethod
    def weight(batch) -> int:
        """What the batch's loss is a mean over: its trained tokens (the labels, shifted)."""
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    @torch.no_grad()
    def eval(self, model, examples, batch_size: int, to_device) -> float:
        """Mean cross-entropy per trained token."""
        total, count = 0.0, 0
        for i in range(0, len(examples), batch_size):
            batch = to_device(self.batch(examples[i : i + batch_size]))
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((labels[:, 1:] != IGNORE_INDEX).sum())
        return total / max(1, count)

    def prepare(self, model, examples, out: Path, to_device, chunks, autocast) -> None:
        """Work before the first step (none for SFT). `chunks`: the first epoch's micro-batches, then any
        samples no batch holds; `autocast()`: the run's precision context."""


class Dpo(Sft):
    name = "dpo"

    def __init__(self, cfg, processor, family, images):
        super().__init__(cfg, processor, family, images)
        self.ref: dict[int, tuple[float, float]] = {}  # id(example) -> (chosen, rejected) reference log-probs

    @staticmethod
    def read(path):
        from vlmkit.train.dpo import load_preferences

        return load_preferences(path)

    def tokenize(self, samples):
        from vlmkit.train.dpo import tokenize_pair

        if self.own:
            return [tokenize_pair(s, self.processor, self.cfg.max_length) for s in samples], 0
        return [self._template_pair(s) for s in samples], 0

    def _template_pair(self, sample) -> TemplatePair:
        from dataclasses import replace

        from vlmkit.data.template import TemplateRenderer

        renderer = TemplateRenderer(self.processor, self.family)
        sides = []
        for reply in (sample.chosen, sample.rejected):
            example = renderer.render(sample.prompt + reply, list(sample.images), sample.where)
            if len(example.input_ids) > self.cfg.max_length:
                raise VlmkitError(f"{sample.where}: {len(example.input_ids)} tokens, over max_length={self.cfg.max_length}")
            first = _last_span_start(example.labels)  # earlier assistant turns belong to the prompt
            sides.append(replace(example, labels=[IGNORE_INDEX] * first + example.labels[first:]))
        return TemplatePair(sides[0], sides[1], tuple(str(p) for p in sample.images), sample.where)

    def batch(self, chunk) -> dict:
        if self.own:
            from vlmkit.train.dpo import collate_pairs

            batch = collate_pairs(chunk, self.pad_id, self.images)
        else:
            batch = self._template_batch(chunk)
        if self.ref:
            batch["ref_chosen_logps"] = torch.tensor([self.ref[id(p)][0] for p in chunk])
            batch["ref_rejected_logps"] = torch.tensor([self.ref[id(p)][1] for p in chunk])
        return batch

    def _template_batch(self, chunk) -> dict:
        """Chosen rows then rejected rows through the processor, as one (2B, T) batch."""
        from vlmkit.data.template import collate_with_template

        both = collate_with_template([p.chosen for p in chunk] + [p.rejected for p in chunk], self.processor, self.family)
        labels = both.pop("labels")
        return {"pair_inputs": both, "pair_labels": labels}

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        from vlmkit.train.dpo import dpo_step_loss

        return dpo_step_loss(model, batch, beta=self.cfg.beta)

    @staticmethod
    def weight(batch) -> int:
        """DPO's loss is a mean over pairs."""
        return int(batch["pair_labels"].shape[0] // 2 if "pair_labels" in batch else batch["chosen_input_ids"].shape[0])

    @torch.no_grad()
    def eval(self, model, examples, batch_size: int, to_device) -> float:
        """Mean DPO loss over held-out pairs (their reference log-probs computed on first use)."""
        missing = [e for e in examples if id(e) not in self.ref]
        if missing:  # evaluate() runs under the run's autocast already
            self._reference(model, [missing[i : i + batch_size] for i in range(0, len(missing), batch_size)], to_device)
        losses = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            loss, _ = self.loss(model, to_device(self.batch(chunk)))
            losses += [loss.item()] * len(chunk)
        return sum(losses) / max(1, len(losses))

    def prepare(self, model, examples, out: Path, to_device, chunks, autocast) -> None:
        """Reference log-probs of every training pair from the starting model; reused on resume."""
        path = out / REF_LOGPS
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved.shape[0] != len(examples):
                raise VlmkitError(f"{path}: holds {saved.shape[0]} pairs but the data has {len(examples)}; start a new run")
            self.ref.update({id(e): (float(c), float(r)) for e, (c, r) in zip(examples, saved)})
            return
        with autocast():
            self._reference(model, chunks, to_device)
        values = torch.tensor([self.ref[id(e)] for e in examples])
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(values, tmp)
        tmp.replace(path)

    def _reference(self, model, chunks, to_device) -> None:
        from tqdm.auto import tqdm
        import sys

        from vlmkit.train.dpo import concat_pairs, sequence_logps

        was_training = model.training
        model.eval()
        saved, self.ref = self.ref, {}  # no reference keys in these batches
        for chunk in tqdm(chunks, desc="reference log-probs", unit="batch", file=sys.stderr):
            batch = to_device(self.batch(chunk))
            inputs, labels = concat_pairs(batch, self.pad_id)
            logps = sequence_logps(model(**inputs).logits, labels).float().cpu()
            n = len(chunk)
            saved.update({id(e): (logps[k].item(), logps[n + k].item()) for k, e in enumerate(chunk)})
        self.ref = saved
        model.train(was_training)


def _last_span_start(labels: list[int]) -> int:
    """Index where the last run of labelled tokens starts (the final assistant turn)."""
    i = len(labels)
    while i > 0 and labels[i - 1] == IGNORE_INDEX:
        i -= 1
    while i > 0 and labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i


def objective_for(cfg, processor, family, images):
    return (Dpo if cfg.method == "dpo" else Sft)(cfg, processor, family, images)

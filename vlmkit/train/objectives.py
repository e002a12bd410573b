"""What a training step optimises: supervised fine-tuning (SFT) or DPO, for any model.

The loop is the same for both; an objective supplies the parts that differ: how the data file is read
and tokenized, how a list of examples becomes a batch, and the loss of a batch (with metrics to log).
Both go through the model's renderer (`vlmkit.data.collate.renderer_for`: vlmkit's own processor or a
pretrained model's chat template), chosen once, so neither knows which kind of model it trains.
Evaluation is the mean loss over held-out examples.

DPO's reference log-probabilities come from the starting model, computed once before the first step
and saved in the run folder (`ref_logps.pt`): the reference costs no memory during training, stays
exactly the starting model even though the projector trains in full beside LoRA, and a resumed run
reuses the same values. They are computed in the run's precision and in the micro-batches of the
first epoch (padding and matrix shapes change low-order bits, which bf16 makes visible), so the first
step's policy equals its reference and its loss is exactly log 2 in bf16 as in fp32.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlmkit.data.collate import tokenize
from vlmkit.data.preferences import collate_pairs, load_preferences, tokenize_pairs
from vlmkit.data.processor import IGNORE_INDEX
from vlmkit.data.schema import load_samples
from vlmkit.errors import VlmkitError
from vlmkit.io import atomic_write
from vlmkit.train.dpo import dpo_step_loss, sequence_logps

REF_LOGPS = "ref_logps.pt"


class Sft:
    name = "sft"

    def __init__(self, cfg, renderer, images):
        self.cfg, self.renderer, self.images = cfg, renderer, images

    @staticmethod
    def read(path):
        return load_samples(path)

    def tokenize(self, samples):
        """(examples, n_skipped)."""
        return tokenize(samples, self.renderer, self.cfg.max_length, self.cfg.skip_too_long)

    def batch(self, chunk) -> dict:
        return self.renderer.collate(chunk, self.images)

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

    def __init__(self, cfg, renderer, images):
        super().__init__(cfg, renderer, images)
        self.ref: dict[int, tuple[float, float]] = {}  # id(pair) -> (chosen, rejected) reference log-probs

    @staticmethod
    def read(path):
        return load_preferences(path)

    def tokenize(self, samples):
        return tokenize_pairs(samples, self.renderer, self.cfg.max_length), 0

    def batch(self, chunk) -> dict:
        batch = collate_pairs(chunk, self.renderer, self.images)
        if self.ref:
            batch["ref_chosen_logps"] = torch.tensor([self.ref[id(p)][0] for p in chunk])
            batch["ref_rejected_logps"] = torch.tensor([self.ref[id(p)][1] for p in chunk])
        return batch

    def loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        return dpo_step_loss(model, batch, beta=self.cfg.beta)

    @staticmethod
    def weight(batch) -> int:
        """DPO's loss is a mean over pairs."""
        return int(batch["pair_labels"].shape[0] // 2)

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
        atomic_write(path, lambda tmp: torch.save(values, tmp))

    def _reference(self, model, chunks, to_device) -> None:
        was_training = model.training
        model.eval()
        saved, self.ref = self.ref, {}  # no reference keys in these batches
        for chunk in tqdm(chunks, desc="reference log-probs", unit="batch", file=sys.stderr):
            batch = to_device(self.batch(chunk))
            logps = sequence_logps(model(**batch["pair_inputs"]).logits, batch["pair_labels"]).float().cpu()
            n = len(chunk)
            saved.update({id(e): (logps[k].item(), logps[n + k].item()) for k, e in enumerate(chunk)})
        self.ref = saved
        model.train(was_training)


def objective_for(cfg, renderer, images):
    return (Dpo if cfg.method == "dpo" else Sft)(cfg, renderer, images)

"""How soon does the LM learn a presence question when each image token already holds what is in its cell?

Three-column scenes (`bench/scenes.py`: 1-3 shapes, 6 colours, 4 kinds, one per column) are given to
SmolLM2-135M-Instruct as text with one stand-in token per column, after the column's word, as the recipe
lays image tokens out: " left" T " middle" T " right" T, then "Is there an orange diamond?" (half the
"no"s share a colour or a kind with a shape present, as in the benchmark's scenes3). A column's token is
`--tokens words`: the sum of the LM's embeddings of its shape's colour and kind (" orange" + " diamond"),
or " empty"; `--tokens random`: the same sum of fixed random vectors, one per colour, kind and "empty".
Both at the norm of the LM's word embeddings, neither trained. What trains is what the recipe trains in the
LM: LoRA r16 on the attention (alpha 32), learning rate 1e-3 with 5% warm-up and a cosine to a tenth,
AdamW (0.9, 0.95), clipping at 1, batches of 4, the question's words and the reply trained. Every
`--every` steps it prints the held-out accuracy on 300 fixed scenes (yes or no, whichever the LM's next
token scores higher) and how many it answered "yes".

    python bench/presence_words.py --tokens words --seed 0
    python bench/presence_words.py --tokens random --seed 0
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.datasets import _absent_pair, with_article  # noqa: E402
from bench.scenes import COLUMNS3, KINDS, PALETTE, draw_scene  # noqa: E402
from vlmkit.model.llm import load_llm  # noqa: E402

COLOURS, SHAPES = list(PALETTE)[:6], KINDS[:4]
TEST_SCENES = 300


class Scenes:
    """Presence questions as (input embeddings, labels, the position that predicts the reply, yes?)."""

    def __init__(self, lm, tokenizer, tokens: str):
        self.table = lm.get_input_embeddings().weight.detach()
        self.tokenizer = tokenizer
        self.norm = self.table.norm(dim=1).mean()
        names = ["empty", *COLOURS, *SHAPES]
        if tokens == "words":
            self.vectors = {n: self.table[self.ids(" " + n)].sum(0) for n in names}
        else:
            self.vectors = {n: torch.randn(self.table.shape[1], generator=torch.Generator().manual_seed(1234 + i))
                            for i, n in enumerate(names)}

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def cell(self, obj) -> torch.Tensor:
        v = self.vectors["empty"] if obj is None else self.vectors[obj.colour] + self.vectors[obj.kind]
        return (v / v.norm() * self.norm)[None]

    def sample(self, rng: np.random.Generator):
        scene = draw_scene(rng, 96, COLUMNS3, int(rng.integers(1, 4)), COLOURS, SHAPES)
        yes = bool(rng.integers(2))
        if yes:
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            colour, kind = o.colour, o.kind
        else:
            colour, kind = _absent_pair(scene, rng, COLOURS, SHAPES)
        parts, labels = [self.table[self.ids("<|im_start|>user\n")]], []
        for column, word in enumerate((" left", " middle", " right")):
            obj = next((o for o in scene.objects if o.cell == column), None)
            parts += [self.table[self.ids(word)], self.cell(obj)]
        labels = [-100] * sum(len(p) for p in parts)
        question = self.ids(f" Is there {with_article(colour + ' ' + kind)}?<|im_end|>\n<|im_start|>assistant\n")
        reply = self.ids(("yes" if yes else "no") + "<|im_end|>")
        parts += [self.table[question], self.table[reply]]
        labels += question + reply
        return torch.cat(parts), torch.tensor(labels), len(labels) - len(reply) - 1, yes


def batch(samples):
    longest = max(len(s[0]) for s in samples)
    x = torch.zeros(len(samples), longest, samples[0][0].shape[1])
    y = torch.full((len(samples), longest), -100)
    mask = torch.zeros(len(samples), longest, dtype=torch.long)
    for i, (embeds, labels, _, _) in enumerate(samples):
        x[i, : len(embeds)], y[i, : len(labels)], mask[i, : len(embeds)] = embeds, labels, 1
    return x, y, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", choices=["words", "random"], default="words", help="what a column's token holds")
    p.add_argument("--seed", type=int, default=0, help="the adapters' start and the training scenes")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=50, help="steps between held-out scores")
    a = p.parse_args()

    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(a.seed)
    lm, tokenizer = load_llm("smollm2-135m")
    lm.requires_grad_(False)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules=attention), lm)
    params = [q for n, q in lm.named_parameters() if "lora_" in n]
    for q in params:
        q.requires_grad_(True)
    scenes = Scenes(lm, tokenizer, a.tokens)
    test_rng, rng = np.random.default_rng(999), np.random.default_rng(100 + a.seed)
    test = [scenes.sample(test_rng) for _ in range(TEST_SCENES)]
    yes_id, no_id = scenes.ids("yes")[0], scenes.ids("no")[0]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, int(0.05 * a.steps))
    def rate(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)

    def held_out() -> tuple[float, int]:
        lm.eval()
        right = said_yes = 0
        with torch.no_grad():
            for k in range(0, len(test), 50):
                chunk = test[k : k + 50]
                x, _, mask = batch(chunk)
                logits = lm(inputs_embeds=x, attention_mask=mask).logits
                for j, (_, _, at, yes) in enumerate(chunk):
                    says_yes = bool(logits[j, at, yes_id] > logits[j, at, no_id])
                    right, said_yes = right + (says_yes == yes), said_yes + says_yes
        lm.train()
        return right / len(test), said_yes

    start, losses = time.time(), []
    for step in range(1, a.steps + 1):
        x, y, mask = batch([scenes.sample(rng) for _ in range(4)])
        logits = lm(inputs_embeds=x, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % a.every == 0:
            accuracy, said_yes = held_out()
            print(f"{a.tokens} seed {a.seed} step {step}: loss {np.mean(losses[-a.every:]):.3f}, "
                  f"held-out {accuracy:.3f} ({said_yes} of {len(test)} answered yes), {time.time() - start:.0f} s",
                  flush=True)


if __name__ == "__main__":
    main()

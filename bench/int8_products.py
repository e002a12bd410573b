"""int8 products with the frozen weights (`precision=int8-frozen`, vlmkit.model.frozen_int8) against fp32.

`bf16-frozen` needs bf16 units; a CPU without them (AVX2 only) trains in fp32 unless it multiplies the frozen
weights in int8. This measures, on a trained run's model and its own training samples:

1. the product shapes of a step (124 rows: 4 samples of about 31 tokens) in fp32 and in int8;
2. the loss and the projector's gradient with `FrozenInt8` on the model (every frozen linear layer of the
   LM in int8, forward and input gradients alike, not its head) against fp32, and the time of a forward
   and backward; also with fbgemm's input rounding as it is (one scale for the whole input matrix).

    python bench/int8_products.py RUN            # RUN: a `vlmkit quickstart` or `vlmkit train` output folder

The figures are in docs/precision.md ("int8 products with the frozen weights").
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vlmkit.model import frozen_int8  # noqa: E402
from vlmkit.model.frozen_int8 import pack, product  # noqa: E402


def seconds(fn, repeat: int = 30) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def per_matrix_product(x: torch.Tensor, packed) -> torch.Tensor:
    """fbgemm's dynamic linear as it is: the input rounded at one scale for the whole matrix (what
    `frozen_int8.product` avoids by scaling each row first)."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    return torch.ops.quantized.linear_dynamic(flat, packed, True).reshape(*x.shape[:-1], -1)


def shapes_table(rows: int = 124) -> None:
    print("| product | fp32 ms (GFLOPS) | int8 ms (GFLOPS) |\n|---|---|---|")
    for k, n in ((576, 1536), (1536, 576), (576, 576)):
        x, w = torch.randn(rows, k), torch.randn(n, k) * 0.02
        packed = pack(w)
        flops = 2 * rows * k * n
        t32 = seconds(lambda: x @ w.t())
        t8 = seconds(lambda: product(x, packed))
        print(f"| {rows} x {k} by {k} x {n} | {t32 * 1e3:.2f} ({flops / t32 / 1e9:.0f}) | {t8 * 1e3:.2f} ({flops / t8 / 1e9:.0f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder: its model/ and data/train.jsonl are read")
    parser.add_argument("--batches", type=int, default=16, help="batches of 4 training samples compared")
    args = parser.parse_args()

    from vlmkit.build import load_model
    from vlmkit.data.collate import renderer_for, tokenize
    from vlmkit.data.schema import load_samples
    from vlmkit.train.features import ImageSource

    torch.manual_seed(0)
    shapes_table()
    run = Path(args.run)
    model, processor = load_model(run / "model")
    model.train()
    renderer = renderer_for(processor, "vlmkit", train_prompt=True)
    examples, _ = tokenize(load_samples(str(run / "data" / "train.jsonl"))[: 4 * args.batches], renderer, 512)
    images = ImageSource(model, processor, torch.device("cpu"), cache=True)
    batches = [renderer.collate(examples[i : i + 4], images) for i in range(0, len(examples), 4)]
    projector = {id(p) for p in model.projector.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in projector)

    def measure() -> tuple[list[float], list[torch.Tensor], float]:
        losses, grads, spent = [], [], 0.0
        for batch in batches:
            model.zero_grad()
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            spent += time.perf_counter() - start
            losses.append(loss.item())
            grads.append(torch.cat([p.grad.flatten() for p in model.projector.parameters() if p.grad is not None]))
        return losses, grads, spent / len(batches)

    measure()  # warm-up: the image features are cached, the kernels chosen
    base_loss, base_grad, base_s = measure()
    print("\n| products | mean loss | largest loss difference | projector gradient cosine, min / mean | s a forward and backward |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {sum(base_loss) / len(base_loss):.4f} | | | {base_s:.3f} |")
    for name, fn in (("int8, one scale a token (`int8-frozen`)", frozen_int8.product),
                     ("int8, one scale for the whole input matrix", per_matrix_product)):
        frozen_int8.product, kept = fn, frozen_int8.product  # what the frozen layers call
        frozen = frozen_int8.FrozenInt8(model)
        losses, grads, spent = measure()
        frozen.restore()
        frozen_int8.product = kept
        cos = [nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in zip(base_grad, grads)]
        worst = max(abs(a - b) for a, b in zip(base_loss, losses))
        print(f"| {name} | {sum(losses) / len(losses):.4f} | {worst:.4f} | "
              f"{min(cos):.3f} / {sum(cos) / len(cos):.3f} | {spent:.3f} |")
    print(f"| fp32 again | | | | {measure()[2]:.3f} |")
    print("\n(every frozen linear layer of the model but the head in int8; "
          f"{len(batches)} batches of 4 training samples)")


if __name__ == "__main__":
    main()

"""Would int8 products with the frozen weights speed up training on a CPU without bf16 units?

`bf16-frozen` (vlmkit.model.frozen_bf16) needs bf16 units; an AVX2-only CPU trains in fp32. fbgemm's
dynamic int8 linear (int8 weights, the input quantized at each call) runs on AVX2. This measures, on a
trained run's model and its own training samples:

1. the product shapes of a step (124 rows: 4 samples of about 31 tokens) in fp32 and in fbgemm int8;
2. the loss and the projector's gradient with every frozen linear layer of the LM (not its head) in int8,
   forward and input gradients alike, against fp32: the input quantized as fbgemm does it (one scale for
   the whole matrix) and with each row first scaled to its largest value (one scale a token).

    python bench/int8_products.py RUN            # RUN: a `vlmkit quickstart` or `vlmkit train` output folder
    python bench/int8_products.py RUN --skip down_proj   # keep the MLPs' down-projections in fp32

The figures are in docs/precision.md ("int8 products with the frozen weights").
"""

from __future__ import annotations

import argparse
import os
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402


def seconds(fn, repeat: int = 30) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def quantized(weight: torch.Tensor):
    """fbgemm's packed int8 weight, one symmetric scale per output row."""
    scale = (weight.abs().amax(dim=1) / 127).clamp_min(1e-8).double()
    q = torch.quantize_per_channel(weight.contiguous(), scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


def int8_product(x: torch.Tensor, packed, per_row: bool) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    if per_row:  # each row at the full int8 range: one scale a token instead of one for the whole matrix
        scale = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
        out = torch.ops.quantized.linear_dynamic((flat / scale).contiguous(), packed, True) * scale
    else:
        out = torch.ops.quantized.linear_dynamic(flat.contiguous(), packed, True)
    return out.reshape(*x.shape[:-1], -1)


class Int8Linear(torch.autograd.Function):
    """y = x W^T and dL/dx = dL/dy W, both as int8 products (a frozen weight needs no gradient of its own)."""

    @staticmethod
    def forward(ctx, x, packed, packed_t, per_row):
        ctx.packed_t, ctx.per_row = packed_t, per_row
        return int8_product(x, packed, per_row)

    @staticmethod
    def backward(ctx, grad):
        return int8_product(grad, ctx.packed_t, ctx.per_row), None, None, None


def shapes_table(rows: int = 124) -> None:
    print("| product | fp32 ms (GFLOPS) | fbgemm int8 ms (GFLOPS) |\n|---|---|---|")
    for k, n in ((576, 1536), (1536, 576), (576, 576)):
        x, w = torch.randn(rows, k), torch.randn(n, k) * 0.02
        packed = quantized(w)
        flops = 2 * rows * k * n
        t32 = seconds(lambda: x @ w.t())
        t8 = seconds(lambda: torch.ops.quantized.linear_dynamic(x, packed, True))
        print(f"| {rows} x {k} by {k} x {n} | {t32 * 1e3:.2f} ({flops / t32 / 1e9:.0f}) | {t8 * 1e3:.2f} ({flops / t8 / 1e9:.0f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder: its model/ and data/train.jsonl are read")
    parser.add_argument("--batches", type=int, default=16, help="batches of 4 training samples compared")
    parser.add_argument("--skip", nargs="*", default=[], help="layer names kept in fp32 (e.g. down_proj)")
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

    head = model.get_output_embeddings()
    layers = [m for name, m in model.language_model.named_modules()
              if type(m) is nn.Linear and m is not head and name.rsplit(".", 1)[-1] not in args.skip]
    packs = {id(m): (quantized(m.weight.detach()), quantized(m.weight.detach().t())) for m in layers}

    def use(mode: str) -> None:
        for m in layers:
            vars(m).pop("forward", None)
            if mode != "fp32":
                def forward(self, x, per_row=mode == "per-row"):
                    return Int8Linear.apply(x, *packs[id(self)], per_row)
                m.forward = types.MethodType(forward, m)

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

    use("fp32")
    measure()  # warm-up: the image features are cached, the kernels chosen
    base_loss, base_grad, base_s = measure()
    print(f"\n{len(layers)} LM linear layers in int8 (kept in fp32: the head{', ' + ', '.join(args.skip) if args.skip else ''}); "
          f"{len(batches)} batches of 4 training samples\n")
    print("| products | mean loss | largest loss difference | projector gradient cosine, min / mean | s a forward and backward |")
    print("|---|---|---|---|---|")
    print(f"| fp32 | {sum(base_loss) / len(base_loss):.4f} | | | {base_s:.3f} |")
    for mode in ("per-tensor", "per-row"):
        use(mode)
        losses, grads, spent = measure()
        cos = [nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in zip(base_grad, grads)]
        worst = max(abs(a - b) for a, b in zip(base_loss, losses))
        print(f"| int8, input scaled {mode} | {sum(losses) / len(losses):.4f} | {worst:.4f} | "
              f"{min(cos):.3f} / {sum(cos) / len(cos):.3f} | {spent:.3f} |")
    use("fp32")
    print(f"| fp32 again | | | | {measure()[2]:.3f} |")


if __name__ == "__main__":
    main()

"""Estimated peak training memory for a 256M and a 2B VLM, per method (the `vlmkit train --dry-run` plan).

The models are built on PyTorch's meta device from their published dimensions (no weights, nothing
downloaded): SmolVLM-256M-Instruct and Qwen2-VL-2B-Instruct. Prints one table; the figures are the
plan's estimates (see vlmkit/train/plan.py), not measurements.

    python bench/plan_sizes.py [--batch 4] [--seq 1024]
"""

from __future__ import annotations

import argparse

import torch


def smolvlm_256m():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    config = SmolVLMConfig(
        text_config={"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49280, "tie_word_embeddings": False},
        vision_config={"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                       "patch_size": 16, "image_size": 512},
        scale_factor=4,
    )
    return SmolVLMForConditionalGeneration(config)


def qwen2_vl_2b():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True},
        vision_config={"embed_dim": 1280, "depth": 32, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
                       "spatial_merge_size": 2, "hidden_size": 1536},
        tie_word_embeddings=True,
    )
    return Qwen2VLForConditionalGeneration(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    args = parser.parse_args()
    from vlmkit.train.plan import estimate

    print(f"| model | parameters | method | peak memory, bf16 (batch {args.batch} x {args.seq}) | with gradient checkpointing |")
    print("|---|---|---|---|---|")
    for name, build in (("SmolVLM-256M", smolvlm_256m), ("Qwen2-VL-2B", qwen2_vl_2b)):
        with torch.device("meta"):
            model = build().to(torch.bfloat16)
        n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        for method in ("full", "lora", "qlora"):
            plans = [estimate(model, method, args.batch, args.seq, True, gc) for gc in (False, True)]
            gib = [p.total_bytes / 2**30 for p in plans]
            print(f"| {name} | {n / 1e6:.0f}M | {method} | {gib[0]:.1f} GiB | {gib[1]:.1f} GiB |")


if __name__ == "__main__":
    main()

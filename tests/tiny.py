"""Tiny random parts for fast tests: a Llama-style LM with a BPE tokenizer trained on the fly, a tiny
CLIP vision tower with its image processor, both saved to folders exactly as a user would have them."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "a red circle on the left and a blue square on the right.",
    "What colour is the circle? What shape is the red object? How many shapes are there?",
    "Is there a triangle? yes no left right green yellow purple 1 2 3 Describe the image.",
    "The quick brown fox jumps over the lazy dog. Hello world, this is a test of the tokenizer.",
]


def make_tokenizer(
    vocab_size: int = 300,
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos_token: str | None = "<|endoftext|>",
    eos_token: str | None = "<|im_end|>",
    unk_token: str | None = "<|endoftext|>",
    add_bos: bool = False,
    **token_kwargs,
):
    """Byte-level BPE trained on CORPUS. `special_tokens` get the first ids (in order); `add_bos` makes encoding
    prepend `bos_token` (like Llama/Gemma tokenizers); extra kwargs (e.g. `pad_token`) go to the tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
            special_tokens=[(bos_token, tok.token_to_id(bos_token))],
        )
    roles = dict(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token)
    roles = {k: v for k, v in roles.items() if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **roles, **token_kwargs)


def make_llama(folder: Path, hidden: int = 64, layers: int = 2, tie: bool = True, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_gpt2(folder: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_clip_vision(folder: Path, image_size: int = 32, patch: int = 8, hidden: int = 32, seed: int = 0) -> Path:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=hidden,
    )
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(folder)
    return folder


def make_lm(folder: Path, arch: str, hidden: int = 64, seed: int = 0) -> Path:
    """A tiny causal LM of one of the supported families, with the test tokenizer."""
    import torch
    import transformers as tf

    tokenizer = make_tokenizer()
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    configs = {
        "llama": lambda: tf.LlamaConfig(**common),
        "qwen2": lambda: tf.Qwen2Config(**common),
        "phi3": lambda: tf.Phi3Config(**common, pad_token_id=0),
        "gemma": lambda: tf.GemmaConfig(**common, head_dim=16),
        "gpt2": lambda: tf.GPT2Config(
            vocab_size=len(tokenizer), n_embd=hidden, n_layer=2, n_head=4, n_positions=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ),
    }
    torch.manual_seed(seed)
    tf.AutoModelForCausalLM.from_config(configs[arch]()).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_vision(folder: Path, arch: str, image_size: int = 32, seed: int = 0) -> Path:
    """A tiny transformers vision tower (clip, siglip, vit, dinov2) with its image processor."""
    import torch
    import transformers as tf

    if arch == "clip":
        return make_clip_vision(folder, image_size=image_size, seed=seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=8)
    size = {"height": image_size, "width": image_size}
    config, processor = {
        "siglip": (tf.SiglipVisionConfig(**common), tf.SiglipImageProcessor(size=size)),
        "vit": (tf.ViTConfig(**common), tf.ViTImageProcessor(size=size)),
        "dinov2": (tf.Dinov2Config(**common), tf.BitImageProcessor(size={"shortest_edge": image_size}, crop_size=size)),
    }[arch]
    torch.manual_seed(seed)
    tf.AutoModel.from_config(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_varied_vlm(folder: Path, llm: str = "llama") -> Path:
    """A composed tiny VLM (CLIP tower, a Llama LM or `make_lm`'s `llm`, 4 image tokens) saved to
    `folder/model`, its weights drawn wide enough that its greedy replies depend on the prompt and the
    image (at the default init every reply is the same). The serve and decode tests and bench/serve.py use it."""
    import torch

    from vlmkit.build import compose

    lm = make_llama(folder / "llm") if llm == "llama" else make_lm(folder / "llm", llm)
    model, processor = compose(vision=str(make_clip_vision(folder / "clip")), llm=str(lm), image_tokens=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.randn(p.shape, generator=generator) * (0.5 if "embed" in name and p.dim() == 2 else 0.15))
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"

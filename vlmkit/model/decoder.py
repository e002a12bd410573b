"""A lean decode loop for Llama-like language models: the per-token step without transformers' overhead.

A VLM's reply is generated in two phases. The prefill (prompt and images) runs once: in fp32 through the
model's own `forward`, so the cache is exactly transformers'; in the lower precisions the images still go
through the model (every family's image merging as it is), which is stopped where it calls its language
model, and `Decoder.forward` runs the whole prompt on its own bf16 or int8 weights (int4 prefills
through the model under bf16 autocast: see MODEL_PREFILL). The decode steps that follow see
one new text token per row; `Decoder` runs them on the language model's weights directly: a preallocated
KV cache, rotary embeddings from the model's own rotary module, attention as two matmuls, and one Python
call per weight matrix.

Weights can be held in four precisions (`PRECISIONS`): `fp32` (the model's own tensors, no copy: greedy
output token for token transformers'), `bf16` (a bf16 copy; activations in bf16), `int8` (per-output-
channel int8 weights with bf16 activations, `torch.ops.aten._weight_int8pack_mm`) and `int4` (4-bit
weights, a scale and zero per 32 inputs, as GGUF's Q4_1; `_weight_int4pack_mm_for_cpu`; a matrix the
kernel cannot tile, e.g. an odd vocabulary's head, stays int8). A step is bound by
reading the weights (a 135M-parameter LM reads 540 MB per token in fp32), so fewer bytes per weight is
what makes it faster on a CPU; the measured speed and quality of each are in docs/decode.md.

`unsupported(config)` says why a language model cannot take this path (another architecture, sliding
windows, 3-D rotary positions); the engine then uses transformers' `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F

PRECISIONS = ("fp32", "bf16", "int8", "int4")
# Precisions whose prompt runs through the model's own forward: fp32 (the cache is transformers' to the bit)
# and int4 (bf16 autocast). The prompt's keys and values from 4-bit weights lost the image: the quickstart
# model's held-out exact match fell from 0.945 to 0.010 when int4 weights ran its prefill too.
MODEL_PREFILL = ("fp32", "int4")
# From this many rows on (a prefill, a wide batch), an int8 product runs as a bf16 matmul of a bf16 copy of the
# int8 values: the int8 kernel's cost grows with every row, a bf16 matmul's barely (docs/decode.md)
INT8_DENSE_ROWS = 16
INT4_GROUP = 32  # int4 weights: one scale and zero per 32 inputs of an output (as GGUF's Q4_1 blocks)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def unsupported(config) -> str | None:
    """Why the text config `config` cannot use `Decoder` (None when it can)."""
    kind = getattr(config, "model_type", "")
    if kind not in LLAMA_LIKE:
        return f"{kind or 'this'} language model is not Llama-like ({', '.join(LLAMA_LIKE)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention on some layers"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rope, dict) and ("mrope_section" in rope or rope.get("rope_type") == "dynamic"):
        return f"rotary type {rope.get('rope_type') or 'mrope'}"
    return None


def int8_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@dataclass
class _Weight:
    """One weight matrix in the decode precision: `apply(x)` is x @ W.T (+ bias)."""

    weight: torch.Tensor  # (out, in) fp32/bf16; int8 (out, in); int4 packed by torch
    bias: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # int8: (out,) per output channel; int4: (in/32, out, 2) scales and zeros
    kind: str = "float"
    dense: torch.Tensor | None = None  # int8: the int8 values in bf16 (exact), for INT8_DENSE_ROWS rows or more

    @classmethod
    def of(cls, linear_weight: torch.Tensor, bias: torch.Tensor | None, precision: str) -> "_Weight":
        w = linear_weight.detach()
        if precision == "fp32":
            return cls(w, None if bias is None else bias.detach())
        bias = None if bias is None else bias.detach().to(torch.bfloat16)
        if precision == "bf16":
            return cls(w.to(torch.bfloat16), bias)
        w = w.float()
        if precision == "int4" and w.shape[1] % INT4_GROUP == 0 and w.shape[0] % 16 == 0:  # the kernel's tiling
            return _int4_weight(w, bias)
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127.0  # symmetric, per output channel
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        return cls(q, bias, scale.to(torch.bfloat16), "int8", q.to(torch.bfloat16))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "float":
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        x = x.reshape(-1, shape[-1]).contiguous()
        if self.kind == "int8" and x.shape[0] >= INT8_DENSE_ROWS:
            y = F.linear(x, self.dense) * self.scale
        elif self.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, INT4_GROUP, self.scale)
        y = y.reshape(*shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def _int4_weight(w: torch.Tensor, bias: torch.Tensor | None) -> _Weight:
    """Asymmetric 4-bit weights, a scale and a minimum per group of INT4_GROUP inputs (round to nearest):
    w ~ (q - 8) * scale + zero with q in 0..15, packed for torch's CPU int4 kernel."""
    out, inp = w.shape
    groups = w.reshape(out, inp // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-8)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).reshape(out, inp).to(torch.int32)
    zero = low + 8 * scale
    scales = torch.stack([scale.T, zero.T], dim=-1).to(torch.bfloat16).contiguous()  # (in/32, out, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return _Weight(packed, bias, scales, "int4")


@dataclass
class _Layer:
    norm1: torch.Tensor
    q: _Weight
    k: _Weight
    v: _Weight
    o: _Weight
    norm2: torch.Tensor
    gate: _Weight
    up: _Weight
    down: _Weight
    q_norm: torch.Tensor | None  # Qwen3: RMSNorm over each head's query and key
    k_norm: torch.Tensor | None


class Decoder:
    """Decode steps for a Llama-like `decoder` (the LM's base model: embeddings, layers, norm, rotary)
    and its `lm_head` weight, in `precision` (one of `PRECISIONS`)."""

    def __init__(self, decoder, lm_head: torch.nn.Module, config, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        if (precision == "int8" and not int8_available()) or (precision == "int4" and not int4_available()):
            raise ValueError(f"{precision} decoding needs a torch with its CPU kernel (torch >= 2.6)")
        self.precision = precision
        self.dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        self.config = config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        # Mistral attends to the last `sliding_window` positions: the same as full attention until then
        self.window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
        self.module = decoder
        self.embed = decoder.embed_tokens.weight.detach()
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm.weight.detach().to(self.dtype)
        self.head = _Weight.of(lm_head.weight, getattr(lm_head, "bias", None), precision)
        self.layers = [self._layer(layer) for layer in decoder.layers]

    def _layer(self, layer) -> _Layer:
        attn, mlp, p = layer.self_attn, layer.mlp, self.precision

        def w(linear):
            return _Weight.of(linear.weight, linear.bias, p)

        def norm(module):
            return None if module is None else module.weight.detach().to(self.dtype)

        return _Layer(
            norm(layer.input_layernorm), w(attn.q_proj), w(attn.k_proj), w(attn.v_proj), w(attn.o_proj),
            norm(layer.post_attention_layernorm), w(mlp.gate_proj), w(mlp.up_proj), w(mlp.down_proj),
            norm(getattr(attn, "q_norm", None)), norm(getattr(attn, "k_norm", None)),
        )

    def weight_bytes(self) -> int:
        """Bytes of weights read per decode step (what bounds its speed on a CPU)."""
        mats = [self.head] + [m for layer in self.layers for m in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down)]
        return sum(m.weight.numel() * m.weight.element_size() for m in mats)

    # -- one step -----------------------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """transformers' LlamaRMSNorm, in the same order of operations (so fp32 output is identical)."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Queries (B, heads, T, hd) against the cache -> (B, T, heads*hd); `mask` (B, 1, T, S) or None.

        One query a row (a decode step): two matmuls and a softmax, the query heads grouped by the
        key/value head they share, which is cheaper on a CPU than `scaled_dot_product_attention`'s flash
        kernel (measured: a third of a batch-8 step went there). Several (a prefill): that kernel."""
        b, t = q.shape[0], q.shape[2]
        if t > 1:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
            return out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim)
        kv, groups = self.kv_heads, self.heads // self.kv_heads
        q = q.reshape(b, kv, groups, self.head_dim)  # heads h = kv * groups + g share key/value head kv
        scores = torch.matmul(q, keys.transpose(-1, -2)) * self.head_dim**-0.5  # (B, kv, groups, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S)
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
        out = torch.matmul(probs, values)  # (B, kv, groups, hd)
        return out.reshape(b, 1, self.heads * self.head_dim)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: "KVCache", mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) for one new token per row. `tokens`, `positions`: (B,); the token's keys and
        values are written at column `cache.length`; `mask` (B, 1, 1, length+1) bool or None (no padding)."""
        x = F.embedding(tokens[:, None], self.embed)  # (B, 1, H)
        return self.forward(x, positions[:, None], cache, mask)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: "KVCache", mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) after the last of T input embeddings `x` (B, T, H) at `positions` (B, T): their keys
        and values are written at columns [length, length+T); `mask` (B, 1, T, length+T) bool (True: attend)
        or None (every earlier column, no padding)."""
        x = x.to(self.dtype)
        cos, sin = self.rotary(x, positions)  # (B, T, head_dim)
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, head_dim)
        (b, t), start = positions.shape, cache.length
        for i, layer in enumerate(self.layers):
            h = self._rms(x, layer.norm1)
            q = layer.q.apply(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)
            k = layer.k.apply(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = layer.v.apply(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            if layer.q_norm is not None:
                q, k = self._rms(q, layer.q_norm), self._rms(k, layer.k_norm)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            keys, values = cache.write(i, k, v)  # (B, kv_heads, length+T, hd)
            x = x + layer.o.apply(self._attend(q, keys, values, mask))
            h = self._rms(x, layer.norm2)
            x = x + layer.down.apply(F.silu(layer.gate.apply(h)) * layer.up.apply(h))
        cache.length = start + t
        return self.head.apply(self._rms(x[:, -1:], self.norm))[:, 0].float()  # (B, V)

    def embeds(self, model: torch.nn.Module, inputs: dict) -> torch.Tensor:
        """The input embeddings (B, T, H) `model`'s forward gives its language model for `inputs`, images
        merged as the model does it: the forward runs until the language model is called, and stops."""
        seen = {}

        def catch(module, args, kwargs):
            seen["x"] = kwargs.get("inputs_embeds")
            if seen["x"] is None:
                seen["x"] = module.embed_tokens(kwargs.get("input_ids", args[0] if args else None))
            raise _Reached

        hook = self.module.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            model(**inputs, use_cache=False)
        except _Reached:
            pass
        finally:
            hook.remove()
        if "x" not in seen:
            raise RuntimeError(f"{type(model).__name__}'s forward did not call its language model")
        return seen["x"]


class _Reached(Exception):
    """Raised inside a forward pre-hook to stop a model's forward once its language model is reached."""


class KVCache:
    """Keys and values of every layer, preallocated: `k`, `v` (layers, B, kv_heads, capacity, hd); the
    first `length` columns are filled. All rows share the column index; a row's padding is masked."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int):
        self.k, self.v, self.length = k, v, length

    @classmethod
    def from_prefill(cls, past, decoder: Decoder, capacity: int) -> "KVCache":
        """Copy transformers' cache after the prefill (a `DynamicCache`) into a preallocated one."""
        first = past.layers[0].keys  # (B, kv_heads, T, hd)
        cache = cls.empty(decoder, first.shape[0], max(capacity, first.shape[2]), first.device)
        for i, layer in enumerate(past.layers):
            cache.k[i, :, :, : first.shape[2]] = layer.keys
            cache.v[i, :, :, : first.shape[2]] = layer.values
        cache.length = first.shape[2]
        return cache

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @classmethod
    def empty(cls, decoder: Decoder, rows: int, capacity: int, device: torch.device) -> "KVCache":
        shape = (len(decoder.layers), rows, decoder.kv_heads, capacity, decoder.head_dim)
        return cls(torch.empty(shape, dtype=decoder.dtype, device=device), torch.empty(shape, dtype=decoder.dtype, device=device), 0)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, kv_heads, T, hd) keys and values at columns [length, length+T); return the filled part."""
        t, n = self.length, k.shape[2]
        self.k[layer, :, :, t : t + n] = k
        self.v[layer, :, :, t : t + n] = v
        return self.k[layer, :, :, : t + n], self.v[layer, :, :, : t + n]

    def moved(self, start: int, offset: int, capacity: int) -> "KVCache":
        """A copy whose columns [start, length) sit at [offset, ...), in `capacity` columns."""
        n = self.length - start
        shape = (*self.k.shape[:3], capacity, self.k.shape[4])
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape)
        k[:, :, :, offset : offset + n] = self.k[:, :, :, start : self.length]
        v[:, :, :, offset : offset + n] = self.v[:, :, :, start : self.length]
        return KVCache(k, v, offset + n)


class Rows:
    """The rows being decoded together: their cache, which cache columns each row attends to (`mask`,
    (B, capacity) bool), the position of each row's next token and its last logits (B, V).

    Rows join (after their own prefill) and leave between steps, which is what continuous batching
    needs: `join` right-aligns two groups at the same column, `keep` drops the rows that ended and the
    columns no row needs any more."""

    def __init__(self, decoder: Decoder, cache: KVCache, mask: torch.Tensor, next_pos: torch.Tensor, logits: torch.Tensor):
        self.decoder, self.cache, self.mask, self.next_pos, self.logits = decoder, cache, mask, next_pos, logits

    @classmethod
    def prefill(cls, decoder: Decoder, model: torch.nn.Module, inputs: dict, room: int) -> "Rows":
        """Run the left-padded prompts of `inputs` (the processor's output), with the positions `generate`
        gives left-padded rows, and keep `room` columns for new tokens.

        In fp32 the prompt goes through `model`'s own forward, so the cache and the first logits are
        transformers' to the bit; in int4 too (under bf16 autocast; see MODEL_PREFILL). In bf16 and int8
        only the image merging does (`Decoder.embeds`) and the language model's part runs on the
        decoder's own weights: no per-call cast of the fp32 weights to bf16, which took half of an image
        prompt's prefill under autocast (docs/decode.md)."""
        attention_mask = inputs["attention_mask"]
        positions = attention_mask.long().cumsum(-1) - 1  # as generate: left padding skipped
        positions = positions.masked_fill(attention_mask == 0, 1)
        (rows, length), device = attention_mask.shape, attention_mask.device
        if decoder.precision in MODEL_PREFILL:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=decoder.dtype == torch.bfloat16):
                out = model(**inputs, position_ids=positions, use_cache=True, logits_to_keep=1)
            cache = KVCache.from_prefill(out.past_key_values, decoder, length + room)
            logits = out.logits[:, -1].float()
        else:
            cache = KVCache.empty(decoder, rows, length + room, device)
            causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            # each token sees the earlier real tokens; a padding token sees itself only (never a whole row of -inf)
            seen = (causal & attention_mask.bool()[:, None, :]) | torch.eye(length, dtype=torch.bool, device=device)
            # the images through the tower under bf16 autocast: its convolutions 2.5x faster than in fp32
            with torch.autocast(device.type, dtype=torch.bfloat16):
                embeds = decoder.embeds(model, inputs)
            logits = decoder.forward(embeds, positions, cache, seen[:, None])
        mask = torch.ones(rows, cache.capacity, dtype=torch.bool, device=device)
        mask[:, :length] = attention_mask.bool()  # the new tokens are never padding
        return cls(decoder, cache, mask, positions[:, -1] + 1, logits)

    def __len__(self) -> int:
        return self.mask.shape[0]

    def step(self, tokens: torch.Tensor) -> None:
        """Feed each row's next token (B,); `logits` become those of the token after it."""
        if self.cache.length == self.cache.capacity:
            self._relayout(0, 0, self.cache.length + 64)
        mask = self.mask[:, None, None, : self.cache.length + 1]
        mask = None if bool(mask.all()) else mask  # no padding: attention without a mask, as generate
        self.logits = self.decoder.step(tokens, self.next_pos, self.cache, mask)
        self.next_pos = self.next_pos + 1

    def keep(self, index: list[int]) -> None:
        """Keep only these rows (in this order), and drop the leading columns none of them attends to."""
        at = torch.tensor(index, dtype=torch.long, device=self.mask.device)
        cache = self.cache
        self.cache = KVCache(cache.k.index_select(1, at), cache.v.index_select(1, at), cache.length)
        self.mask, self.next_pos, self.logits = self.mask[at], self.next_pos[at], self.logits[at]
        used = self.mask[:, : self.cache.length].any(0).nonzero()
        start = int(used[0]) if len(used) else self.cache.length
        if start > 0:
            self._relayout(start, 0, self.cache.capacity - start)

    def join(self, other: "Rows", room: int) -> None:
        """Add `other`'s rows after these, both groups ending at the same column, with `room` columns
        left for new tokens."""
        length = max(self.cache.length, other.cache.length)
        capacity = max(length + room, self.cache.capacity + length - self.cache.length)
        self._relayout(0, length - self.cache.length, capacity)
        other._relayout(0, length - other.cache.length, capacity)
        self.cache = KVCache(torch.cat([self.cache.k, other.cache.k], 1), torch.cat([self.cache.v, other.cache.v], 1), length)
        self.mask = torch.cat([self.mask, other.mask])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits])

    def _relayout(self, start: int, offset: int, capacity: int) -> None:
        """Move columns [start, length) to [offset, ...) in a cache of `capacity` columns; the mask too
        (columns before `offset` masked, columns after `length` open for new tokens)."""
        if start == 0 and offset == 0 and capacity == self.cache.capacity:
            return
        n = self.cache.length - start
        self.cache = self.cache.moved(start, offset, capacity)
        mask = torch.ones(len(self), capacity, dtype=torch.bool, device=self.mask.device)
        mask[:, :offset] = False
        mask[:, offset : offset + n] = self.mask[:, start : start + n]
        self.mask = mask


def pick(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row (B,): argmax when `temperature` is 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.inference_mode()
def decode(
    decoder: Decoder,
    model: torch.nn.Module,
    inputs: dict,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    on_token: Callable[[torch.Tensor], bool] | None = None,
    choose: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """New tokens (B, N <= max_new_tokens) after the left-padded prompts of `inputs` (the processor's
    output: input_ids, attention_mask, pixel values...), as transformers' `generate` returns them: a row
    that has ended is filled with `pad_id`; the loop ends when every row has.

    The prompt runs once (`Rows.prefill`: images merged as the model does it), with the positions
    `generate` gives left-padded rows. `on_token(tokens (B,))` is called after each step;
    returning True stops early. `choose(logits (B, V)) -> tokens (B,)` replaces `pick` (a server
    sampling each row with its own settings)."""
    rows = Rows.prefill(decoder, model, inputs, max_new_tokens)
    done = torch.zeros(len(rows), dtype=torch.bool, device=rows.mask.device)
    eos = torch.tensor(sorted(eos_ids), device=rows.mask.device, dtype=torch.long)
    out = []
    for n in range(max_new_tokens):
        tokens = choose(rows.logits) if choose is not None else pick(rows.logits, temperature, top_p)
        tokens = torch.where(done, torch.full_like(tokens, pad_id), tokens)
        out.append(tokens)
        done = done | torch.isin(tokens, eos)
        if (on_token is not None and on_token(tokens)) or bool(done.all()) or n == max_new_tokens - 1:
            break
        rows.step(tokens)
    return torch.stack(out, dim=1)

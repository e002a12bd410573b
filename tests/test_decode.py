"""vlmkit's decode loop (vlmkit/model/decoder.py) against transformers' `generate`: the same greedy tokens
in fp32 for composed and pretrained models, batched = one by one, streamed = not, with and without
images, up to the context limit; lower precisions close to fp32; the engine's choice of path."""

from __future__ import annotations

from threading import Event

import numpy as np
import pytest
import torch
from PIL import Image

from tiny import make_varied_vlm
from vlmkit.errors import VlmkitError
from vlmkit.infer.engine import Engine, choose_decode, language_parts
from vlmkit.infer.load import load
from vlmkit.model.decoder import Decoder, KVCache, _Weight

MAX_NEW = 24


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(32, 32, 3) * 255).astype("uint8"))


def user(text: str, images: int = 0) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


CONVERSATIONS = [user("what is in the picture?", 1), user("hello, tell me about cats and dogs and birds"), user("two?", 2), user("x")]
MEDIA = [[picture(0)], [], [picture(1), picture(2)], []]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def varied(request, tmp_path_factory):
    """A composed tiny VLM whose replies vary with prompt and image: Llama LM, or Qwen2 (q/k/v biases)."""
    return load(str(make_varied_vlm(tmp_path_factory.mktemp("decode"), llm=request.param)))


def engines(vlm, decode: str = "fp32") -> tuple[Engine, Engine]:
    return (Engine(vlm.model, vlm.processor, family=vlm.family, decode="transformers"),
            Engine(vlm.model, vlm.processor, family=vlm.family, decode=decode))


def test_greedy_fp32_equals_transformers_batched_and_one_by_one(varied):
    reference, ours = engines(varied)
    expected = reference.generate(CONVERSATIONS, MEDIA, max_new_tokens=MAX_NEW, batch_size=1)
    assert len(set(expected)) == len(expected)  # the replies differ: the comparison means something
    assert ours.generate(CONVERSATIONS, MEDIA, max_new_tokens=MAX_NEW, batch_size=1) == expected
    assert ours.generate(CONVERSATIONS, MEDIA, max_new_tokens=MAX_NEW, batch_size=4) == expected  # left padding
    assert reference.generate(CONVERSATIONS, MEDIA, max_new_tokens=MAX_NEW, batch_size=4) == expected


def test_tokens_equal_transformers_including_end_of_reply(varied):
    """Token ids, not just text: the end-of-reply token and the padding after it as `generate` writes them."""
    reference, ours = engines(varied)
    inputs = ours._cast(ours.inputs(CONVERSATIONS, MEDIA))
    eos = next(iter(ours.stop_ids()))
    varied.model.generation_config.eos_token_id = int(reference._run(inputs, 3, 0.0, 1.0)[0, 1])  # row 0 ends at its 2nd token
    try:
        theirs = reference._run(inputs, MAX_NEW, 0.0, 1.0)
        mine = ours._run(inputs, MAX_NEW, 0.0, 1.0)
    finally:
        varied.model.generation_config.eos_token_id = eos
    assert torch.equal(mine, theirs)
    assert int(mine[0, 2]) == varied.processor.tokenizer.pad_token_id


def test_stream_equals_generate(varied):
    _, ours = engines(varied)
    for messages, media in zip(CONVERSATIONS[:2], MEDIA[:2]):
        pieces = list(ours.stream(messages, media, max_new_tokens=MAX_NEW))
        assert len(pieces) > 1
        assert "".join(pieces).strip() == ours.generate([messages], [media], max_new_tokens=MAX_NEW)[0]


def test_stop_event_ends_the_stream(varied):
    _, ours = engines(varied)
    stop = Event()
    stop.set()  # pressed before the first token: the reply ends after it
    text = "".join(ours.stream(CONVERSATIONS[1], [], max_new_tokens=200, stop=stop))
    first = ours.generate([CONVERSATIONS[1]], [[]], max_new_tokens=1)[0]
    assert text.strip() == first and len(ours.generate([CONVERSATIONS[1]], [[]], max_new_tokens=200)[0]) > len(first)


def test_long_prompt_near_the_context_limit(varied):
    reference, ours = engines(varied)
    limit = varied.model.config.text_config.max_position_embeddings
    tokenizer = varied.processor.tokenizer
    text = "the quick brown fox jumps over the lazy dog " * 200
    ids = tokenizer(text, add_special_tokens=False).input_ids
    messages = user(tokenizer.decode(ids[: limit - MAX_NEW - 40]), 1)
    n_prompt = ours.inputs([messages], [[picture(3)]])["input_ids"].shape[1]
    assert limit - MAX_NEW - 20 <= n_prompt <= limit - MAX_NEW
    assert ours.generate([messages], [[picture(3)]], max_new_tokens=MAX_NEW) == reference.generate(
        [messages], [[picture(3)]], max_new_tokens=MAX_NEW
    )


def test_sampling_with_tiny_top_p_is_greedy_and_seeded_sampling_repeats(varied):
    _, ours = engines(varied)
    greedy = ours.generate(CONVERSATIONS, MEDIA, max_new_tokens=MAX_NEW)
    assert ours.generate(CONVERSATIONS, MEDIA, max_new_tokens=MAX_NEW, temperature=1.0, top_p=1e-6) == greedy
    torch.manual_seed(5)
    first = ours.generate(CONVERSATIONS, MEDIA, max_new_tokens=MAX_NEW, temperature=1.5)
    torch.manual_seed(5)
    assert ours.generate(CONVERSATIONS, MEDIA, max_new_tokens=MAX_NEW, temperature=1.5) == first
    assert first != greedy


@pytest.mark.parametrize("precision, tolerance, smaller", [("bf16", 0.1, 1.9), ("int8", 0.1, 3.5)])
def test_lower_precisions_stay_close_to_fp32(varied, precision, tolerance, smaller):
    """The step's logits in bf16 / int8 weights against fp32, fed the same tokens (teacher forcing)."""
    base, head, config = language_parts(varied.model)
    exact, low = Decoder(base, head, config, "fp32"), Decoder(base, head, config, precision)
    ids = varied.processor.tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = varied.model.language_model(input_ids=ids[:, :1], use_cache=True)
        caches = [KVCache.from_prefill(out.past_key_values, d, ids.shape[1]) for d in (exact, low)]
        agree = 0
        for t in range(1, ids.shape[1]):
            a = exact.step(ids[:, t], torch.tensor([t]), caches[0], None)
            b = low.step(ids[:, t], torch.tensor([t]), caches[1], None)
            assert (a - b).norm() / a.norm() < tolerance  # a wrong step is off by ~100%
            agree += int(a.argmax() == b.argmax())
    assert agree >= (ids.shape[1] - 1) * 0.8
    assert low.weight_bytes() < exact.weight_bytes() / smaller


def test_int8_weights_round_trip_within_half_a_step():
    w = torch.randn(48, 32) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different scales
    q = _Weight.of(w, None, "int8")
    back = q.weight.float() * q.scale.float()[:, None]
    assert q.weight.dtype == torch.int8
    assert ((back - w).abs() <= q.scale.float()[:, None] * 0.5 + 1e-2 * w.abs()).all()
    x = torch.randn(3, 32)
    assert torch.allclose(q.apply(x.bfloat16()).float(), x @ w.T, rtol=0.05, atol=0.05 * float(w.abs().max()))


def test_int8_products_of_many_rows_equal_the_kernel_row_by_row():
    """From INT8_DENSE_ROWS rows on, an int8 product is a bf16 matmul of the int8 values' bf16 copy: the
    same weights as the int8 kernel reads one row at a time, so the same product up to bf16 rounding."""
    from vlmkit.model.decoder import INT8_DENSE_ROWS

    w = _Weight.of(torch.randn(40, 64), torch.randn(40), "int8")
    assert torch.equal(w.dense.float(), w.weight.float())
    x = torch.randn(INT8_DENSE_ROWS + 3, 64).bfloat16()
    wide = w.apply(x).float()
    one_by_one = torch.cat([w.apply(row[None]) for row in x]).float()
    assert torch.allclose(wide, one_by_one, rtol=0.02, atol=0.02 * float(one_by_one.abs().max()))
    w.dense = torch.zeros_like(w.dense)  # the wide product reads the copy, and only the wide one
    assert w.apply(x).abs().max() <= w.bias.abs().max() and torch.allclose(w.apply(x[:1]).float(), one_by_one[:1])


def dequantized(weight: _Weight, inputs: int) -> _Weight:
    """The fp32 matrix a quantized weight stands for, read back through its own kernel."""
    bias = 0 if weight.bias is None else weight.bias
    w = (weight.apply(torch.eye(inputs).bfloat16()) - bias).float().T.contiguous()
    return _Weight(w, None if weight.bias is None else weight.bias.float())


def test_int4_steps_equal_fp32_steps_on_its_dequantized_weights(varied):
    """4-bit weights move a model this small and wide far from fp32, so the decode step is checked
    against fp32 on the very matrices the int4 kernel holds: only bf16 activations differ."""
    base, head, config = language_parts(varied.model)
    low, ref = Decoder(base, head, config, "int4"), Decoder(base, head, config, "fp32")
    assert sum(m.kind == "int4" for layer in low.layers for m in (layer.q, layer.gate, layer.down)) == 3 * len(low.layers)
    for mine, theirs in zip(low.layers, ref.layers):
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            setattr(theirs, name, dequantized(getattr(mine, name), getattr(theirs, name).weight.shape[1]))
    ref.head = dequantized(low.head, ref.head.weight.shape[1])
    ids = varied.processor.tokenizer("the quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.inference_mode():
        out = varied.model.language_model(input_ids=ids[:, :1], use_cache=True)
        caches = [KVCache.from_prefill(out.past_key_values, d, ids.shape[1]) for d in (ref, low)]
        for t in range(1, ids.shape[1]):
            a = ref.step(ids[:, t], torch.tensor([t]), caches[0], None)
            b = low.step(ids[:, t], torch.tensor([t]), caches[1], None)
            assert (a - b).norm() / a.norm() < 0.1
    assert low.weight_bytes() < ref.weight_bytes() / 3  # int4 beside an int8 head (an odd vocabulary)


def test_int4_weights_match_their_dequantized_matrix():
    """The packed 4-bit kernel computes x @ W'.T for W' the group-wise dequantized weights, each weight
    within half a step of the original."""
    w = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]
    q = _Weight.of(w, None, "int4")
    assert q.kind == "int4"
    groups = w.reshape(48, 2, 32)
    step = (groups.amax(-1) - groups.amin(-1)) / 15  # (48, 2)
    scale, zero = q.scale[..., 0].float().T, q.scale[..., 1].float().T  # (48, 2)
    assert torch.allclose(scale, step, rtol=0.01)
    x = torch.randn(3, 64)
    # reconstruct W' from the kernel itself: the identity's rows pick out its columns
    dequant = q.apply(torch.eye(64).bfloat16()).float().T  # (48, 64)
    assert ((dequant - w).abs().reshape(48, 2, 32) <= step[..., None] * 0.5 + 0.02 * groups.abs().amax(-1, keepdim=True)).all()
    assert torch.allclose(q.apply(x.bfloat16()).float(), x @ dequant.T, rtol=0.02, atol=0.05)
    assert zero.shape == scale.shape
    assert _Weight.of(torch.randn(16, 48), None, "int4").kind == "int8"  # 48 inputs: not whole groups of 32
    assert _Weight.of(torch.randn(40, 64), None, "int4").kind == "int8"  # 40 outputs: not whole tiles of 16


def test_pretrained_families_equal_transformers_or_fall_back(folders):
    """Llama-based pretrained families take the decoder with transformers' tokens; the others (3-D
    rotary positions, Gemma) fall back to `generate` with the reason, and refuse an explicit precision."""
    for family, folder in folders.items():
        vlm = load(folder)
        path, why = choose_decode(vlm.model, torch.device("cpu"))
        if family in ("qwen2_vl", "qwen2_5_vl", "paligemma"):
            assert path == "transformers" and why
            with pytest.raises(VlmkitError, match="decode=transformers"):
                Engine(vlm.model, vlm.processor, family=vlm.family, decode="fp32")
            continue
        assert path in ("fp32", "int8"), (family, why)
        reference, ours = engines(vlm)
        convs, media = [user("describe it", 1), user("and this one, in detail please", 1)], [[picture(4)], [picture(5)]]
        want = reference._run(reference._cast(reference.inputs(convs, media)), 12, 0.0, 1.0)
        got = ours._run(ours._cast(ours.inputs(convs, media)), 12, 0.0, 1.0)
        assert torch.equal(got, want), family


def test_no_new_tokens_is_a_clear_error(varied):
    for engine in engines(varied):
        with pytest.raises(VlmkitError, match="max_new_tokens is 0: give 1 or more"):
            engine.generate(CONVERSATIONS[:1], MEDIA[:1], max_new_tokens=0)


def test_choice_of_path(varied):
    assert choose_decode(varied.model, torch.device("cuda"))[0] == "transformers"
    assert choose_decode(varied.model, torch.device("cpu"), "transformers")[0] == "transformers"
    assert choose_decode(varied.model, torch.device("cpu"), "bf16") == ("bf16", "asked for")
    with pytest.raises(VlmkitError, match="choose one of"):
        choose_decode(varied.model, torch.device("cpu"), "fp8")


def test_gpt2_falls_back_to_transformers(parts, tmp_path):
    from vlmkit.build import compose

    model, _ = compose(vision=parts["clip"], llm=parts["gpt2"], image_tokens=4)
    path, why = choose_decode(model, torch.device("cpu"))
    assert path == "transformers" and "gpt2" in why


def test_the_package_load_passes_the_decode_path(varied):
    import vlmkit

    folder = varied.name
    assert vlmkit.load(folder, decode="bf16").engine.decode == "bf16"
    with pytest.raises(VlmkitError, match="decode 'fp8': choose one of"):
        vlmkit.load(folder, decode="fp8")


def test_cli_choices_are_the_engines():
    from vlmkit.cli import DECODE, build_parser
    from vlmkit.infer.engine import DECODE_CHOICES

    assert DECODE == DECODE_CHOICES
    for command in (["generate", "--model", "m", "--prompt", "p"], ["chat", "--model", "m"], ["serve", "--model", "m"],
                    ["eval", "--data", "d"], ["caption", "--model", "m", "x.png"], ["ui", "--model", "m"]):
        assert build_parser().parse_args(command + ["--decode", "int8"]).decode == "int8"


def test_rows_joining_and_leaving_mid_decode_keep_every_rows_tokens(varied):
    """Continuous batching's state: a group prefilled later joins rows already decoding (a different
    prompt length, so one group is shifted), a row leaves; each row's greedy tokens stay its own."""
    from vlmkit.model.decoder import Rows

    _, ours = engines(varied)
    decoder = ours.decoder()

    def inputs(i, j):
        return ours._cast(ours.inputs(CONVERSATIONS[i:j], MEDIA[i:j]))

    def alone(i):
        return ours._run(inputs(i, i + 1), 12, 0.0, 1.0)[0].tolist()

    with torch.inference_mode():
        rows, got = Rows.prefill(decoder, varied.model, inputs(0, 2), 12), {0: [], 1: [], 2: [], 3: []}
        ids = [0, 1]
        for n in range(12):
            if n == 4:  # two more rows join after four steps
                rows.join(Rows.prefill(decoder, varied.model, inputs(2, 4), 12), 12)
                ids += [2, 3]
            tokens = rows.logits.argmax(-1)
            for i, t in zip(ids, tokens.tolist()):
                got[i].append(t)
            if n == 7:  # row 1 leaves
                keep = [k for k, i in enumerate(ids) if i != 1]
                rows.keep(keep)
                ids, tokens = [ids[k] for k in keep], tokens[keep]
            rows.step(tokens)
    assert got[0] == alone(0)[:12] and got[1] == alone(1)[:8]
    assert got[2] == alone(2)[:8] and got[3] == alone(3)[:8]


def _prefills(vlm, precision: str, convs, media):
    """(fp32 prefill logits through the model's forward, `precision` prefill logits on the decoder's weights)
    for a left-padded batch, and the second alone row by row."""
    from vlmkit.model.decoder import Rows

    base, head, config = language_parts(vlm.model)
    exact, low = Decoder(base, head, config, "fp32"), Decoder(base, head, config, precision)
    engine = Engine(vlm.model, vlm.processor, family=vlm.family, decode="fp32")
    with torch.inference_mode():
        inputs = engine._cast(engine.inputs(convs, media))
        a, b = (Rows.prefill(d, vlm.model, inputs, 4).logits for d in (exact, low))
        alone = [Rows.prefill(low, vlm.model, engine._cast(engine.inputs(convs[i : i + 1], media[i : i + 1])), 4).logits[0]
                 for i in range(len(convs))]
    return a, b, torch.stack(alone)


@pytest.mark.parametrize("precision, tolerance", [("bf16", 0.15), ("int8", 0.15), ("int4", 0.5)])
def test_low_precision_prefill_on_the_decoders_weights_is_close_to_the_models_forward(varied, precision, tolerance):
    """bf16/int8/int4 prefill runs the prompt (images merged by the model) on the decoder's own weights:
    close to the fp32 forward (int4 on random weights loses more), left padding never leaks into a row
    (batched = alone), and the cache it leaves decodes on."""
    a, b, alone = _prefills(varied, precision, CONVERSATIONS, MEDIA)
    assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).max() < tolerance  # a wrong prefill is off by ~100%
    assert ((alone - b).norm(dim=-1) / alone.norm(dim=-1)).max() < 0.05
    if precision != "int4":
        assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
        ref, ours = engines(varied, precision)
        want = ref._run(ref._cast(ref.inputs(CONVERSATIONS, MEDIA)), 8, 0.0, 1.0)
        got = ours._run(ours._cast(ours.inputs(CONVERSATIONS, MEDIA)), 8, 0.0, 1.0)
        assert (got[:, :2] == want[:, :2]).float().mean() >= 0.75  # replies open as fp32's


def test_low_precision_prefill_merges_images_as_each_pretrained_family(folders):
    """The int8 prefill takes its input embeddings from the family's own forward (images merged as it
    does it): close to the fp32 forward's logits."""
    convs, media = [user("describe it", 1), user("and this one, in detail please", 1)], [[picture(4)], [picture(5)]]
    for family, folder in folders.items():
        vlm = load(folder)
        if choose_decode(vlm.model, torch.device("cpu"))[0] == "transformers":
            continue
        a, b, alone = _prefills(vlm, "int8", convs, media)
        assert ((a - b).norm(dim=-1) / a.norm(dim=-1)).max() < 0.15, family
        assert ((alone - b).norm(dim=-1) / alone.norm(dim=-1)).max() < 0.05, family

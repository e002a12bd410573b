"""Generation: chat messages + images (and videos) -> text, batched or streamed, for every model family.

The engine renders prompts with the processor's chat template (or a family's plain prompt), left-pads a
batch so every prompt ends where generation starts, and decodes only the new tokens. Greedy by default
(temperature 0); `temperature`/`top_p` switch to sampling. `stream` yields text pieces as they come.

On a CPU, the decode steps after the prompt run through `vlmkit.model.decoder` when the language model
is Llama-like (`decode`: `auto` picks the precision, see `choose_decode`; `transformers` always uses
`model.generate`); the prompt and images always go through the model's own forward.

A conversation's media are given in order of appearance of its `{"type": "image"}` and
`{"type": "video"}` parts: an image is a path, bytes or PIL image; a video is a path or a list of
`vlmkit.data.video.Frame`. Families with a video processor of their own (SmolVLM2, Qwen2-VL) get the
frames natively; the others get them as images, each labelled with its timestamp ("Frame at 00:03:").
"""

from __future__ import annotations

import sys
from threading import Event, Thread
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmkit.data.images import load_image
from vlmkit.data.messages import chat_text, normalise_messages, plain_prompt
from vlmkit.errors import VlmkitError
from vlmkit.model.decoder import PRECISIONS, Decoder, decode, int8_available, unsupported
from vlmkit.model.families import Family, family_of
from vlmkit.model.parts import find_part

DECODE_CHOICES = ("auto", "transformers") + PRECISIONS


class Engine:
    def __init__(
        self,
        model,
        processor,
        device: torch.device | str | None = None,
        family: Family | None = None,
        decode: str = "auto",
    ):
        self.model = model.eval()
        self.processor = processor
        self.family = family or family_of(getattr(model.config, "model_type", ""))
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.decode, self.decode_reason = choose_decode(model, self.device, decode)
        self._decoder: Decoder | None = None
        processor.tokenizer.padding_side = "left"
        if processor.tokenizer.pad_token is None:
            processor.tokenizer.pad_token = processor.tokenizer.eos_token

    # -- prompts --------------------------------------------------------------------------------
    def prepare(self, messages: list[dict], media: list | None) -> tuple[list[dict], list, list]:
        """(messages as the processor will see them, images, videos): media loaded, videos expanded."""
        from vlmkit.data.video import read_frames, video_prompt_parts

        media = list(media or [])
        messages = normalise_messages(messages)
        wanted = sum(1 for m in messages for p in m["content"] if p["type"] in ("image", "video"))
        if wanted != len(media):
            raise VlmkitError(f"the conversation has {wanted} image/video parts but {len(media)} images/videos were given")
        images, videos, out, k = [], [], [], 0
        for m in messages:
            parts = []
            for p in m["content"]:
                if p["type"] == "image":
                    images.append(load_image(media[k]))
                    parts.append({"type": "image"})
                    k += 1
                elif p["type"] == "video":
                    frames = read_frames(media[k]) if not isinstance(media[k], list) else media[k]
                    k += 1
                    if self.family.native_video:
                        videos.append(frames)
                        parts.append({"type": "video"})
                        if self.family.name != "smolvlm":  # SmolVLM's processor writes its own timestamps
                            times = ", ".join(f.label for f in frames)
                            parts.append({"type": "text", "text": f"(frames at {times})\n"})
                    else:
                        parts.extend(video_prompt_parts(frames))
                        images.extend(f.image for f in frames)
                else:
                    parts.append(p)
            out.append({"role": m["role"], "content": parts})
        return out, images, videos

    def prompt(self, messages: list[dict]) -> str:
        """The text the processor tokenizes, generation prompt included."""
        family = self.family
        if not family.chat_template:  # PaliGemma: image tokens first, then the text
            n_images = sum(1 for m in messages for p in m["content"] if p["type"] == "image")
            try:
                return getattr(self.processor, "image_token", "<image>") * n_images + plain_prompt(messages, family)
            except ValueError as e:
                raise VlmkitError(str(e)) from None
        return chat_text(self.processor, family, messages, generation_prompt=True)

    def inputs(self, conversations: list[list[dict]], media: list[list]) -> dict:
        texts, images, videos = [], [], []
        for messages, items in zip(conversations, media):
            messages, imgs, vids = self.prepare(messages, items)
            texts.append(self.prompt(messages))
            images.append(imgs)
            videos.extend(vids)
        kwargs: dict = {}
        if any(images):
            if self.family.nested_images:
                kwargs["images"] = images
            else:
                kwargs["images"] = [i for group in images for i in group]
        if videos:
            kwargs.update(_video_kwargs(videos))
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs)
        return {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}

    # -- generation -----------------------------------------------------------------------------
    def _gen_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.processor.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def _cast(self, inputs: dict) -> dict:
        """Floating inputs (pixel values) in the model's dtype."""
        dtype = next(self.model.parameters()).dtype
        return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}

    def decoder(self) -> Decoder | None:
        """vlmkit's decode loop for this model (built once), or None when `model.generate` is used."""
        if self.decode == "transformers":
            return None
        if self._decoder is None:
            base, head, config = language_parts(self.model)
            self._decoder = Decoder(base, head, config, self.decode)
        return self._decoder

    def _decoder_for(self, inputs: dict, max_new_tokens: int) -> Decoder | None:
        decoder = self.decoder()
        if decoder is not None and decoder.window and inputs["input_ids"].shape[1] + max_new_tokens > decoder.window:
            return None  # past Mistral's window, attention is no longer full: transformers' generate
        return decoder

    def _run(self, inputs: dict, max_new_tokens: int, temperature: float, top_p: float, on_token=None) -> torch.Tensor:
        """New tokens (B, N) after the prompt of `inputs`, through vlmkit's decoder or `model.generate`."""
        if max_new_tokens < 1:
            raise VlmkitError(f"max_new_tokens is {max_new_tokens}: give 1 or more")
        decoder = self._decoder_for(inputs, max_new_tokens)
        if decoder is None:
            out = self.model.generate(**inputs, **self._gen_kwargs(max_new_tokens, temperature, top_p))
            return out[:, inputs["input_ids"].shape[1] :]
        return decode(
            decoder, self.model, inputs, max_new_tokens, self.stop_ids(),
            self.processor.tokenizer.pad_token_id, temperature, top_p, on_token,
        )

    def stop_ids(self) -> set[int]:
        """The token ids that end a reply, as `model.generate` reads them."""
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.processor.tokenizer.eos_token_id
        return set(eos if isinstance(eos, list) else [eos]) - {None}

    @torch.inference_mode()
    def generate(
        self,
        conversations: list[list[dict]],
        images: list[list] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        progress: bool = False,
    ) -> list[str]:
        """One reply per conversation; `images[i]` are the media of conversation i, in order."""
        images = images or [[] for _ in conversations]
        outputs: list[str] = []
        starts = range(0, len(conversations), batch_size)
        for i in tqdm(starts, desc="generating", unit="batch", disable=not progress, file=sys.stderr):
            inputs = self._cast(self.inputs(conversations[i : i + batch_size], images[i : i + batch_size]))
            new = self._run(inputs, max_new_tokens, temperature, top_p)
            outputs.extend(t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True))
        return outputs

    def stream(
        self,
        messages: list[dict],
        images: list | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Event | None = None,
    ) -> Iterator[str]:
        """Yield the reply to one conversation piece by piece.

        Generation ends early when `stop` is set (a Stop button) or when the caller stops reading (the
        generator is closed), so an abandoned reply does not keep the model busy."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        inputs = self._cast(self.inputs([messages], [images or []]))
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        halt = Event()
        stopped = _Stopped(halt, stop)
        errors: list[BaseException] = []

        def on_token(tokens: torch.Tensor) -> bool:
            streamer.put(tokens.cpu())
            return bool(stopped(tokens[:, None], None).all())

        def run() -> None:
            try:
                with torch.inference_mode():
                    if self._decoder_for(inputs, max_new_tokens) is None:
                        self.model.generate(
                            **inputs, **self._gen_kwargs(max_new_tokens, temperature, top_p), streamer=streamer,
                            stopping_criteria=StoppingCriteriaList([stopped]),
                        )
                    else:
                        streamer.put(inputs["input_ids"].cpu())  # the prompt, which the streamer skips
                        self._run(inputs, max_new_tokens, temperature, top_p, on_token)
                        streamer.end()
            except BaseException as e:  # re-raised in the caller's thread, after the streamer ends
                errors.append(e)
                streamer.end()

        thread = Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:  # also when the caller closes the generator early: stop at the next token
            halt.set()
            thread.join()
        if errors:
            raise errors[0]


def language_parts(model):
    """(the LM's base model: embeddings, layers, norm; its output head; its config) of any VLM."""
    found = find_part(model, "language")
    lm = found[1] if found else model
    base = lm.model if hasattr(lm, "model") and hasattr(lm.model, "layers") else lm
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return base, model.get_output_embeddings(), config


def check_decode(asked: str) -> None:
    if asked not in DECODE_CHOICES:
        raise VlmkitError(f"decode {asked!r}: choose one of {', '.join(DECODE_CHOICES)}")


def choose_decode(model, device: torch.device, asked: str = "auto") -> tuple[str, str]:
    """(decode path, why): `transformers` or a precision of vlmkit's decoder (`fp32`, `bf16`, `int8`)."""
    from vlmkit.device import cpu_has_bf16

    check_decode(asked)
    if asked == "transformers":
        return asked, "asked for"
    base, head, config = language_parts(model)
    why = unsupported(config)
    laid_out = head is not None and all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
    if why is None and not laid_out:
        why = "its language model's modules are not laid out as Llama's"
    if why is not None:
        if asked != "auto":
            raise VlmkitError(f"decode={asked}: vlmkit's decoder cannot run this model ({why}); use decode=transformers")
        return "transformers", why
    if asked != "auto":
        return asked, "asked for"
    if device.type != "cpu":
        return "transformers", f"on {device.type}, transformers' generate"
    if cpu_has_bf16() and int8_available():
        return "int8", "a CPU with bf16 units: int8 weights, bf16 activations, see docs/decode.md"
    return "fp32", "a CPU without bf16 units: fp32 weights"


class _Stopped:
    """A stopping criterion: True (for every row) once either event is set."""

    def __init__(self, *events: Event | None):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def _video_kwargs(videos: list) -> dict:
    """Pre-sampled frames for a native video processor: arrays plus the timestamps they were taken at.

    The metadata gives each frame's time in milliseconds (fps 1000, frame index = ms), so processors
    that label frames (SmolVLM) or derive temporal positions from the sampling rate (Qwen2-VL) see
    the true times and rate.
    """
    arrays, metadata = [], []
    for frames in videos:
        arrays.append(np.stack([np.asarray(f.image) for f in frames]))  # (T, H, W, 3)
        ms = [round(f.time * 1000) for f in frames]
        span = max(ms[-1] + 1, 1)
        metadata.append({"total_num_frames": span, "fps": 1000.0, "frames_indices": ms, "duration": span / 1000})
    return {"videos": arrays, "video_metadata": metadata, "do_sample_frames": False}

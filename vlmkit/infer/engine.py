"""Generation: chat messages + images -> text, batched or streamed.

The engine renders prompts with the processor's chat template, left-pads a batch so every prompt ends
where generation starts, and decodes only the new tokens. Greedy by default (temperature 0);
`temperature`/`top_p` switch to sampling. `stream` yields text pieces as they are produced.
"""

from __future__ import annotations

import sys
from threading import Thread
from typing import Iterator

import torch
from tqdm.auto import tqdm

from vlmkit.data.images import load_image


class Engine:
    def __init__(self, model, processor, device: torch.device | str | None = None):
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device) if device else next(model.parameters()).device
        processor.tokenizer.padding_side = "left"

    def _inputs(self, conversations: list[list[dict]], images: list[list]) -> dict:
        texts = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in conversations]
        flat = [load_image(i) for group in images for i in group]
        inputs = self.processor(images=flat or None, text=texts, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _gen_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict:
        kwargs = {"max_new_tokens": max_new_tokens, "pad_token_id": self.processor.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

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
        """One reply per conversation; `images[i]` are the images of conversation i, in order."""
        images = images or [[] for _ in conversations]
        outputs: list[str] = []
        starts = range(0, len(conversations), batch_size)
        for i in tqdm(starts, desc="generating", unit="batch", disable=not progress, file=sys.stderr):
            inputs = self._inputs(conversations[i : i + batch_size], images[i : i + batch_size])
            out = self.model.generate(**inputs, **self._gen_kwargs(max_new_tokens, temperature, top_p))
            new = out[:, inputs["input_ids"].shape[1] :]
            outputs.extend(t.strip() for t in self.processor.tokenizer.batch_decode(new, skip_special_tokens=True))
        return outputs

    def stream(
        self, messages: list[dict], images: list | None = None, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0
    ) -> Iterator[str]:
        """Yield the reply to one conversation piece by piece."""
        from transformers import TextIteratorStreamer

        inputs = self._inputs([messages], [images or []])
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(**inputs, **self._gen_kwargs(max_new_tokens, temperature, top_p), streamer=streamer)
        thread = Thread(target=lambda: torch.inference_mode()(self.model.generate)(**kwargs), daemon=True)
        thread.start()
        yield from streamer
        thread.join()

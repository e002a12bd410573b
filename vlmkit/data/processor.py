"""The processor: chat messages + images -> input_ids, pixel_values, labels.

This is the ONE place where an image becomes tokens: each image part of a conversation turns into
`image_seq_len` copies of the image token, or, with `column_words` (one word per column of the image's
token grid, e.g. " left" and " right"), into each column's word followed by that column's image tokens
(the model then emits its tokens column by column, see `VlmkitConfig.image_column_major`). It follows
transformers' `ProcessorMixin` (`apply_chat_template`, `__call__(images=..., text=...)`,
`save_pretrained`/`from_pretrained`), and adds `render`, which builds (input_ids, labels) token by
token while walking the conversation, so the loss mask is exact by construction: only assistant
content and the assistant's end-of-turn token are trained (label -100 everywhere else).

The chat format is ChatML with no default system prompt (fewer tokens per step than the LM's own
template); the same template is stored as a jinja string so plain transformers renders it identically.
"""

from __future__ import annotations

from transformers import BatchFeature, ProcessorMixin

from vlmkit.errors import VlmkitError

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


COLUMN_WORDS = {2: [" left", " right"], 3: [" left", " middle", " right"]}
ROW_WORDS = {2: [" top", " bottom"], 3: [" top", " middle", " bottom"]}


def grid_column_words(side: int, key: str = "column_words") -> list[str]:
    """The words for the columns of a side x side grid of image tokens (`key`: the config key asking)."""
    return _grid_words(COLUMN_WORDS, side, key)


def grid_row_words(side: int, key: str = "position_words") -> list[str]:
    """The words for the rows of a side x side grid of image tokens, top to bottom."""
    return _grid_words(ROW_WORDS, side, key)


def _grid_words(words: dict[int, list[str]], side: int, key: str) -> list[str]:
    if side not in words:
        raise VlmkitError(f"{key} needs a 2x2 or 3x3 grid of image tokens (image_tokens=4 or 9), not {side}x{side}")
    return words[side]


def ensure_special_tokens(tokenizer) -> bool:
    """Add the image and turn tokens the template needs; True if the vocabulary grew."""
    missing = [t for t in (IMAGE_TOKEN, TURN_START, TURN_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = TURN_END
    return bool(missing)


class VlmkitProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template for composed vlmkit models."""

    def __init__(
        self, image_processor=None, tokenizer=None, chat_template=None, image_seq_len: int = 9,
        column_words: list[str] | None = None, **kwargs,
    ):
        self.image_seq_len = image_seq_len
        self.column_words = list(column_words) if column_words else None
        if self.column_words and image_seq_len != len(self.column_words) ** 2:
            raise VlmkitError(
                f"column_words: {len(self.column_words)} words for {image_seq_len} image tokens; "
                "give one word per column of the square grid"
            )
        self.image_token = IMAGE_TOKEN
        super().__init__(image_processor, tokenizer, chat_template=chat_template or CHAT_TEMPLATE)

    # ids of the fixed pieces, looked up once
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def end_of_turn_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(TURN_END)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def pixel_values(self, images):
        """A list of PIL images -> (N, 3, H, W) float tensor."""
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    # -- training path: token by token ----------------------------------------------------------
    def render(
        self, messages: list[dict], add_generation_prompt: bool = False, train_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """Messages (content: str or list of parts) -> (input_ids, labels), images expanded. The assistant's
        words and end-of-turn tokens are labelled; with `train_prompt`, the user's too (never the role
        headers, a system turn or the image tokens)."""
        trained_roles = ("assistant", "user") if train_prompt else ("assistant",)
        ids: list[int] = []
        labels: list[int] = []
        image_ids = self._encode(self.expand_image_tokens(IMAGE_TOKEN))

        def add(piece: list[int], train: bool) -> None:
            ids.extend(piece)
            labels.extend(piece if train else [IGNORE_INDEX] * len(piece))

        for message in messages:
            trained = message["role"] in trained_roles
            add([self.tokenizer.convert_tokens_to_ids(TURN_START)] + self._encode(message["role"] + "\n"), False)
            parts = message["content"]
            for part in [{"type": "text", "text": parts}] if isinstance(parts, str) else parts:
                if part["type"] == "image":
                    add(image_ids, False)
                elif part["text"]:
                    add(self._encode(part["text"]), trained)
            add([self.end_of_turn_id], trained)  # the model learns to stop
            add(self._encode("\n"), False)
        if add_generation_prompt:
            add([self.tokenizer.convert_tokens_to_ids(TURN_START)] + self._encode("assistant\n"), False)
        return ids, labels

    # -- the transformers interface --------------------------------------------------------------
    def expand_image_tokens(self, text: str) -> str:
        """Each `<image>` marker -> the text one image becomes (its image tokens, and column words)."""
        if not self.column_words:
            return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_seq_len)
        per_column = IMAGE_TOKEN * len(self.column_words)  # a square grid: as many rows as columns
        return text.replace(IMAGE_TOKEN, "".join(word + per_column for word in self.column_words))

    def __call__(self, images=None, text=None, padding: bool = True, return_tensors: str = "pt", **kwargs):
        """`text` holds one `<image>` per image (as `apply_chat_template` writes it); images are given in
        order of appearance, flat or one list per text."""
        texts = [text] if isinstance(text, str) else list(text or [])
        flat = []
        for item in images or []:
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        n_markers = sum(t.count(IMAGE_TOKEN) for t in texts)
        if n_markers != len(flat):
            raise VlmkitError(f"the prompt has {n_markers} image markers ({IMAGE_TOKEN}) but {len(flat)} images were given")
        encoded = self.tokenizer(
            [self.expand_image_tokens(t) for t in texts],
            add_special_tokens=False,
            padding=padding,
            return_tensors=return_tensors,
            **kwargs,
        )
        data = dict(encoded)
        if flat:
            data["pixel_values"] = self.pixel_values(flat)
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]

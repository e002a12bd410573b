"""The composed VLM: vision tower -> connector -> causal LM, as a transformers model.

`VlmkitForConditionalGeneration` is a `PreTrainedModel` + `GenerationMixin` whose config is registered
with the Auto classes, so `generate`, `save_pretrained`/`from_pretrained`, peft and TRL work on it as on
any transformers VLM. The processor (`vlmkit.data.processor`) expands each image into `image_tokens`
copies of the image token; `forward` swaps those positions for projected image features with one
vectorised `masked_scatter` and returns the LM's output, with the loss when `labels` are given
(labels use -100 for positions that are not trained).
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from vlmkit.errors import VlmkitError
from vlmkit.model.projector import PROJECTORS, grid_side, pool_grid
from vlmkit.model.vision import build_vision_tower


@strict
class VlmkitConfig(PreTrainedConfig):
    """Everything needed to rebuild the model offline: the tower spec, the LM config, the connector."""

    model_type = "vlmkit"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    vision: dict | None = None  # tower spec, see vlmkit.model.vision
    text_config: dict | PreTrainedConfig | None = None
    projector: str = "mlp"
    image_tokens: int = 9  # tokens per image after pooling/shuffling; a square number
    pixel_shuffle_factor: int = 2
    image_token_id: int = 0
    vision_hidden_size: int = 0
    image_embed_norm: float = 0.0  # > 0: every image embedding is rescaled to this L2 norm (see `project`)
    image_positions: bool = False  # a learned embedding per image-token position, added after the projector
    image_column_major: bool = False  # emit an image's tokens column by column (the processor's column words)
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision is None:
            self.vision = {"kind": "efficientnet_lite0"}
        self.tie_word_embeddings = bool(self.text_config.tie_word_embeddings)
        grid_side(self.image_tokens)  # validates


class VlmkitForConditionalGeneration(PreTrainedModel, GenerationMixin):
    config_class = VlmkitConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: VlmkitConfig):
        super().__init__(config)
        self.vision_tower = build_vision_tower(config.vision)
        projector_cls = PROJECTORS.get(config.projector)
        self.projector = projector_cls(
            config.vision_hidden_size or self.vision_tower.hidden_size,
            config.text_config.hidden_size,
            shuffle=config.pixel_shuffle_factor,
        )
        if config.image_positions:
            # Kept on the projector so that it trains, saves and counts as part of the connector. A CNN's
            # pooled features say little about where they are, and the projector maps each token alike;
            # this tells the LM which cell of the grid a token is.
            self.projector.position = nn.Parameter(torch.zeros(config.image_tokens, config.text_config.hidden_size))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # Per-channel statistics of the pooled features, measured on the training images (identity until
        # then): the projector sees standardised inputs. See `set_feature_stats`.
        hidden = config.vision_hidden_size or self.vision_tower.hidden_size
        self.register_buffer("feature_mean", torch.zeros(hidden))
        self.register_buffer("feature_std", torch.ones(hidden))
        # Dropout on the standardised features while training; its rate is a run's (`feature_dropout`, set by
        # the trainer), not the model's: a model loads with it off and it holds no weights.
        self.feature_dropout = nn.Dropout(0.0)
        self.post_init()

    # -- the plumbing transformers expects -------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    def _init_weights(self, module):
        # Sub-models initialise themselves; only the connector is ours.
        if isinstance(module, nn.Linear) and any(module is m for m in self.projector.modules()):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if module is self.projector and self.config.image_positions:
            nn.init.zeros_(module.position)

    # -- images ----------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled tower features (N_images, g*r, g*r, D): what can be cached while the tower is frozen."""
        grid = self.vision_tower(pixel_values.to(self.dtype_of(self.vision_tower)))
        side = grid_side(self.config.image_tokens) * getattr(self.projector, "pool_factor", 1)
        return pool_grid(grid, side)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(N_images, g, g, D) pooled features -> (N_images, image_tokens, H) LM embeddings.

        With `image_embed_norm` set (to the LM's mean token-embedding norm), each image embedding keeps
        only its direction at the scale of text tokens. Unconstrained, a projector trained against a
        small LM drifts to embeddings two orders of magnitude larger than any word's, which the LM then
        treats as inert attention sinks: the loss stops depending on the image at all (measured).
        """
        embeds = self.projector(self.feature_dropout(self.standardize(features)))
        if self.config.image_positions:
            embeds = embeds + self.projector.position
        if self.config.image_embed_norm > 0:
            embeds = nn.functional.normalize(embeds, dim=-1) * self.config.image_embed_norm
        if self.config.image_column_major:  # the grid is row-major; the processor lays it out by column
            side = grid_side(self.config.image_tokens)
            embeds = embeds[:, [row * side + col for col in range(side) for row in range(side)]]
        return embeds

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled features in the projector's dtype, standardised per channel (see `set_feature_stats`)."""
        features = (features.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std
        return features.to(self.dtype_of(self.projector))

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardise projector inputs with the per-channel mean/std of `features` (N, g, g, D).

        A frozen CNN's pooled features are dominated by what every image shares (background, layout):
        on the shapes data the spread across images is ~30% of the spread across channels, so an
        unstandardised projector maps every image to nearly the same embedding (measured).
        """
        flat = features.reshape(-1, features.shape[-1]).float()
        self.feature_mean.copy_(flat.mean(0))
        self.feature_std.copy_(flat.std(0).clamp_min(1e-3))

    @torch.no_grad()
    def set_position_words(self, column_words: torch.Tensor, row_words: torch.Tensor, features: torch.Tensor) -> None:
        """Start each image token's position embedding at the sum of the word embeddings of its grid column
        and row (`column_words`, `row_words`: (side, H), e.g. the LM's " left" / " right" and " top" /
        " bottom"; each word at unit norm), rescaled to the mean norm of the projector's output on
        `features` (N, g, g, D): the LM then reads which part of the image a token covers from the first
        step, instead of learning it from a zero start."""
        side = grid_side(self.config.image_tokens)
        for name, words in (("column", column_words), ("row", row_words)):
            if words.shape[0] != side:
                raise VlmkitError(f"position words: {words.shape[0]} {name} words for a {side}x{side} grid")
        scale = self.projector(self.standardize(features)).norm(dim=-1).mean()  # the content it is added to
        token = torch.arange(self.config.image_tokens)  # row-major grid: token i is in row i // side, column i % side
        unit = nn.functional.normalize
        words = unit(column_words, dim=-1)[token % side] + unit(row_words, dim=-1)[token // side]
        self.projector.position.copy_(unit(words.to(self.projector.position), dim=-1) * scale)

    @torch.no_grad()
    def fit_projector_head(self, features: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> float:
        """Set the projector's last Linear so that every token of image i predicts `targets[i]` (N, H: an LM
        embedding), or token t of image i `targets[i, t]` (N, T, H), by ridge regression on `features`
        (N, g, g, D): closed form, one solve. Returns the fit's R^2 on these features. `ridge` is relative
        to the mean diagonal of the Gram matrix."""
        head = self.projector.head
        x = self.projector.head_input(self.standardize(features)).float()  # (N, T, F)
        n, tokens, width = x.shape
        x = x.reshape(n * tokens, width)
        y = targets.to(x)
        y = y.reshape(n * tokens, -1) if y.dim() == 3 else y.repeat_interleave(tokens, dim=0)
        x_mean = x.mean(0) if head.bias is not None else x.new_zeros(width)
        y_mean = y.mean(0) if head.bias is not None else y.new_zeros(y.shape[1])
        xc, yc = x - x_mean, y - y_mean
        gram = xc.T @ xc
        gram.diagonal().add_(ridge * gram.diagonal().mean().clamp_min(1e-12))
        weight = torch.linalg.solve(gram, xc.T @ yc)  # (F, H)
        head.weight.copy_(weight.T)
        if head.bias is not None:
            head.bias.copy_(y_mean - x_mean @ weight)
        residual = ((xc @ weight - yc) ** 2).sum()
        return float(1 - residual / (yc**2).sum().clamp_min(1e-12))

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.project(self.encode_images(pixel_values))

    @staticmethod
    def dtype_of(module: nn.Module) -> torch.dtype:
        return next(module.parameters()).dtype

    def merge_image_features(self, input_ids, inputs_embeds, image_embeds) -> torch.Tensor:
        """Scatter (N_images, T_img, H) image embeddings into the image-token positions of (B, T, H)."""
        mask = input_ids == self.config.image_token_id  # (B, T)
        n_tokens, n_features = int(mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
        if n_tokens != n_features:
            raise VlmkitError(
                f"the text has {n_tokens} image tokens but the images give {n_features} "
                f"({image_embeds.shape[0]} images x {image_embeds.shape[1]} tokens); build inputs with the processor"
            )
        mask = mask.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, image_embeds.to(inputs_embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_features: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ):
        """`pixel_values` (N_images, 3, H, W) in order of appearance, or cached `image_features`
        (N_images, g, g, D) from `encode_images`. Returns the LM's output (loss when labels given)."""
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, H)
            if pixel_values is not None or image_features is not None:
                if image_features is None:
                    image_features = self.encode_images(pixel_values)
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, self.project(image_features))
        if labels is not None and past_key_values is None and self._plain_lm_head():
            return self._loss_on_labels(inputs_embeds, attention_mask, position_ids, labels, **kwargs)
        return self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


    def _plain_lm_head(self) -> bool:
        """True when logits are just lm_head(hidden) (no soft-capping or scaling we would skip)."""
        text = self.config.text_config
        return not any(getattr(text, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))

    def _loss_on_labels(self, inputs_embeds, attention_mask, position_ids, labels, **kwargs):
        """Mean next-token loss over labelled positions, projecting only those through lm_head.

        Answers are a few tokens of each sequence, and the head (vocab x hidden) is a large share of a small
        LM's compute: skipping the other positions makes a training step markedly cheaper. Same value as
        the LM's own loss (cross-entropy, mean over labels != -100).
        """
        hidden = self.language_model.base_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **kwargs
        ).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:]  # position t predicts token t+1
        keep = targets != -100
        logits = self.get_output_embeddings()(hidden[:, :-1][keep])  # (N_labelled, V)
        loss = nn.functional.cross_entropy(logits.float(), targets[keep])
        return CausalLMOutputWithPast(loss=loss, logits=logits)


AutoConfig.register("vlmkit", VlmkitConfig, exist_ok=True)
AutoModelForImageTextToText.register(VlmkitConfig, VlmkitForConditionalGeneration, exist_ok=True)


def is_vlmkit_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and '"model_type": "vlmkit"' in config.read_text()

"""Initialise from data: the steps between tokenizing the training set and the first optimizer step of a
new composition, each a config key, each using the training data itself.

- `standardize_features` (default on): the projector's inputs are standardised with the training images'
  per-channel feature statistics (a frozen CNN's pooled features are dominated by what every image
  shares);
- `projector_init=text`: the projector's last layer is fitted in closed form so that each image's
  tokens start at the words its training replies say (`reply_words`); `projector_init=tokens` then sends
  each word to the one token closest to it and fits again, a few rounds, every token keeping half of its
  image's words (`token_targets`);
- `position_words` (with `image_positions`): the image-position embeddings start at the LM's words for
  the grid's column and row (" left" + " top", ...), at the norm of the projector's output.

Models given as `model=` (already trained) are left as they are.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from vlmkit.config import REPLY_INITS, TrainConfig
from vlmkit.data.processor import IGNORE_INDEX, grid_column_words, grid_row_words
from vlmkit.errors import VlmkitError
from vlmkit.model.projector import grid_side
from vlmkit.train.features import ImageSource, features_for

STATS_IMAGES = 1024  # images whose features set the statistics when they are not cached (one tower pass each)
POSITION_IMAGES = 256  # images whose projected norm sets the position embeddings' scale
TOKEN_ROUNDS = 4  # projector_init=tokens: fits with each word sent to one token
IMAGE_SHARE = 0.5  # projector_init=tokens: share of every token's target that is its image's words' mean


def initialise_from_data(model, tokenizer, cfg: TrainConfig, examples, images: ImageSource, say) -> None:
    """Run the enabled steps above on a new composition; `examples` are the tokenized training set."""
    if cfg.model:
        return
    paths = list(dict.fromkeys(p for e in examples for p in e.images))
    stats_paths = paths if images.cache is not None else paths[:STATS_IMAGES]
    fitted = cfg.projector_init in REPLY_INITS
    if images.cache is None and paths:  # a trained tower: encode what the steps below read once, with a progress bar
        images = ImageSource(images.model, images.processor, images.device, cache=True)
        images.warm(paths if fitted else stats_paths, "encoding images to start the projector")
    if cfg.standardize_features and paths:
        model.set_feature_stats(features_for(model, images, stats_paths))
    if fitted and len(paths) < 2:
        say(f"projector_init={cfg.projector_init}: the training data has {len(paths)} image(s), nothing to fit; "
            "the projector keeps its random start")
    elif fitted:
        tokens = cfg.projector_init == "tokens"
        r2 = start_projector_at_text(model, examples, images, TOKEN_ROUNDS if tokens else 0)
        where = "each word most in the image token closest to it" if tokens else "every token at its image's words"
        say(f"projector_init={cfg.projector_init}: image tokens start at the words of their replies, {where} "
            f"(fit R^2 {r2:.2f})")
    if cfg.position_words and paths:
        start_positions_at_words(model, tokenizer, images, paths[:POSITION_IMAGES])


def word_embeddings(model, tokenizer, words: list[str]) -> torch.Tensor:
    """(len(words), H): the LM's input embedding of each word (a word split into tokens: their mean)."""
    table = model.get_input_embeddings().weight.detach()
    return torch.stack([table[tokenizer(w, add_special_tokens=False).input_ids].mean(0) for w in words])


def start_positions_at_words(model, tokenizer, images: ImageSource, paths: list[str]) -> None:
    """`position_words`: each image-position embedding starts at its grid column's and row's words, at the
    norm of the projector's output on the images at `paths`."""
    if not hasattr(model, "set_position_words"):
        raise VlmkitError(f"position_words: {type(model).__name__} has no image-position embeddings to start")
    side = grid_side(model.config.image_tokens)
    columns, rows = (word_embeddings(model, tokenizer, words(side, key="position_words"))
                     for words in (grid_column_words, grid_row_words))
    model.set_position_words(columns, rows, features_for(model, images, paths))


def reply_words(model, examples) -> tuple[list[str], list[tuple[torch.Tensor, torch.Tensor]]]:
    """For each training image, the tokens the replies about it are trained on, each with its rarity
    (inverse document frequency over images), so that words said about every image ("a", the end-of-turn
    token) weigh nothing and the words that tell images apart ("red", "circle") weigh most. Samples with
    several images are left out (which image a word is about is unknown) unless fewer than two images are
    alone in a sample: then a reply counts for each of its sample's images. Images whose words all weigh
    nothing are left out. Returns (image paths, [(token ids, weights)])."""
    said: dict[str, list[int]] = {}
    for alone in (True, False):
        for e in examples:
            if (len(e.images) == 1) == alone and e.images:
                for path in e.images:
                    said.setdefault(path, []).extend(t for t, label in zip(e.input_ids, e.labels) if label != IGNORE_INDEX)
        if len(said) >= 2:
            break
    counts = Counter(t for tokens in said.values() for t in set(tokens))
    idf = {t: math.log(len(said) / c) for t, c in counts.items()}
    paths, words = [], []
    for path, tokens in said.items():
        kept = [t for t in tokens if idf[t] > 0]
        if kept:
            paths.append(path)
            words.append((torch.tensor(kept), torch.tensor([idf[t] for t in kept])))
    return paths, words


def embedding_table(model) -> torch.Tensor:
    """The LM's input embeddings (V, H), fp32 on the CPU, where the fits are solved."""
    return model.get_input_embeddings().weight.detach().float().cpu()


def word_means(words: list[tuple[torch.Tensor, torch.Tensor]], table: torch.Tensor) -> torch.Tensor:
    """(N, H): each image's words (`reply_words`) averaged in the embedding `table`, weighted by rarity."""
    means = [weight @ table[ids] / weight.sum() for ids, weight in words]
    return torch.stack(means) if means else torch.zeros(0, table.shape[1])


def token_targets(predicted: torch.Tensor, words: list[tuple[torch.Tensor, torch.Tensor]],
                  table: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """(N, T, H) targets, one per image token: each of image i's words (`reply_words`, embedded by `table`)
    goes to the one token whose `predicted[i]` (T, H) is closest to it in direction; a token's target is
    IMAGE_SHARE of the image's words' mean (`means[i]`, from `word_means`) plus the rest of the mean of the
    words it got (rarity-weighted). The shared part keeps every token saying what the image holds, which the LM reads most
    easily where a single object fills the image; the assigned part lets the token that shows a red circle
    say " red" and " circle" more than the others, which tells apart objects in different places."""
    targets, unit = torch.zeros_like(predicted), nn.functional.normalize
    for i, (ids, weight) in enumerate(words):
        emb = table[ids]  # (K, H)
        closeness = unit(predicted[i], dim=-1) @ unit(emb, dim=-1).T  # (T, K)
        chosen = nn.functional.one_hot(closeness.argmax(0), predicted.shape[1]).T.to(emb) * weight  # (T, K)
        assigned = (chosen @ emb) / chosen.sum(1, keepdim=True).clamp_min(1e-12)
        targets[i] = IMAGE_SHARE * means[i] + (1 - IMAGE_SHARE) * assigned
    return targets


def start_projector_at_text(model, examples, images: ImageSource, rounds: int = 0) -> float:
    """`projector_init=text`: fit the projector's last layer (ridge regression) so that each image's tokens
    predict the words its replies say (`reply_words`): every token of an image its words' mean.
    `projector_init=tokens` then refits `rounds` times with each word sent to the one token whose
    prediction is closest to it (`token_targets`), so that the token that shows a red circle starts nearer
    " red" and " circle" than the others. Returns the last fit's R^2."""
    if not hasattr(model, "fit_projector_head"):
        raise VlmkitError(f"projector_init=text or tokens: {type(model).__name__} is not a composed vlmkit model")
    paths, words = reply_words(model, examples)
    if len(paths) < 2:
        raise VlmkitError("projector_init=text or tokens needs trained replies about at least 2 images")
    features, table = features_for(model, images, paths), embedding_table(model)
    means = word_means(words, table)
    r2 = model.fit_projector_head(features, means)
    if model.config.image_tokens > 1:
        for _ in range(rounds):
            with torch.no_grad():
                predicted = model.projector(model.standardize(features)).float().cpu()
            r2 = model.fit_projector_head(features, token_targets(predicted, words, table, means))
    return r2

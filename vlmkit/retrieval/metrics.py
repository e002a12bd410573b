"""Retrieval metrics as pure functions of embeddings: recall@K and ranks both ways, zero-shot accuracy.

Several captions per image are counted as CLIP_benchmark counts them: a caption query is right at K when
its image is among the top K images; an image query is right at K when ANY of its captions is among the
top K captions. (Treating each caption as its own "image" instead, the one-caption-per-image protocol,
turns COCO's image->text R@1 of 58.4 into 31.8: openai/CLIP#115.)

Relevance is a pair of labels: `text_image[t]` is the image caption t belongs to, and `text_group[t]`
(optional) says which captions count as the same: with `match_captions`, caption t also finds every image
that has a caption equal to t's (shapes scenes share captions such as "a red circle."; any image so
described is a right answer). An item's rank is 1 + the number of irrelevant items scoring strictly higher
than its best relevant one (ties count in its favour). Similarities are computed `chunk` queries at a time,
so a 100k gallery never needs a 100k x 100k matrix (nor does relevance: it is kept as sorted index lists);
the chunk size does not change any result.
"""

from __future__ import annotations

import torch

KS = (1, 5, 10)


def _csr(keys: torch.Tensor, values: torch.Tensor, n_keys: int):
    """`values` grouped by `keys` (0 <= key < n_keys): (start of each key's run, its length, values sorted)."""
    order = torch.argsort(keys, stable=True)
    counts = torch.bincount(keys, minlength=n_keys)
    return torch.cumsum(counts, 0) - counts, counts, values[order]


def _expand(csr, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, value) for every value of every key in `keys`: row k for the values of keys[k]."""
    starts, counts, values = csr
    n = counts[keys]
    row = torch.repeat_interleave(torch.arange(len(keys)), n)
    first = torch.repeat_interleave(starts[keys], n)
    within = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    return row, values[first + within]


def ranks(image_emb: torch.Tensor, text_emb: torch.Tensor, text_image, text_group=None, chunk: int = 256):
    """(text->image ranks (N_t,), image->text ranks (N_i,)), 1 = a relevant item on top.

    `image_emb` (N_i, E), `text_emb` (N_t, E): normalised embeddings; `text_image` (N_t,): each caption's
    image index; `text_group` (N_t,): caption ids, equal for captions that count as the same (default:
    every caption its own). Every image needs at least one caption. Memory: a (chunk, N) block of
    similarities and one of relevance at a time; who is relevant to whom is kept as sorted index lists."""
    image_emb, text_emb = image_emb.float(), text_emb.float()
    n_images, n_texts = len(image_emb), len(text_emb)
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    text_group = torch.arange(n_texts) if text_group is None else torch.as_tensor(text_group, dtype=torch.long)
    if len(text_image.unique()) != n_images:
        raise ValueError("every image needs at least one caption")
    n_groups = int(text_group.max()) + 1
    pairs = torch.unique(text_group * n_images + text_image)  # each (caption group, image) once
    pair_group, pair_image = pairs // n_images, pairs % n_images
    group_images = _csr(pair_group, pair_image, n_groups)
    image_groups = _csr(pair_image, pair_group, n_images)
    group_texts = _csr(text_group, torch.arange(n_texts), n_groups)
    t2i = torch.empty(n_texts, dtype=torch.long)
    for s in range(0, n_texts, chunk):
        queries = text_group[s : s + chunk]
        relevant = torch.zeros(len(queries), n_images, dtype=torch.bool)
        relevant[_expand(group_images, queries)] = True  # the images holding a caption of the query's group
        t2i[s : s + chunk] = _rank(text_emb[s : s + chunk] @ image_emb.T, relevant)
    i2t = torch.empty(n_images, dtype=torch.long)
    for s in range(0, n_images, chunk):
        queries = torch.arange(s, min(s + chunk, n_images))
        row, group = _expand(image_groups, queries)  # the image's caption groups...
        inner, text = _expand(group_texts, group)  # ...and every caption in them
        relevant = torch.zeros(len(queries), n_texts, dtype=torch.bool)
        relevant[row[inner], text] = True
        i2t[s : s + chunk] = _rank(image_emb[s : s + chunk] @ text_emb.T, relevant)
    return t2i, i2t


def _rank(sims: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    best = sims.masked_fill(~relevant, float("-inf")).max(1, keepdim=True).values  # (c, 1)
    return 1 + ((sims > best) & ~relevant).sum(1)


def summarize(rank: torch.Tensor, ks=KS) -> dict:
    """R@K for each K, and the mean and median rank, of one direction's ranks."""
    rank = rank.double()
    out = {f"R@{k}": float((rank <= k).double().mean()) for k in ks}
    out["mean_rank"] = float(rank.mean())
    out["median_rank"] = float(rank.quantile(0.5))  # the mean of the two middle ranks when their count is even
    return out


def retrieval_scores(image_emb, text_emb, text_image, text_group=None, chunk: int = 256, ks=KS) -> dict:
    """{"text_to_image": {R@1, R@5, R@10, mean_rank, median_rank}, "image_to_text": {...}, "n_images", "n_texts"}."""
    t2i, i2t = ranks(image_emb, text_emb, text_image, text_group, chunk)
    return {"text_to_image": summarize(t2i, ks), "image_to_text": summarize(i2t, ks),
            "n_images": len(image_emb), "n_texts": len(text_emb)}


def zeroshot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels) -> dict:
    """Each image gets the class whose (template-averaged, normalised) embedding is nearest: accuracy overall
    and per class. `class_emb` (C, E), `labels` (N,) class indices."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    predicted = (image_emb.float() @ class_emb.float().T).argmax(1)
    right = predicted == labels
    per_class = {int(c): float(right[labels == c].double().mean()) for c in labels.unique()}
    return {"accuracy": float(right.double().mean()), "per_class": per_class, "predicted": predicted.tolist()}


def embedding_variance(emb: torch.Tensor) -> float:
    """The summed per-dimension variance of normalised embeddings: about 1 when they spread over the sphere,
    0 when every input maps to one point (a collapse the loss alone may not show)."""
    return float(emb.float().var(0, unbiased=False).sum())

"""The data order: a function of (seed, epoch) only, so a resumed run draws the same batches.

Every rank of a multi-process run draws the same global batches and takes its own slice of each.
"""

from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches_from(examples, batch_size: int, seed: int, start: int, group_by_length: bool = False):
    """Endless batches in a deterministic order; `start` = number of batches already consumed.

    `group_by_length`: each run of 50 batches' worth of the shuffled samples is sorted by length and cut
    into batches, then the epoch's batches are shuffled, so a batch pads to little more than it holds.
    """
    per_epoch = max(1, len(examples) // batch_size)  # the ragged tail is dropped; the next epoch reshuffles
    index, cached = start, (None, None)
    while True:
        epoch, k = divmod(index, per_epoch)
        if cached[0] != epoch:
            cached = (epoch, epoch_batches(examples, batch_size, seed, epoch, per_epoch, group_by_length))
        yield [examples[i] for i in cached[1][k]]
        index += 1


def first_epoch_chunks(examples, batch_size: int, world: int, seed: int, group_by_length: bool) -> list[list]:
    """The first epoch's micro-batches as the ranks will take them (each rank's slice of each global
    batch, as `batches_from` draws them), then the samples that no batch of that epoch holds."""
    per_epoch = max(1, len(examples) // (batch_size * world))
    batches = epoch_batches(examples, batch_size * world, seed, 0, per_epoch, group_by_length)
    slices = [b[r * batch_size : (r + 1) * batch_size] for b in batches for r in range(world)]
    seen = {i for b in batches for i in b}
    rest = [i for i in range(len(examples)) if i not in seen]
    slices += [rest[k : k + batch_size] for k in range(0, len(rest), batch_size)]
    return [[examples[i] for i in s] for s in slices if s]


def epoch_batches(examples, batch_size: int, seed: int, epoch: int, per_epoch: int, group_by_length: bool) -> list[list[int]]:
    order = epoch_order(len(examples), seed, epoch)[: per_epoch * batch_size]
    if not group_by_length:
        return [order[k * batch_size : (k + 1) * batch_size] for k in range(per_epoch)]
    mega = 50 * batch_size
    grouped = []
    for m in range(0, len(order), mega):
        grouped += sorted(order[m : m + mega], key=lambda i: examples[i].length, reverse=True)
    batches = [grouped[k * batch_size : (k + 1) * batch_size] for k in range(per_epoch)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    return [batches[i] for i in torch.randperm(per_epoch, generator=g).tolist()]


def spread_batches(examples, batch_size: int, seed: int, count: int, group_by_length: bool) -> list[list]:
    """`count` of one epoch's batches, as a run with this seed would draw them, picked at evenly spaced ranks
    of their width (their longest sample: what a batch is padded to), narrowest first. `max_minutes` times them:
    together they cost what the epoch's steps cost on average, whether a step's time follows its tokens (a CPU)
    or not (a GPU's fixed cost), where the epoch's first few batches could all be short or all long (grouped
    by length, a batch holds samples of one length)."""
    per_epoch = max(1, len(examples) // batch_size)
    batches = epoch_batches(examples, batch_size, seed, 0, per_epoch, group_by_length)
    by_width = sorted(batches, key=lambda b: max(examples[i].length for i in b))
    return [[examples[i] for i in by_width[int((k + 0.5) * len(by_width) / count)]] for k in range(count)]

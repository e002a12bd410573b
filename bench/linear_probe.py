"""What a trained run's frozen vision tower allows: a linear read-out of its features on a dataset's answers.

For single-image data with one answer a sample (class data such as the generality benchmark's `mnist` and
`fashion`), fit a logistic regression on the training split's cached features and score the held-out
split, for the features the VLM reads (the pooled image-token grid), their mean, and the tower's whole
grid before pooling. When the VLM scores well under the read-out, the recipe leaves accuracy behind; near
it, the tower's features are the limit.

    python bench/linear_probe.py RUN/model DATA   # DATA holds train.jsonl and test.jsonl
    python bench/linear_probe.py RUN/model DATA --layers -2 -3 -6   # the built-in CNN's other layers too
    python bench/linear_probe.py RUN/model DATA --layers -2 -3 --together  # and those layers side by side
    python bench/linear_probe.py RUN/model DATA --train-last-block  # and with the CNN's last block trained

scikit-learn is needed (it comes with the test requirements' mlxtend). The figures are in
docs/generality.md ("Where the rest is lost").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rows(path: Path) -> tuple[list[str], list[str]]:
    """(image paths, answers): each sample's first image and last reply."""
    images, answers = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            images.append(str(path.parent / r["images"][0]))
            answers.append(r["messages"][-1]["content"][0]["text"])
    return images, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a trained run's model folder (a new composition with a CNN or ViT tower)")
    parser.add_argument("data", help="a folder with train.jsonl and test.jsonl")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.003, 0.01, 0.1, 1.0], help="inverse L2 strengths C")
    parser.add_argument("--layers", type=int, nargs="+", default=[],
                        help="a built-in EfficientNet-Lite0 tower only: the pooled tokens of these feature layers too "
                             "(`vision_feature_layer`, -1 to -6), read with the model's tower weights")
    parser.add_argument("--together", action="store_true",
                        help="also fit the --layers' pooled tokens side by side (what a projector reading them all would see)")
    parser.add_argument("--train-last-block", action="store_true",
                        help="a built-in EfficientNet-Lite0 tower only: also train its last block (batch norm frozen) "
                             "under a linear head on the pooled tokens, against the same head over the block kept frozen")
    args = parser.parse_args()
    if args.together and len(args.layers) < 2:
        parser.error("--together fits the --layers side by side: name two or more (--layers -2 -3 --together)")
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        sys.exit("the probe needs scikit-learn: pip install scikit-learn")
    import torch
    from tqdm.auto import tqdm

    from vlmkit.build import load
    from vlmkit.data.images import load_image
    from vlmkit.model.projector import grid_side, pool_grid

    model, processor = load(args.model, device="cpu")
    model.eval()

    def grids(paths: list[str], tower=model.vision_tower) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for i in tqdm(range(0, len(paths), 32), desc="encoding", unit="batch", file=sys.stderr):
                pixels = processor.pixel_values([load_image(p) for p in paths[i : i + 32]])
                out.append(tower(pixels.to(model.dtype_of(model.vision_tower))).float())
        return torch.cat(out)

    data = Path(args.data)
    train_paths, y_train = rows(data / "train.jsonl")
    test_paths, y_test = rows(data / "test.jsonl")
    full_train, full_test = grids(train_paths), grids(test_paths)
    side = grid_side(model.config.image_tokens)
    def pooled(g):
        return pool_grid(g, side).flatten(1)

    views = {
        f"the {side}x{side} pooled tokens": (pooled, full_train, full_test),
        "their mean": (lambda g: pool_grid(g, side).mean((1, 2)), full_train, full_test),
        f"the whole {full_train.shape[1]}x{full_train.shape[2]} grid before pooling": (lambda g: g.flatten(1), full_train, full_test),
    }
    spec = model.config.vision
    if (args.layers or args.train_last_block) and spec.get("kind") != "efficientnet_lite0":
        sys.exit(f"--layers / --train-last-block: {args.model} has a {spec.get('kind')} tower; they read the built-in CNN's layers")

    @functools.cache
    def layer_grids(layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The training and held-out grids of the built-in CNN's `layer` (read once, with the model's tower
        weights), and its channels."""
        from vlmkit.model.vision import EfficientNetTower

        tower = EfficientNetTower({**spec, "feature_layer": layer}).eval()
        tower.net = model.vision_tower.net
        return grids(train_paths, tower), grids(test_paths, tower), tower.hidden_size

    for layer in args.layers:
        train_grid, test_grid, channels = layer_grids(layer)
        views[f"the {side}x{side} pooled tokens of layer {layer} ({channels} channels)"] = (pooled, train_grid, test_grid)
    if args.together:
        def side_by_side(split: int) -> torch.Tensor:
            return torch.cat([pooled(layer_grids(layer)[split]) for layer in args.layers], 1)

        names = " and ".join(str(layer) for layer in args.layers)
        views[f"the {side}x{side} pooled tokens of layers {names} side by side"] = (lambda t: t, side_by_side(0), side_by_side(1))
    print(f"{len(y_train)} training and {len(y_test)} held-out samples; tower grid {tuple(full_train.shape[1:])}")
    print("| features | C | held-out | training |\n|---|---|---|---|")
    for name, (view, train_grid, test_grid) in views.items():
        a, b = view(train_grid).numpy(), view(test_grid).numpy()
        mean, std = a.mean(0), a.std(0) + 1e-6
        a, b = (a - mean) / std, (b - mean) / std
        for c in args.strengths:
            fit = LogisticRegression(C=c, max_iter=2000).fit(a, y_train)
            print(f"| {name} | {c:g} | {fit.score(b, y_test):.3f} | {fit.score(a, y_train):.3f} |", flush=True)
    if args.train_last_block:
        inputs = layer_grids(-3)[:2]  # the last block's input
        print(f"\nthe last block under a linear head on its {side}x{side} pooled tokens (AdamW, head at 1e-3, batch 32; "
              "held-out after 5 / 10 / 25 epochs)\n| the last block | held-out | training, last epoch |\n|---|---|---|")
        for block_lr in (0.0, 1e-4, 1e-3):
            held_out, training = fit_last_block(model.vision_tower.net.blocks[-1], inputs, (y_train, y_test), side, block_lr)
            print(f"| {'frozen' if block_lr == 0 else f'trained at {block_lr:g}'} | "
                  f"{' / '.join(f'{a:.3f}' for a in held_out)} | {training:.3f} |", flush=True)


def fit_last_block(block, inputs, answers, side: int, block_lr: float, epochs: int = 25):
    """A linear head on the pooled tokens of `block` (trained at `block_lr`, frozen at 0) over its cached
    `inputs` (N, h, w, C): held-out accuracy after 5, 10 and `epochs` epochs, and training accuracy."""
    import copy

    import torch
    from torch import nn

    torch.manual_seed(0)
    names = sorted(set(answers[0]))
    y_train, y_test = (torch.tensor([names.index(a) for a in ys]) for ys in answers)
    x_train, x_test = (x.permute(0, 3, 1, 2).clone() for x in inputs)  # clones: normal tensors, not inference ones
    block = copy.deepcopy(block).eval()  # batch norm keeps the pretrained statistics
    block.requires_grad_(block_lr > 0)
    width = side * side * block.project_conv.out_channels
    head = nn.Sequential(nn.AdaptiveAvgPool2d(side), nn.Flatten(), nn.LayerNorm(width), nn.Linear(width, len(names)))
    groups = [{"params": head.parameters(), "lr": 1e-3}] + ([{"params": block.parameters(), "lr": block_lr}] if block_lr else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    held_out = []
    for epoch in range(1, epochs + 1):
        for batch in torch.randperm(len(y_train)).split(32):
            loss = nn.functional.cross_entropy(head(block(x_train[batch])), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if epoch in (5, 10, epochs):
            with torch.no_grad():
                held_out.append((head(block(x_test)).argmax(1) == y_test).float().mean().item())
    with torch.no_grad():
        training = (head(block(x_train)).argmax(1) == y_train).float().mean().item()
    return held_out, training


if __name__ == "__main__":
    main()

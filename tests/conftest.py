"""Shared fixtures: offline environment and tiny random parts saved to folders."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tiny import make_clip_vision, make_gpt2, make_llama  # noqa: E402


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """Folders holding a tiny Llama LM, a tiny GPT-2 LM and a tiny CLIP vision tower."""
    root = tmp_path_factory.mktemp("parts")
    return {
        "llama": str(make_llama(root / "llama")),
        "gpt2": str(make_gpt2(root / "gpt2")),
        "clip": str(make_clip_vision(root / "clip")),
    }


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small shapes dataset: (train.jsonl, test.jsonl)."""
    from vlmkit.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    train = make_shapes_dataset(root, "train", 24, seed=0, questions_per_image=2)
    test = make_shapes_dataset(root, "test", 8, seed=1, questions_per_image=1, captions=False)
    return train, test


@pytest.fixture(scope="session")
def folders(tmp_path_factory):
    """A tiny random pretrained VLM of every family (real processor classes and chat templates)."""
    from tiny_vlms import FAMILIES, make_vlm

    root = tmp_path_factory.mktemp("vlms")
    return {family: str(make_vlm(family, root / family)) for family in FAMILIES}

"""vlmkit: build, train, fine-tune, evaluate and run vision-language models."""

__version__ = "0.1.0"

from vlmkit.errors import VlmkitError  # noqa: E402

__all__ = ["VlmkitError", "__version__", "load"]


def load(path: str, device: str | None = None, decode: str = "auto"):
    """Load a model folder as a `vlmkit.infer.load.VLM` (generate, ask, caption, stream); `decode` as
    `vlmkit.infer.load.load`."""
    from vlmkit.infer.load import load as _load

    return _load(path, device=device, decode=decode)

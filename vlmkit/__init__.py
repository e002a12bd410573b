"""vlmkit: build, train, fine-tune, evaluate and serve vision-language models."""

__version__ = "0.1.0"

from vlmkit.errors import VlmkitError  # noqa: E402

__all__ = ["VlmkitError", "__version__"]

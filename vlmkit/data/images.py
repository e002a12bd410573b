"""Image loading that fails loudly: one RGB `PIL.Image` per call, or one clear line saying why not.

Datasets scraped from the web hold empty, truncated, mislabelled and absurdly large files. PIL would
happily hand back a half-grey truncated picture if `ImageFile.LOAD_TRUNCATED_IMAGES` were on, or
spend minutes and gigabytes on a decompression bomb; here each of those is a `VlmkitError` naming
the file, found before training starts (`check_image`) rather than in a DataLoader worker at step 40k.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlmkit.errors import VlmkitError

# PIL's own default; an image above it is refused unless the caller raises `max_pixels`.
DEFAULT_MAX_PIXELS = 89_478_485

ImageInput = str | os.PathLike | bytes | Image.Image


def load_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Return `image` (a path, the bytes of an encoded file, or a PIL image) as a decoded RGB image.

    Raises `VlmkitError` (one line, naming the file and what to do) for a missing path, a folder,
    an empty or non-image file, a corrupt or truncated image, and an image of more than
    `max_pixels` pixels (`None` turns the limit off).
    """
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        name = "<image bytes>"
        if len(image) == 0:
            raise VlmkitError(f"{name}: the image data is empty (0 bytes); pass the bytes of an image file")
        source: io.BytesIO | Path = io.BytesIO(bytes(image))
    elif isinstance(image, (str, os.PathLike)):
        source = Path(image).expanduser()
        name = str(source)
        if not source.exists():
            raise VlmkitError(f"{name}: image file not found; check the path")
        if source.is_dir():
            raise VlmkitError(f"{name}: is a folder, not an image file; give the path of an image file")
        if source.stat().st_size == 0:
            raise VlmkitError(f"{name}: image file is empty (0 bytes); re-download or remove it")
    else:
        raise VlmkitError(
            f"load_image: got a {type(image).__name__}; pass a file path, the bytes of an image file or a PIL image"
        )

    try:
        with _strict_pil(max_pixels), warnings.catch_warnings():
            # PIL only warns between its limit and twice it; a bomb is an error whatever the size.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                pixels = im.width * im.height
                if max_pixels is not None and pixels > max_pixels:
                    raise Image.DecompressionBombError(f"{pixels} pixels")
                im.load()
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise VlmkitError(
            f"{name}: image is too large ({_size_of(source)}), over the limit of {max_pixels} pixels "
            "(a possible decompression bomb); resize it, or raise `max_pixels` if you trust the file"
        ) from None
    except UnidentifiedImageError:
        raise VlmkitError(
            f"{name}: not an image file PIL can read; convert it to PNG or JPEG, or remove it"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        # PIL reports truncation and corruption through all three, depending on the format.
        reason = " ".join(str(e).split()) or type(e).__name__
        raise VlmkitError(
            f"{name}: image is corrupt or truncated ({reason}); re-download or remove it"
        ) from None


def check_image(image: ImageInput, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Return the one-line reason `load_image` would refuse `image`, or None if it loads."""
    try:
        load_image(image, max_pixels=max_pixels)
    except VlmkitError as e:
        return str(e)
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert to RGB; transparent pixels go onto white (a plain `convert` turns them black)."""
    try:
        im = ImageOps.exif_transpose(im)  # phone photos store their rotation in EXIF
    except Exception:  # a broken EXIF block should not cost us an otherwise good image
        pass
    if im.mode == "RGB":
        return im.copy()  # detached from the file, which the caller's `with` closes
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _size_of(source: io.BytesIO | Path) -> str:
    """Read just the header again, with no limit, to say how large the image claims to be."""
    saved = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None
        if isinstance(source, io.BytesIO):
            source.seek(0)
        with Image.open(source) as im:
            return f"{im.width}x{im.height}"
    except Exception:
        return "size unknown"
    finally:
        Image.MAX_IMAGE_PIXELS = saved


class _strict_pil:
    """Set PIL's two global knobs for the duration of one decode, and restore them on exit.

    PIL checks `Image.MAX_IMAGE_PIXELS` inside `Image.open`, before we can look at the size, so a
    `max_pixels` above it can only be honoured by raising it for a moment. Truncated files are
    refused even if another library turned `ImageFile.LOAD_TRUNCATED_IMAGES` on.
    """

    def __init__(self, max_pixels: int | None):
        self.max_pixels = max_pixels

    def __enter__(self):
        self.saved = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
        limit = self.saved[0]
        if limit is not None and (self.max_pixels is None or self.max_pixels > limit):
            Image.MAX_IMAGE_PIXELS = self.max_pixels
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        return self

    def __exit__(self, *exc):
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = self.saved
        return False


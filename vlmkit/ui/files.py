"""Pictures handed to Gradio as files written once each, never as PIL images.

Gradio saves a PIL output under a name made from its bytes and rewrites that file at every showing, so
a picture shown twice (the same scene on two tabs, the same upload turn after turn) is truncated under
a browser still reading it: the server fails with "Too little data for declared Content-Length" and
the page shows a broken image. A file path Gradio copies only when its copy is missing.
"""

from __future__ import annotations

import atexit
import hashlib
import io
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from vlmkit.io import atomic_write


class ImageFiles:
    """`files(image)` is the path of a PNG holding `image`, in a folder of the page's own (removed at exit)."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="vlmkit-page-"))
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)

    def __call__(self, image: Image.Image) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        path = self.folder / f"{hashlib.sha1(data).hexdigest()[:20]}.png"
        if not path.exists():
            atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return str(path)

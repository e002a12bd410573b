"""vlmkit.io: a file is written beside, then renamed, so no reader and no other writer sees half of it."""

import threading
from pathlib import Path

from vlmkit.io import atomic_write


def test_two_threads_writing_one_file_both_land(tmp_path):
    """A web page's two callbacks may write the same file at once: neither may lose the other's temporary."""
    path = tmp_path / "image.png"
    both_writing = threading.Barrier(2, timeout=10)
    errors = []

    def write(text):
        def body(tmp):
            tmp.write_text(text)
            both_writing.wait()  # the two temporaries exist together
        try:
            atomic_write(path, body)
        except Exception as e:  # noqa: BLE001 - collected for the assert below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(t,)) for t in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_text() in {"first", "second"}
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]  # no temporary left behind


def test_a_picture_shown_twice_is_written_once(tmp_path):
    """The web pages hand Gradio files written once, so a browser reading a picture never sees it rewritten."""
    from PIL import Image

    from vlmkit.ui.files import ImageFiles

    files = ImageFiles()
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    first = files(red)
    written = Path(first).stat()
    assert files(red.copy()) == first and Path(first).stat().st_ino == written.st_ino
    assert Path(first).stat().st_mtime_ns == written.st_mtime_ns
    assert files(blue) != first
    assert Image.open(first).getpixel((3, 3)) == (255, 0, 0) and Image.open(files(blue)).getpixel((0, 0)) == (0, 0, 255)

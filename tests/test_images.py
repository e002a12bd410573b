"""load_image / check_image against real bad files on disk: each must be one clear line naming the file."""

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlmkit.data.images import check_image, load_image
from vlmkit.errors import VlmkitError


def _noise(path, size=(64, 48), mode="RGB"):
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def _png_header(path, width, height):
    """A tiny PNG that claims to be width x height; PIL reads the size without decoding anything."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


def _error(image, **kw):
    with pytest.raises(VlmkitError) as e:
        load_image(image, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    assert check_image(image, **kw) == msg
    return msg


def test_good_image_loads_as_decoded_rgb(tmp_path):
    path = _noise(tmp_path / "ok.png")
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (64, 48)
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(path).convert("RGB")))
    assert check_image(path) is None
    assert check_image(str(path)) is None


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "I;16"])
def test_other_modes_become_rgb(tmp_path, mode):
    path = tmp_path / "m.tif" if mode in ("CMYK", "I;16") else tmp_path / "m.png"
    _noise(path, mode=mode)
    assert load_image(path).mode == "RGB"


def test_transparent_pixels_become_white_not_black(tmp_path):
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.putpixel((0, 0), (10, 20, 30, 255))
    im.save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[3, 3]) == (255, 255, 255)


def test_pil_image_and_bytes_inputs(tmp_path):
    path = _noise(tmp_path / "ok.jpg")
    ref = np.asarray(load_image(path))
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), ref)
    grey = Image.open(path).convert("L")
    assert load_image(grey).mode == "RGB"
    assert "<image bytes>" in _error(b"")
    assert "<image bytes>" in _error(b"not an image")


def test_missing_path(tmp_path):
    msg = _error(tmp_path / "nope.png")
    assert str(tmp_path / "nope.png") in msg and "not found" in msg


def test_directory(tmp_path):
    msg = _error(tmp_path)
    assert str(tmp_path) in msg and "folder" in msg


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    msg = _error(tmp_path / "empty.png")
    assert "empty.png" in msg and "0 bytes" in msg


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n")
    msg = _error(tmp_path / "notes.png")
    assert "notes.png" in msg and "not an image" in msg


@pytest.mark.parametrize("name", ["cut.png", "cut.jpg"])
def test_truncated_image(tmp_path, name):
    full = _noise(tmp_path / f"full{name[-4:]}").read_bytes()
    (tmp_path / name).write_bytes(full[: len(full) // 2])
    msg = _error(tmp_path / name)
    assert name in msg and "truncated" in msg


def test_truncated_refused_even_if_another_library_allows_it(tmp_path, monkeypatch):
    full = _noise(tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(full[: len(full) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert "truncated" in _error(tmp_path / "cut.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored, not left changed


def test_corrupt_pixel_data(tmp_path):
    data = bytearray(_noise(tmp_path / "full.png").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # breaks the IDAT checksum / stream
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert "bad.png" in _error(tmp_path / "bad.png")


def test_decompression_bomb_over_twice_pil_limit(tmp_path):
    msg = _error(_png_header(tmp_path / "bomb.png", 20000, 20000))
    assert "bomb.png" in msg and "20000x20000" in msg and "max_pixels" in msg


def test_decompression_bomb_between_limit_and_twice_it_is_an_error_not_a_warning(tmp_path):
    # 90M pixels: PIL itself only warns here.
    path = _png_header(tmp_path / "big.png", 10000, 9000)
    filters = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msg = _error(path)
    assert "10000x9000" in msg
    assert caught == []  # turned into the error, not also printed as a warning
    assert warnings.filters == filters  # and the caller's warning filters are left as they were


def test_small_max_pixels(tmp_path):
    path = _noise(tmp_path / "ok.png")  # 64x48 = 3072 pixels
    msg = _error(path, max_pixels=3000)
    assert "ok.png" in msg and "3000" in msg
    assert check_image(path, max_pixels=3072) is None


def test_larger_max_pixels_is_honoured_and_pil_limit_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL alone would refuse 64x48 outright
    path = _noise(tmp_path / "ok.png")
    assert load_image(path, max_pixels=10_000).size == (64, 48)
    assert Image.MAX_IMAGE_PIXELS == 1000
    assert "ok.png" in _error(path, max_pixels=1000)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_wrong_input_type():
    with pytest.raises(VlmkitError, match="load_image"):
        load_image(123)


def test_bytes_roundtrip(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (1, 2, 3)).save(buf, format="PNG")
    im = load_image(buf.getvalue())
    assert im.size == (3, 2) and im.getpixel((0, 0)) == (1, 2, 3)

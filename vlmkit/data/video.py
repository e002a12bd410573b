"""Keyframe sampling from video files: a few RGB frames with their times, for models that see images.

A model without a native video processor is shown a video as a short list of frames, each introduced
by its time ("Frame at 00:03: <image>"). `read_frames` picks those frames, either `frames=N` spread
evenly over the clip or `fps=F` (one every 1/F seconds, thinned evenly to `max_frames`), and
`video_prompt_parts` turns them into chat content parts.

Each returned `Frame.time` is the presentation time of the frame actually decoded (the one nearest to
the wanted time), not the wanted time itself, so the labels the model reads are true. Decoding seeks
to the keyframe before each wanted time when the next one is far ahead, and decodes straight on when
it is near, so a two-hour film costs a few GOPs per frame rather than a full decode. Files that are
missing, empty, not a video, corrupt, or hold no video stream are each a `VlmkitError` naming the file.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
from PIL import Image

from vlmkit.errors import VlmkitError

DEFAULT_FRAMES = 8

# Seek when the next wanted time is more than this far past the decoder's position. Below it,
# decoding straight on is about as cheap as seeking back to a keyframe and decoding forward again.
_SEEK_GAP = 2.0

# ffmpeg opens still images too (PNG, JPEG, ... via these demuxers); they are not videos.
_IMAGE_DEMUXERS = ("image2",)


@dataclass(frozen=True)
class Frame:
    """One decoded frame: `time` in seconds from the start of the video stream, `image` in RGB."""

    time: float
    image: Image.Image

    @property
    def label(self) -> str:
        """The time as "MM:SS", or "H:MM:SS" from one hour on (whole seconds, rounded down)."""
        hours, rest = divmod(int(self.time), 3600)
        minutes, seconds = divmod(rest, 60)
        return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes:02d}:{seconds:02d}"


def read_frames(
    path: str | os.PathLike,
    frames: int | None = None,
    fps: float | None = None,
    max_frames: int = 64,
) -> list[Frame]:
    """Decode a few frames of the video at `path`, sorted by time, with no frame twice.

    `frames=N` takes the frames nearest to the middles of N equal slices of the clip (8 when neither
    `frames` nor `fps` is given). `fps=F` takes the frames nearest to 0, 1/F, 2/F, ... seconds; if
    that is more than `max_frames`, it takes `max_frames` of those times evenly spread instead and
    says so on stderr. Fewer frames come back when the clip holds fewer distinct frames than asked.

    Raises `VlmkitError` (one line, naming the file and what to do) for both or a non-positive
    `frames` / `fps`, a missing, empty, non-video or corrupt file, and a file with no video stream.
    """
    source = Path(path).expanduser()
    name = str(source)
    if frames is not None and fps is not None:
        raise VlmkitError(f"{name}: read_frames got both frames={frames} and fps={fps}; give one of them")
    if frames is None and fps is None:
        frames = DEFAULT_FRAMES
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames <= 0):
        raise VlmkitError(f"{name}: frames={frames!r}; give a whole number of frames, 1 or more")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf):
        raise VlmkitError(f"{name}: fps={fps!r}; give a rate above 0 frames per second, e.g. fps=1")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames <= 0:
        raise VlmkitError(f"{name}: max_frames={max_frames!r}; give a whole number of frames, 1 or more")

    if not source.exists():
        raise VlmkitError(f"{name}: video file not found; check the path")
    if source.is_dir():
        raise VlmkitError(f"{name}: is a folder, not a video file; give the path of a video file")
    if source.stat().st_size == 0:
        raise VlmkitError(f"{name}: video file is empty (0 bytes); re-download or remove it")

    try:
        container = av.open(name)
    except av.FFmpegError as e:
        raise VlmkitError(
            f"{name}: not a video file FFmpeg can read ({_reason(e)}); convert it to MP4 (H.264) or remove it"
        ) from None
    with container:
        if container.format.name in _IMAGE_DEMUXERS or container.format.name.endswith("_pipe"):
            raise VlmkitError(
                f"{name}: is a still image ({container.format.name}), not a video; load it with load_image"
            )
        stream = _video_stream(container)
        if stream is None:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise VlmkitError(f"{name}: has no video stream (only {kinds}); give a file with video in it")
        stream.thread_type = "AUTO"
        try:
            duration = _duration(container, stream, name)
            if fps is not None:
                times = _every(duration, fps, max_frames, name)
            else:
                times = [(i + 0.5) * duration / frames for i in range(frames)]
            picked = _nearest_frames(container, stream, times)
        except av.FFmpegError as e:
            raise VlmkitError(f"{name}: video is corrupt or truncated ({_reason(e)}); re-download or remove it") from None
    if not picked:
        raise VlmkitError(f"{name}: no frame of the video stream could be decoded; re-encode or remove the file")
    return picked


def video_prompt_parts(frames: list[Frame]) -> list[dict]:
    """Chat content parts showing `frames` in order: "Frame at MM:SS: " then the image, for each.

    The caller appends the user's own text part after these, and passes the frames' images, in the
    same order, to the processor.
    """
    parts: list[dict] = []
    for frame in frames:
        parts.append({"type": "text", "text": f"Frame at {frame.label}: "})
        parts.append({"type": "image"})
    return parts


def _video_stream(container) -> av.video.stream.VideoStream | None:
    """The first video stream that is moving pictures, not a music file's cover art."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    return None


def _start(stream) -> int:
    return stream.start_time if stream.start_time is not None else 0


def _seconds(frame, stream) -> float:
    """Presentation time of a decoded frame in seconds from the start of the stream."""
    return max(0.0, float((frame.pts - _start(stream)) * stream.time_base))


def _duration(container, stream, name: str) -> float:
    """Length of the video stream in seconds: from its header, the container's, or by demuxing it."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    # No length anywhere (e.g. a stream written to a pipe): read the packets, without decoding them.
    end = None
    for packet in container.demux(stream):
        pts = packet.pts if packet.pts is not None else packet.dts
        if pts is not None:
            stop = pts + (packet.duration or 0)
            end = stop if end is None else max(end, stop)
    if end is None:
        raise VlmkitError(
            f"{name}: the video stream has no timestamps (a raw {stream.codec_context.name} stream?); "
            "put it in a container first, e.g. `ffmpeg -i IN -c copy OUT.mp4`"
        )
    _rewind(container, stream)
    return max(0.0, float((end - _start(stream)) * stream.time_base))


def _every(duration: float, fps: float, max_frames: int, name: str) -> list[float]:
    """0, 1/fps, 2/fps, ... below `duration`; evenly thinned to `max_frames` if there are more."""
    count = max(1, math.ceil(duration * fps - 1e-9))
    times = [k / fps for k in range(count)]
    if count <= max_frames:
        return times
    print(
        f"{name}: fps={fps} gives {count} frames, over max_frames={max_frames}; "
        f"taking {max_frames} spread evenly (raise max_frames or lower fps for more)",
        file=sys.stderr,
    )
    return [times[math.floor((i + 0.5) * count / max_frames)] for i in range(max_frames)]


def _nearest_frames(container, stream, times: list[float]) -> list[Frame]:
    """For each wanted time (ascending), the decoded frame whose presentation time is nearest."""
    picked: dict[float, Frame] = {}  # by time, so no time comes back twice
    decoded: Iterator | None = None  # frames in presentation order from the last seek on
    before = after = None  # consecutive decoded frames; `after` is the next one not yet passed
    for t in times:
        if decoded is None or (after is not None and t - _seconds(after, stream) > _SEEK_GAP):
            decoded = _decode_from(container, stream, t, fresh=decoded is None)
            before, after = None, next(decoded, None)
        while after is not None and _seconds(after, stream) <= t:
            before, after = after, next(decoded, None)
        # before <= t < after: the nearer of the two (the earlier on a tie); past the end, the last.
        candidates = [f for f in (before, after) if f is not None]
        if not candidates:
            continue
        best = min(candidates, key=lambda f: abs(_seconds(f, stream) - t))
        time = _seconds(best, stream)
        if time not in picked:
            picked[time] = Frame(time, best.to_image())
    return sorted(picked.values(), key=lambda f: f.time)


def _decode_from(container, stream, t: float, fresh: bool) -> Iterator:
    """Decoded frames (with a timestamp) from one at or before `t` on, or from the first frame.

    Seeking lands on the keyframe before `t` in well-indexed files; where it lands after `t` (poor or
    no index), seek further back, ending at the start of the stream, so no nearer frame is skipped.
    """
    back = 0.0
    while True:
        target = t - back
        from_start = target <= 0
        if from_start and not fresh:
            _rewind(container, stream)
        elif not from_start:
            pts = _start(stream) + int(Fraction(target) / stream.time_base)
            container.seek(pts, stream=stream, backward=True)
            fresh = False
        frames = (f for f in container.decode(stream) if f.pts is not None)
        first = next(frames, None)
        # Nothing decodable after the seek (it passed the last keyframe) counts as landing too late.
        if from_start or (first is not None and _seconds(first, stream) <= t):
            return _chain(first, frames)
        back = max(1.0, 2 * back)


def _rewind(container, stream) -> None:
    # Seeking to exactly the start pts can land just past the first keyframe (MPEG-TS); to 0 or
    # earlier always lands on the first frame.
    container.seek(min(_start(stream), 0), stream=stream, backward=True)


def _chain(first, rest: Iterator) -> Iterator:
    if first is not None:
        yield first
    yield from rest


def _reason(e: Exception) -> str:
    return " ".join(str(getattr(e, "strerror", None) or e).split()) or type(e).__name__

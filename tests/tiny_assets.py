"""Shared test helpers: an offline tiny tokenizer and synthetic videos whose frames encode their index.

Import from test files as ``from tiny_assets import ...`` (pytest puts tests/ on sys.path).
"""

import functools
import os

import numpy as np

# The tokenizer is the one the embedded tiny default of the CLI uses.
from inference.tiny_default import make_tiny_tokenizer  # noqa: F401


# ------------------------------------------------------------------------------------------------------------------
# Videos whose frame i shows the number i
# ------------------------------------------------------------------------------------------------------------------

# Frame i is split into two halves, left and right, each a flat colour. Each half holds 9 bits: three channels with
# 8 levels each (16, 48, ..., 240; 32 apart, so the code survives YUV 4:2:0 conversion and lossy compression).
# Together they encode 18 bits: indices up to 262143.
_LEVELS = 8
_STEP = 256 // _LEVELS
MAX_ENCODABLE_INDEX = _LEVELS**6 - 1


def frame_colours(index: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The (left, right) RGB colours that encode `index`."""
    if not 0 <= index <= MAX_ENCODABLE_INDEX:
        raise ValueError(f"index must be in [0, {MAX_ENCODABLE_INDEX}], got {index}.")
    digits = [(index // _LEVELS**k) % _LEVELS for k in range(6)]
    to_value = lambda d: d * _STEP + _STEP // 2  # noqa: E731
    left = tuple(to_value(d) for d in digits[:3])
    right = tuple(to_value(d) for d in digits[3:])
    return left, right


def make_frame(index: int, size=(64, 48), texture: bool = False) -> np.ndarray:
    """Frame `index` as a uint8 (height, width, 3) array. ``texture=True`` adds a moving pattern in the bottom
    quarter (makes decoding cost realistic; the code lives in the top three quarters)."""
    width, height = size
    frame = np.empty((height, width, 3), dtype=np.uint8)
    left, right = frame_colours(index)
    row = np.empty((width, 3), dtype=np.uint8)
    row[: width // 2] = left
    row[width // 2 :] = right
    frame[:] = row  # broadcast one row (much faster than filling the halves with a colour tuple)
    if texture:
        rows = height - height // 4
        pattern_base, noise_base = _texture_grids(width, height)
        pattern = ((pattern_base + index * 5) & 63) << 2  # == (... % 64) * 4: the bases are non-negative
        noise = ((noise_base + index * 2654435761) >> 7) & 31
        frame[rows:, :, :] = (pattern + noise).astype(np.uint8)[..., None]
    return frame


@functools.lru_cache(maxsize=8)
def _texture_grids(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The index-independent parts of the texture, ``x * 7 + y * 3`` and ``x * 1103515245 + y * 12345`` (int64)."""
    rows = height - height // 4
    y, x = np.mgrid[rows:height, 0:width].astype(np.int64)
    return x * 7 + y * 3, x * 1103515245 + y * 12345


def frame_index_from_pixels(frame) -> int:
    """Recover the index encoded by `make_frame` from a decoded frame (HWC or CHW, uint8 or a torch tensor).

    Reads the mean colour of the central part of each half (away from the edge between halves and from the textured
    bottom quarter).
    """
    array = frame.detach().cpu().numpy() if hasattr(frame, "detach") else np.asarray(frame)
    if array.ndim != 3:
        raise ValueError(f"Expected one frame (H, W, 3) or (3, H, W), got shape {array.shape}.")
    if array.shape[-1] != 3 and array.shape[0] == 3:
        array = np.transpose(array, (1, 2, 0))
    height, width = array.shape[:2]
    top, bottom = height // 8, max(height // 8 + 1, (height * 5) // 8)
    half = width // 2
    left = array[top:bottom, half // 4 : max(half // 4 + 1, (half * 3) // 4)].reshape(-1, 3).mean(axis=0)
    right = array[top:bottom, half + half // 4 : max(half + half // 4 + 1, half + (half * 3) // 4)]
    right = right.reshape(-1, 3).mean(axis=0)
    digits = [int(np.clip(np.floor(v / _STEP), 0, _LEVELS - 1)) for v in list(left) + list(right)]
    return sum(d * _LEVELS**k for k, d in enumerate(digits))


def write_test_video(
    path,
    num_frames: int = 48,
    fps: float = 24,
    size=(64, 48),
    keyint: int = 12,
    codec: str | None = None,
    bframes: int = 2,
    texture: bool = False,
    start_index: int = 0,
    preset: str = "veryfast",
    pix_fmt: str = "yuv420p",
    pts=None,
    time_base=None,
):
    """Write a video whose frame i shows `make_frame(start_index + i)`; returns `path`.

    Args:
        path: Output file; its extension picks the container (.mp4, .mkv, .webm, .avi, ...).
        num_frames, fps: Length and frame rate (constant unless `pts` is given).
        size: ``(width, height)``; use even numbers for yuv420p with libx264 (odd sizes: ``pix_fmt="yuv444p"``).
        keyint: A keyframe every `keyint` frames exactly (scene-cut detection off).
        codec: ``"libx264"`` (default when available, with `bframes` B-frames), ``"mpeg4"`` (no B-frames),
            ``"libvpx"`` (VP8) or ``"libvpx-vp9"`` (VP9; both lossless-ish quality, no alt-ref frames), or any other
            encoder with default options.
        texture: Add a moving pattern (see `make_frame`).
        preset: libx264 preset (``"ultrafast"`` writes long videos about twice as fast, in larger files).
        pix_fmt: Pixel format of the encoded stream.
        pts, time_base: A variable frame rate: frame i gets presentation timestamp ``pts[i]`` in units of
            `time_base` (e.g. ``Fraction(1, 1000)``); `num_frames` and `fps` are then ignored (the stream's nominal
            rate is the mean one).
    """
    from fractions import Fraction

    import av

    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    width, height = size
    if pts is not None:
        pts = [int(p) for p in pts]
        if any(b <= a for a, b in zip(pts, pts[1:])):
            raise ValueError("pts must be strictly increasing.")
        time_base = Fraction(time_base if time_base is not None else Fraction(1, 1000))
        num_frames = len(pts)
        span = (pts[-1] - pts[0]) * time_base if num_frames > 1 else Fraction(1)
        rate = Fraction(max(num_frames - 1, 1) / span).limit_denominator(1001)
    else:
        rate = Fraction(fps).limit_denominator(1001)
        time_base = 1 / rate
        pts = list(range(num_frames))
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {
                "preset": preset,
                "crf": "18",
                "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={bframes}",
            }
        elif codec in ("libvpx", "libvpx-vp9"):
            stream.codec_context.gop_size = keyint
            stream.options = {"crf": "4", "b": "0", "auto-alt-ref": "0", "lag-in-frames": "0", "deadline": "realtime",
                              "cpu-used": "8", "keyint_min": str(keyint)}
        elif codec == "mpeg4":
            stream.codec_context.gop_size = keyint
            # No B-frames: the mpeg4 encoder may skip a B-frame whose only change is small (it shows a neighbour).
            stream.options = {"qscale": "2", "bf": "0", "sc_threshold": "1000000000"}
        else:
            stream.codec_context.gop_size = keyint
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(make_frame(start_index + i, size, texture), format="rgb24")
            frame.pts, frame.time_base = pts[i], time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def vfr_timestamps(num_frames: int, seed: int = 0, choices_ms=(20, 40, 60, 80, 100, 120)) -> list[int]:
    """Presentation timestamps in milliseconds (time base 1/1000) for a variable-frame-rate video: frame 0 at 0,
    then gaps drawn from `choices_ms` (deterministic for a seed)."""
    rng = np.random.default_rng(seed)
    gaps = rng.choice(np.asarray(choices_ms), size=max(num_frames - 1, 0))
    return [0] + np.cumsum(gaps).astype(int).tolist()


def write_audio_only(path, seconds: float = 0.5, rate: int = 8000, codec: str = "pcm_s16le"):
    """Write a file with a single audio stream (a sine tone) and no video stream; returns `path`."""
    import av

    samples = int(seconds * rate)
    tone = (np.sin(2 * np.pi * 440 * np.arange(samples) / rate) * 8000).astype(np.int16)[None, :]
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        frame.sample_rate, frame.pts = rate, 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_empty_video(path, codec: str | None = None, size=(32, 32), fps: int = 25):
    """Write a container with a video stream that holds no frames (no packets); returns `path`."""
    import av

    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # write the header (without a packet the muxer would write nothing)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def decode_all_frames(path) -> list[np.ndarray]:
    """Decode every frame of a video in presentation order (the oracle for seek-based decoding)."""
    import av

    with av.open(os.fspath(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]

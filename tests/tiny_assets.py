"""Shared test helpers: an offline tiny tokenizer and synthetic videos whose frames encode their index.

Import from test files as ``from tiny_assets import ...`` (pytest puts tests/ on sys.path).
"""

import os

import numpy as np

# The tokenizer is the one the embedded tiny default of the CLI uses.
from inference.tiny_default import PLACEHOLDER_TOKENS, make_tiny_tokenizer  # noqa: F401


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
    frame[:, : width // 2] = left
    frame[:, width // 2 :] = right
    if texture:
        rows = height - height // 4
        y, x = np.mgrid[rows:height, 0:width]
        pattern = ((x * 7 + y * 3 + index * 5) % 64) * 4
        noise = ((x * 1103515245 + y * 12345 + index * 2654435761) >> 7) & 31
        frame[rows:, :, :] = (pattern + noise).astype(np.uint8)[..., None]
    return frame


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
):
    """Write an mp4 whose frame i shows `make_frame(start_index + i)`; returns `path`.

    Args:
        path: Output file (.mp4).
        num_frames, fps: Length and frame rate (constant).
        size: ``(width, height)``; use even numbers for yuv420p.
        keyint: A keyframe every `keyint` frames exactly (scene-cut detection off).
        codec: ``"libx264"`` (default when available, with `bframes` B-frames) or ``"mpeg4"`` (no B-frames).
        texture: Add a moving pattern (see `make_frame`).
    """
    from fractions import Fraction

    import av

    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    width, height = size
    with av.open(os.fspath(path), mode="w") as container:
        rate = Fraction(fps).limit_denominator(1001)
        stream = container.add_stream(codec, rate=rate)
        stream.codec_context.time_base = 1 / rate
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {
                "preset": "veryfast",
                "crf": "18",
                "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes={bframes}",
            }
        else:
            stream.codec_context.gop_size = keyint
            # No B-frames: the mpeg4 encoder may skip a B-frame whose only change is small (it shows a neighbour).
            stream.options = {"qscale": "2", "bf": "0", "sc_threshold": "1000000000"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(make_frame(start_index + i, size, texture), format="rgb24")
            frame.pts, frame.time_base = i, 1 / rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def decode_all_frames(path) -> list[np.ndarray]:
    """Decode every frame of a video in presentation order (the oracle for seek-based decoding)."""
    import av

    with av.open(os.fspath(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]

# Copyright 2026 The TimeViper authors. Licensed under the Apache License, Version 2.0.
"""Video input for TimeViper: frame sampling, seek-based PyAV decoding, the frame transform, the video and image
processors, and `VideoStream` for long videos. A Hub remote-code file; PyAV is optional (imported inside ``try``).

Frame sampling (`sample_frame_indices`, a pure function of the video's frame count and frame rate):

* ``fps`` (default 1.0): frame ``round((start + k / fps) * video_fps)`` for ``k = 0, 1, ...`` before ``end``. An
  ``fps`` above the video's rate is capped at it with a warning (every frame once). More than ``max_frames``
  (default 256): uniformly subsampled; fewer than ``min_frames``: ``min_frames`` uniform segment midpoints instead.
* ``num_frames``: that many uniform segment midpoints of the window (the reference's ``uniform_indices``).
* ``sampling="reference_eval"``: the reference evaluation rule exactly (`reference_eval_indices`).
* Variable frame rate (``metadata.frame_times``): ``fps``/``start``/``end`` work on the real timestamps; the
  sample at time ``t`` is the frame on screen at ``t``, so a frame can repeat where the video is slower than ``fps``.
"""

import bisect
import copy
import io
import math
import os
import queue
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

# First: the configuration's transformers version guard, before the imports an unsupported release may lack.
from .configuration_timeviper import check_transformers_version  # noqa: F401  isort: skip

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ImagesKwargs, VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata


try:
    import av
except ImportError:  # PyAV is only needed to decode video files; decoded frames work without it.
    av = None


# Frame sampling (pure functions)

SAMPLING_KEYS = ("fps", "num_frames", "max_frames", "min_frames", "start", "end", "sampling")
_SAMPLING_MODES = ("auto", "reference_eval")


def merge_sampling(*levels: dict) -> dict:
    """Sampling options from `levels` of rising precedence (e.g. processor defaults, call kwargs, one video's dict),
    with every key of `SAMPLING_KEYS`. A level that sets ``fps`` or ``num_frames`` drops the other from the levels
    below. ``None`` means "not set"; other keys are ignored."""
    options = dict.fromkeys(SAMPLING_KEYS)
    for level in levels:
        level = {key: value for key, value in level.items() if key in SAMPLING_KEYS and value is not None}
        _check_rule(level.get("fps"), level.get("num_frames"))
        if "num_frames" in level:
            options["fps"] = None
        if "fps" in level:
            options["num_frames"] = None
        options.update(level)
    return options


def _check_rule(fps, num_frames) -> None:
    """``fps`` and ``num_frames`` are two rules for the same thing: at most one, and ``num_frames`` a count."""
    if num_frames is not None and (not isinstance(num_frames, (int, np.integer)) or num_frames < 1):
        raise ValueError(f"`num_frames` must be an integer >= 1, got {num_frames!r}.")
    if fps is not None and num_frames is not None:
        raise ValueError(f"`fps` ({fps}) and `num_frames` ({num_frames}) are mutually exclusive: pass `fps` to sample "
                         "at a rate or `num_frames` for a fixed number of uniformly spaced frames, not both.")


def uniform_indices(num_frames: int, total_frames: int) -> list[int]:
    """Midpoints of ``num_frames`` equal segments of ``range(total_frames)`` (the reference's ``uniform_indices``),
    or every frame when ``num_frames >= total_frames``. Example: ``uniform_indices(4, 10) == [1, 3, 6, 8]``."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}.")
    if num_frames >= total_frames:
        return list(range(total_frames))
    splits = torch.linspace(0, total_frames, num_frames + 1, dtype=torch.int64)
    return ((splits[:-1] + splits[1:]) // 2).tolist()


def reference_eval_indices(total_frames: int, video_fps: float, fps: float = 1.0, max_frames: int = 256,
                           min_frames: int = 32) -> list[int]:
    """The reference's evaluation rule (its ``fps_indices``), exactly: ``round(arange(0, total, video_fps / fps))``
    (float32, round half to even) below ``total``; the first ``max_frames`` kept (truncation); padded to a multiple
    of 4 by repeating the last index; ``uniform_indices(min_frames, total)`` when fewer than ``min_frames`` remain."""
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}.")
    if not video_fps or video_fps <= 0:
        raise ValueError(f"reference_eval sampling needs the video's frame rate, got video_fps={video_fps}.")
    if fps is None or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    indices = torch.arange(0, total_frames, video_fps / fps, dtype=torch.float32).round().to(torch.int64).tolist()
    indices = [i for i in indices if i < total_frames]
    if max_frames is not None and 0 < max_frames < len(indices):
        indices = indices[:max_frames]
    indices += [indices[-1]] * (-len(indices) % 4)  # pad to a multiple of 4
    if min_frames is not None and len(indices) < min_frames:
        indices = uniform_indices(min_frames, total_frames)
    return indices


def sample_frame_indices(
    total_frames: int, video_fps: float | None = None, *, fps: float | None = None, num_frames: int | None = None,
    max_frames: int | None = None, min_frames: int | None = None, start: float | None = None, end: float | None = None,
    sampling: str | None = None, frame_times=None, video_duration: float | None = None,
) -> list[int]:
    """The frame indices to decode for one video, by the rules of the module docstring.

    ``video_fps`` is needed for ``fps``, ``start``/``end`` (a window in seconds) and ``reference_eval``, unless
    ``frame_times`` (a variable frame rate: every frame's presentation time in seconds, ascending) is given, with
    ``video_duration`` (default: the last frame's time plus the mean frame interval). With neither ``fps`` nor
    ``num_frames``, every frame of the window is returned (then capped by ``max_frames``).
    """
    sampling = sampling or "auto"
    _check_sampling(total_frames, fps, num_frames, max_frames, min_frames, sampling)
    if fps is not None and video_fps and fps > video_fps:
        fps = _capped_fps(fps, video_fps, sampling)
    if sampling == "reference_eval":
        if num_frames is not None:
            raise ValueError("sampling='reference_eval' samples at `fps`; it does not take `num_frames`.")
        if start is not None or end is not None:
            raise ValueError("sampling='reference_eval' reproduces the reference, which always samples the whole "
                             "video; it does not take `start`/`end`. Use the default sampling for a window.")
        return reference_eval_indices(total_frames, video_fps, fps or 1.0, max_frames or 256, min_frames or 32)
    if frame_times is not None:
        first, stop, at_rate = _times_window(total_frames, frame_times, video_duration, video_fps, start, end)
    else:
        first, stop, at_rate = _rate_window(total_frames, video_fps, fps, start, end)
    if num_frames is not None:
        return [first + i for i in uniform_indices(int(num_frames), stop - first)]
    indices = list(range(first, stop)) if fps is None else at_rate(fps)
    if max_frames is not None and len(indices) > max_frames:
        indices = [indices[i] for i in uniform_indices(max_frames, len(indices))]
    if min_frames is not None and len(indices) < min_frames:
        indices = [first + i for i in uniform_indices(min_frames, stop - first)]
    return indices


def _check_known(given, valid, what: str) -> None:
    unknown = set(given) - set(valid)
    if unknown:
        raise TypeError(f"Unexpected {what} {sorted(unknown)}; valid: {sorted(valid)}.")


def _check_sampling(total_frames, fps, num_frames, max_frames, min_frames, sampling) -> None:
    if sampling not in _SAMPLING_MODES:
        raise ValueError(f"Unknown sampling {sampling!r}; expected one of {_SAMPLING_MODES}.")
    if total_frames is None or total_frames < 1:
        raise ValueError(f"The video has no frames (total_frames={total_frames}).")
    _check_rule(fps, num_frames)
    if fps is not None and not fps > 0:
        raise ValueError(f"`fps` must be > 0, got {fps!r}.")
    for key, value in (("max_frames", max_frames), ("min_frames", min_frames)):
        if value is not None and value < 1:
            raise ValueError(f"`{key}` must be >= 1, got {value!r}.")
    if max_frames is not None and min_frames is not None and min_frames > max_frames:
        raise ValueError(f"`min_frames` ({min_frames}) must not exceed `max_frames` ({max_frames}).")


def _capped_fps(fps: float, video_fps: float, sampling: str) -> float:
    """``fps`` above the video's frame rate would only repeat frames: every frame once instead, with a warning;
    ``reference_eval`` keeps the reference's repeats, and warns."""
    if sampling == "reference_eval":
        warnings.warn(f"fps={fps} is above the video's frame rate ({video_fps:.3f}); sampling='reference_eval' "
                      "reproduces the reference, which then repeats frames.", stacklevel=3)
        return fps
    warnings.warn(f"fps={fps} is above the video's frame rate ({video_fps:.3f} frames per second): sampling every "
                  f"frame once (fps={video_fps:.3f}) instead of repeating frames.", stacklevel=3)
    return video_fps


def _window_seconds(start, end, duration: float) -> tuple[float, float]:
    start_s = 0.0 if start is None else float(start)
    end_s = duration if end is None else float(end)
    if start_s < 0:
        raise ValueError(f"`start` must be >= 0 seconds, got {start_s}.")
    if start_s >= duration:
        raise ValueError(f"`start` ({start_s}s) is beyond the video's duration ({duration:.3f}s).")
    if end_s <= start_s:
        raise ValueError(f"`start` ({start_s}s) must be before `end` ({end_s}s).")
    return start_s, end_s


def _rate_window(total_frames, video_fps, fps, start, end):
    """For a constant frame rate: the window ``[first, stop)`` of frame indices, and ``fps -> indices``."""
    if (start is not None or end is not None or fps is not None) and not (video_fps is not None and video_fps > 0):
        raise ValueError("Sampling with `fps` or `start`/`end` needs the video's frame rate; for decoded frames pass "
                         "`video_metadata={'fps': ...}`, or use `num_frames`.")
    first, stop = 0, total_frames
    if start is not None or end is not None:
        start_s, end_s = _window_seconds(start, end, total_frames / video_fps)
        # Frame i shows [i / video_fps, (i + 1) / video_fps); keep the frames on screen during [start, end): from
        # the one on screen at `start` (as for a variable rate) to the last that starts before `end`.
        first = min(total_frames - 1, math.floor(start_s * video_fps + 1e-6))
        stop = min(total_frames, max(first + 1, math.ceil(end_s * video_fps - 1e-6)))

    def at_rate(fps: float) -> list[int]:
        if fps >= video_fps:  # every frame (rounding a step of one frame could repeat one)
            return list(range(first, stop))
        begin = 0.0 if start is None else float(start) * video_fps
        finish = float(total_frames) if end is None else min(float(end) * video_fps, float(total_frames))
        positions = np.rint(np.arange(begin, finish, video_fps / fps))  # round half to even, like torch.round
        return [int(p) for p in positions if first <= p < stop] or [first]  # [first]: a window under one frame

    return first, stop, at_rate


def _times_window(total_frames, frame_times, video_duration, video_fps, start, end):
    """For a variable frame rate: the window ``[first, stop)`` by the frames' presentation times, and
    ``fps -> indices`` (the frame on screen at each sample time)."""
    times = np.asarray(frame_times, dtype=np.float64)
    if times.ndim != 1 or len(times) != total_frames:
        raise ValueError(f"`frame_times` must hold one time per frame ({total_frames}), got {times.shape}.")
    if np.any(np.diff(times) < 0):
        raise ValueError("`frame_times` must be in presentation order (ascending).")
    mean_gap = (times[-1] - times[0]) / (total_frames - 1) if total_frames > 1 else 1.0 / (video_fps or 1.0)
    duration = float(times[-1] + mean_gap)
    if video_duration is not None and video_duration > times[-1]:
        duration = float(video_duration)
    eps = 1e-6  # seconds: timestamps are rationals printed as floats
    start_s, end_s = (0.0, duration) if start is None and end is None else _window_seconds(start, end, duration)
    first = max(0, int(np.searchsorted(times, start_s + eps, side="right")) - 1)  # the frame on screen at `start`
    stop = min(total_frames, max(first + 1, int(np.searchsorted(times, end_s - eps, side="left"))))

    def at_rate(fps: float) -> list[int]:
        count = max(1, math.ceil((end_s - start_s) * fps - 1e-9))
        sample_times = start_s + np.arange(count, dtype=np.float64) / fps
        sample_times = sample_times[sample_times < end_s - eps] if count > 1 else sample_times
        positions = np.searchsorted(times, sample_times + eps, side="right") - 1
        return np.clip(positions, first, stop - 1).astype(int).tolist()

    return first, stop, at_rate


def _metadata_indices(metadata, options: dict) -> list[int]:
    """`sample_frame_indices` for a video's metadata (a `VideoMetadata` or a dict)."""
    get = metadata.get if isinstance(metadata, dict) else lambda key: getattr(metadata, key, None)
    frame_times = get("frame_times")
    return sample_frame_indices(get("total_num_frames"), get("fps"), frame_times=frame_times,
                                video_duration=get("duration") if frame_times is not None else None, **options)

# Decoding with PyAV. Demuxing: container and stream checks, the frame index and metadata from one demux pass.


class VideoFileNotFoundError(FileNotFoundError, ValueError):
    """A video path that does not exist (both a `FileNotFoundError` and a `ValueError`)."""


class VideoIsADirectoryError(IsADirectoryError, ValueError):
    """A video path that is a directory (both an `IsADirectoryError` and a `ValueError`)."""


class VideoDecodeError(ValueError):
    """Wanted frames of a video could not be decoded (a damaged or truncated file)."""


# Demuxers FFmpeg picks for files that are not videos: text rendered as a terminal screen (tty and its text-art
# siblings) and still images (image2 and the `*_pipe` image demuxers).
_TEXT_DEMUXERS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
_IMAGE_DEMUXERS = frozenset({"image2", "image2pipe"})
# Decoders that read `skip_frame` per packet, so unwanted non-reference frames can be left undecoded. Others
# (libdav1d reads it once when opened) decode everything.
_SKIPS_PER_PACKET = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4"})


def _describe_source(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _check_demuxer(container, name: str) -> None:
    """Reject inputs that FFmpeg opens with a demuxer meant for text or still images."""
    demuxers = set(container.format.name.split(","))
    if demuxers & _TEXT_DEMUXERS:
        kind = "a text file (FFmpeg would render it as a terminal screen)"
    elif demuxers & _IMAGE_DEMUXERS or any(d.endswith("_pipe") for d in demuxers):
        kind = "a still image"
    else:
        return
    raise ValueError(f"{name} is not a video file: it is {kind}, read by FFmpeg's '{container.format.name}' "
                     "demuxer. Pass images through `images=`.")


def _open_container(source):
    """``(container, name, reopen)`` for a path, bytes or a file object; `reopen` opens it again from its start."""
    if av is None:
        raise ImportError("Decoding video files needs PyAV: `pip install av`. Decoded frames work without it.")
    name = _describe_source(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if "://" not in source and os.path.isdir(source):
            raise VideoIsADirectoryError(f"Video path {name} is a directory, not a video file.")
        if "://" not in source and not os.path.isfile(source):
            raise VideoFileNotFoundError(f"Video file not found: {name}.")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("Cannot decode an empty byte string as a video.")
        source = io.BytesIO(bytes(source))
    elif not hasattr(source, "read"):
        raise TypeError(f"Cannot open a video from {type(source).__name__}; pass a path, bytes or a file object.")
    elif hasattr(source, "seekable") and not source.seekable():
        source = io.BytesIO(source.read())  # seeking needs a seekable input: read a pipe/stream into memory
    offset = source.tell() if hasattr(source, "tell") else None

    def reopen():
        if offset is not None:
            source.seek(offset)
        try:
            return av.open(source, mode="r")
        except Exception as err:  # PyAV raises several FFmpeg error classes; report them uniformly
            raise ValueError(f"Could not open video {name}: unreadable or corrupt ({err}).") from err

    container = reopen()
    try:
        _check_demuxer(container, name)
        _video_stream(container, name)
    except ValueError:
        container.close()
        raise
    return container, name, reopen


def _video_stream(container, name: str):
    """The first video stream that is not an attached picture (cover art)."""
    streams = [s for s in container.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        kinds = sorted({s.type for s in container.streams})
        found = f"it has only {' and '.join(kinds)} stream(s)" if kinds else "it has no streams"
        if container.streams.video:
            found = "its only picture is attached cover art"
        raise ValueError(f"Video {name} has no video stream ({found}): not a video file, or corrupt.")
    stream = streams[0]
    stream.thread_type = "AUTO"  # frame and slice threads; the decoder's output order does not change
    return stream


@dataclass
class TimeViperVideoMetadata(VideoMetadata):
    """`VideoMetadata` with the frames' real presentation times, in seconds from the stream's first frame:
    ``frames_timestamps`` of each returned frame, ``frame_times`` of every frame for a variable frame rate (``fps``
    is then the mean rate; ``None`` for a constant one). ``rotation``: the display matrix's, in degrees
    counter-clockwise (FFmpeg's convention), already applied to the returned frames."""

    frames_timestamps: list[float] | None = None
    frame_times: list[float] | None = field(default=None, repr=False)
    rotation: int = 0

    @property
    def timestamps(self) -> list[float]:
        "Presentation times of the sampled frames in seconds."
        if self.frames_timestamps is not None:
            return list(self.frames_timestamps)
        if self.frame_times is not None and self.frames_indices is not None:
            return [self.frame_times[i] for i in self.frames_indices]
        return super().timestamps


@dataclass
class _FrameIndex:
    """Every frame of a video stream from one demux pass: frame ``i`` has the ``i``-th smallest pts, ``pts[i]``.
    ``seek_targets``: per keyframe, its decoding timestamp (demuxers such as MPEG-TS and MP4 seek by it), else pts."""

    pts: list[int]
    keyframes: list[int]
    seek_targets: list[int]
    last_duration: int = 0  # the last frame's duration in pts units (0: unknown)
    position: dict = field(init=False, repr=False)  # pts -> frame index

    def __post_init__(self):
        self.position = {p: i for i, p in enumerate(self.pts)}

    def keyframe_before(self, index: int) -> int:
        """Position in ``keyframes`` of the last keyframe at or before frame ``index`` (0 before the first)."""
        return max(0, bisect.bisect_right(self.keyframes, index) - 1)


def _scan_frame_index(container, stream, counts: dict, name: str) -> tuple["_FrameIndex | None", int]:
    """Demux the video stream once: ``(index, number of frames)``; no index when the timestamps cannot number the
    frames (a packet without pts, or two with the same one)."""
    packets = []  # (pts, dts, keyframe, duration)
    try:
        for packet in container.demux(stream):
            if packet.size == 0 or packet.is_discard:  # the final empty packet; pre-roll the decoder drops
                continue
            packets.append((packet.pts, packet.dts, packet.is_keyframe, packet.duration or 0))
    except av.error.FFmpegError as err:  # the container itself is damaged further on: keep what came before
        counts["demux_error"] = f"{name}: demuxing stopped after {len(packets)} frames ({err})"
    counts["scanned_packets"] += len(packets)
    if not packets or any(p[0] is None for p in packets) or len({p[0] for p in packets}) < len(packets):
        return None, len(packets)
    packets.sort(key=lambda p: p[0])
    keyframes = [i for i, p in enumerate(packets) if p[2]]
    if not keyframes or keyframes[0] != 0:
        keyframes = [0] + keyframes  # decoding from the first packet is always possible
    seek_targets = [packets[i][1] if packets[i][1] is not None else packets[i][0] for i in keyframes]
    return _FrameIndex([p[0] for p in packets], keyframes, seek_targets, packets[-1][3]), len(packets)


def _constant_rate(seconds: np.ndarray, candidates: list[float]) -> float | None:
    """A rate from `candidates` on whose grid every frame time lies (within a quarter frame), if any."""
    return next((rate for rate in candidates if np.all(np.abs(seconds * rate - np.arange(len(seconds))) < 0.25)), None)


def _index_metadata(stream, index: _FrameIndex, metadata: TimeViperVideoMetadata) -> None:
    """Frame count, rate, duration and (variable rate only) frame times from the frame index."""
    time_base = float(stream.time_base)
    seconds = (np.asarray(index.pts, dtype=np.float64) - index.pts[0]) * time_base
    count = len(seconds)
    candidates = [float(r) for r in (stream.average_rate, stream.base_rate, stream.guessed_rate) if r and r > 0]
    if count > 1 and seconds[-1] > 0:
        candidates.append((count - 1) / float(seconds[-1]))
    metadata.total_num_frames = count
    rate = _constant_rate(seconds, candidates) if count > 1 else (candidates[0] if candidates else None)
    if rate is not None:
        metadata.fps, metadata.frame_times = rate, None
        metadata.duration = count / rate  # frame i is shown during [i / fps, (i + 1) / fps)
        return
    if count == 1:  # one frame and no rate: it lasts its packet's duration, else one second
        metadata.fps = None
        metadata.duration = index.last_duration * time_base or 1.0
        metadata.frame_times = [0.0]
        return
    mean_gap = float(seconds[-1]) / (count - 1)
    last = index.last_duration * time_base if 0 < index.last_duration * time_base <= 4 * mean_gap else mean_gap
    metadata.duration = float(seconds[-1]) + last
    metadata.fps = count / metadata.duration
    metadata.frame_times = seconds.tolist()


def _stream_metadata(stream) -> TimeViperVideoMetadata:
    """The stream header's view: frame rate, display size (sample aspect ratio and rotation applied)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    width, height = stream.codec_context.width or None, stream.codec_context.height or None
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    if width and sar and sar > 0 and sar != 1:  # non-square pixels: scale the width to the display aspect ratio
        width = max(1, int(round(width * float(sar))))
    return TimeViperVideoMetadata(total_num_frames=int(stream.frames or 0), fps=float(rate) if rate else None,
                                  width=width, height=height, video_backend="pyav")


def _demux(container, name: str, counts: dict):
    """``(stream, frame index, metadata)`` from the demux pass; without an index, the header's frame rate."""
    stream = _video_stream(container, name)
    metadata = _stream_metadata(stream)
    index, count = _scan_frame_index(container, stream, counts, name)
    if count == 0:
        raise ValueError(f"Video {name} has no frames: its video stream holds no packets (empty or truncated).")
    _warn_if_cut(stream, count, counts, name)
    if index is not None:
        _index_metadata(stream, index, metadata)
    else:
        metadata.total_num_frames = count
        metadata.duration = count / metadata.fps if metadata.fps else None
    return stream, index, metadata


def _warn_if_cut(stream, count: int, counts: dict, name: str) -> None:
    """A container header that lists more frames than the file holds (a cut download), or a damaged container."""
    if "demux_error" in counts:
        warnings.warn(f"Video {name} is damaged: {counts['demux_error']}; using the {count} frames before it.",
                      stacklevel=4)
    elif stream.frames and stream.frames > count:
        warnings.warn(f"Video {name} is truncated: its header lists {stream.frames} frames, the file holds {count}; "
                      "using those.", stacklevel=4)


# Decode policy: which groups of pictures to decode, seeking or reading on, and what stands in for a lost frame


class _Pictures:
    """Converts decoded frames to display RGB (sample aspect ratio, display-matrix rotation) into one preallocated
    array of the wanted frames, so memory stays at the size of the result."""

    def __init__(self, wanted: list[int], width: int | None, height: int | None, label: str | None):
        self.width, self.height = width, height
        self.slot = {index: k for k, index in enumerate(wanted)}
        self.array = None
        self.rotation = 0
        self.done: set[int] = set()
        self.bar = tqdm(total=len(wanted), desc=f"decoding {label}", unit="frame", leave=False, disable=label is None)

    def put(self, index: int, frame) -> None:
        if self.width is None or self.height is None:  # no size in the header: the first frame's
            self.width, self.height = frame.width, frame.height
        rgb = frame.reformat(width=self.width, height=self.height, format="rgb24").to_ndarray()
        if self.array is None:
            # `frame.rotation` is counter-clockwise (FFmpeg's convention), as np.rot90 turns for k > 0. The first
            # frame's rotation holds for all, so that every frame has one shape.
            self.rotation = 90 * (int(round(frame.rotation / 90)) % 4)
            shape = (self.width, self.height) if self.rotation in (90, 270) else (self.height, self.width)
            self.array = np.empty((len(self.slot), *shape, 3), dtype=np.uint8)
        self.array[self.slot[index]] = np.rot90(rgb, k=self.rotation // 90) if self.rotation else rgb
        if index not in self.done:
            self.bar.update(1)
        self.done.add(index)


class _TimestampMismatch(Exception):
    """A decoded frame's pts is not one of the demuxed packets' (the frame cannot be numbered by timestamp)."""


class _SeekLandedLate(Exception):
    """Seeking even to the first keyframe landed after it (a demuxer that cannot seek back to the start)."""


class _IndexedDecode:
    """Decode the `wanted` frames (sorted, unique) of a stream numbered by its `_FrameIndex`.

    Decoding starts at the keyframe before the next wanted frame and goes on while a wanted frame is still to come;
    the packets up to the next wanted frame's keyframe are then skipped, or sought past when more than `_SEEK_GOPS`
    groups of pictures lie between. A seek that lands after its keyframe is retried further back (MPEG-TS seeks by
    decoding timestamps); the leading pictures of an open GOP are dropped. Frames that never come out: `missing`.
    """

    _SEEK_GOPS = 2

    def __init__(self, container, stream, index: _FrameIndex, wanted, pictures: _Pictures, counts: dict,
                 skip_nonref: bool):
        self.container, self.stream, self.index = container, stream, index
        self.codec = stream.codec_context
        self.wanted, self.wanted_set = wanted, set(wanted)
        self.pictures, self.counts = pictures, counts
        self.skip_nonref = skip_nonref and self.codec.name in _SKIPS_PER_PACKET
        self.skip_mode = None
        self.key_position = {key: k for k, key in enumerate(index.keyframes)}
        self.next = 0  # position in `wanted` of the next frame to come
        self.floor = 0  # frames before this index are leading pictures decoded without their references
        self.fed_key = -1  # position in `keyframes` of the last keyframe fed to the decoder
        self.late = 0  # seeks in a row that landed after their keyframe
        self.missing: list[int] = []

    def run(self, seek: bool = True) -> list[int]:
        """Decode; returns the wanted frames that did not come out. ``seek=False``: read from the current
        position (a container just opened), decoding from its first packet."""
        target = None if not seek else self.index.keyframe_before(self.wanted[0])
        while self.next < len(self.wanted):
            if target is not None:
                self._seek(target)
            target = self._read(waiting=target)
        return self.missing

    def _seek(self, key: int) -> None:
        self.container.seek(self.index.seek_targets[key], stream=self.stream, backward=True, any_frame=False)
        self.codec.flush_buffers()
        self.counts["seeks"] += 1
        self.fed_key = -1

    def _read(self, waiting: int | None) -> int | None:
        """Read packets from the current position. ``waiting``: skip until that keyframe (position in `keyframes`).
        Returns the keyframe to seek to next, or ``None`` when done."""
        seen_key = False
        for packet in self.container.demux(self.stream):
            if packet.size == 0:
                continue
            self.counts["demuxed_packets"] += 1
            i = self.index.position.get(packet.pts)
            if waiting is not None:
                if not packet.is_keyframe or i is None or i < self.index.keyframes[waiting]:
                    seen_key = seen_key or (packet.is_keyframe and i is not None)
                    continue
                if i > self.index.keyframes[waiting] and not seen_key:
                    return self._landed_late(waiting)
                # The keyframe waited for (or, if its packet is lost, the next one): decode from here.
                self.codec.flush_buffers()
                self.floor = i if self.key_position.get(i, 0) > 0 else 0
                waiting, self.late = None, 0
            if packet.is_keyframe and i in self.key_position:
                self.fed_key = self.key_position[i]
            self._feed(packet)
            if self.next >= len(self.wanted):
                return None
            upcoming = self.index.keyframe_before(self.wanted[self.next])
            if upcoming > self.fed_key:  # every wanted frame before that keyframe is out: stop decoding
                if upcoming - max(self.fed_key, 0) > self._SEEK_GOPS:
                    return upcoming
                waiting, seen_key = upcoming, True
        self._feed(None)  # end of the stream: drain the decoder
        self.missing.extend(self.wanted[self.next:])
        self.next = len(self.wanted)
        return None

    def _landed_late(self, waiting: int) -> int:
        """The keyframe to seek to instead: 2, 4, 8, ... keyframes further back."""
        self.counts["late_seeks"] = self.counts.get("late_seeks", 0) + 1
        if waiting == 0:
            raise _SeekLandedLate()
        self.late += 1
        return max(0, waiting - 2**self.late)

    def _feed(self, packet) -> None:
        if packet is not None:
            self.counts["decoded_packets"] += 1
            if self.skip_nonref:
                i = self.index.position.get(packet.pts)
                mode = "DEFAULT" if i is None or i in self.wanted_set else "NONREF"
                if mode != self.skip_mode:
                    self.codec.skip_frame = mode
                    self.skip_mode = mode
        try:
            frames = self.codec.decode(packet)
        except av.error.EOFError:
            return
        except av.error.FFmpegError:  # a damaged packet: its frame is lost, the frames after it may decode
            self.counts["decode_errors"] = self.counts.get("decode_errors", 0) + 1
            return
        for frame in frames:
            self._take(frame)

    def _take(self, frame) -> None:
        i = self.index.position.get(frame.pts)
        if i is None:
            raise _TimestampMismatch(frame.pts)
        if i < self.floor:
            return
        while self.next < len(self.wanted) and self.wanted[self.next] < i:
            self.missing.append(self.wanted[self.next])  # dropped or undecodable: it will not come any more
            self.next += 1
        if self.next < len(self.wanted) and self.wanted[self.next] == i:
            self.pictures.put(i, frame)
            self.next += 1


def _decode_in_order(container, wanted: list[int], pictures: _Pictures, counts: dict) -> list[int]:
    """Decode from the start, numbering frames in output (presentation) order, for streams whose timestamps cannot
    number them. Returns the wanted frames that did not come out."""
    stream = _video_stream(container, "")
    wanted_set = set(wanted)
    try:
        for ordinal, frame in enumerate(container.decode(stream)):
            counts["decoded_packets"] += 1
            if ordinal in wanted_set:
                pictures.put(ordinal, frame)
            if ordinal >= wanted[-1]:
                break
    except av.error.FFmpegError as err:  # damaged further on: the frames before are kept
        counts["decode_errors"] = counts.get("decode_errors", 0) + 1
        counts["decode_error"] = str(err)
    return [i for i in wanted if i not in pictures.done]


def _check_indices(chosen, metadata, name: str) -> list[int]:
    chosen = [int(i) for i in chosen]
    if not chosen:
        raise ValueError(f"No frames were selected from video {name}.")
    if min(chosen) < 0:
        raise ValueError(f"Frame indices must be >= 0, got {min(chosen)}.")
    if max(chosen) >= metadata.total_num_frames:
        raise ValueError(f"Frame index {max(chosen)} is out of range for video {name} "
                         f"({metadata.total_num_frames} frames).")
    return chosen


def _substitutes(missing: list[int], produced: set[int], name: str, tolerant: bool) -> dict[int, int]:
    """Each missing frame -> the nearest frame that was produced (tolerant mode), else a `VideoDecodeError`."""
    shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
    if not tolerant or not produced:
        raise VideoDecodeError(f"Could not decode frame(s) {shown} of video {name} ({len(missing)} of the frames "
                               "wanted): the file is damaged or truncated there. Pass `tolerant=True` to use the "
                               "nearest decodable frames instead.")
    ordered = sorted(produced)
    swap = {}
    for i in missing:
        k = bisect.bisect_left(ordered, i)
        near = [ordered[j] for j in (k - 1, k) if 0 <= j < len(ordered)]
        swap[i] = min(near, key=lambda j: (abs(j - i), j))
    listed = ", ".join(f"{i}->{j}" for i, j in list(swap.items())[:20]) + (" ..." if len(swap) > 20 else "")
    warnings.warn(f"Video {name}: frame(s) could not be decoded (damaged or truncated file); used the nearest "
                  f"decodable frame instead (wanted->used): {listed}.", stacklevel=3)
    return swap


def _decode_wanted(container, reopen, stream, index, wanted, pictures, counts):
    """Decode `wanted` into `pictures`; returns ``(container, missing)`` (the container may have been reopened)."""
    if index is not None:
        try:
            try:
                return container, _decode_by_timestamp(container, stream, index, wanted, pictures, counts)
            except _SeekLandedLate:  # a demuxer that cannot seek back to the start: read it from a fresh start
                container.close()
                container = reopen()
                todo = [i for i in wanted if i not in pictures.done]
                decode = _IndexedDecode(container, _video_stream(container, ""), index, todo, pictures, counts,
                                        skip_nonref=False)
                return container, decode.run(seek=False)
        except _TimestampMismatch:  # the decoder's timestamps differ from the demuxer's: number by output order
            pass
    container.close()
    container = reopen()
    pictures.done.clear()  # frames numbered by timestamp before the mismatch are decoded again, by order
    return container, _decode_in_order(container, wanted, pictures, counts)


def _decode_by_timestamp(container, stream, index, wanted, pictures, counts) -> list[int]:
    """`_IndexedDecode` skipping unwanted non-reference frames; the wanted frames lost that way (a decoder that
    applies the skip to another packet) are decoded once more without skipping. Returns the frames still missing."""
    first = _IndexedDecode(container, stream, index, wanted, pictures, counts, skip_nonref=True)
    missing = first.run()
    if missing and first.skip_nonref:
        missing = _IndexedDecode(container, stream, index, missing, pictures, counts, skip_nonref=False).run()
    return missing


def decode_video_pyav(source, indices: list[int] | None = None, sample_indices_fn=None, stats: dict | None = None,
                      progress: bool = False, tolerant: bool = False) -> tuple[np.ndarray, TimeViperVideoMetadata]:
    """Decode frames ``indices`` (presentation order; any order, repeats allowed) of a path, bytes or binary file,
    or those `sample_indices_fn(metadata)` picks once a demux pass has found the frame count, rate (for a variable
    rate, ``metadata.frame_times``) and duration; only the groups of pictures holding wanted frames are decoded.
    `stats` receives the packet and seek counts; `progress` shows a bar; `tolerant` replaces a frame that cannot be
    decoded by the nearest decoded one, with a warning, instead of raising `VideoDecodeError` (for training data).

    Returns ``(frames, metadata)``: uint8 RGB ``(len(indices), height, width, 3)`` as displayed (sample aspect ratio
    and rotation applied), and `TimeViperVideoMetadata` with the returned frames' ``frames_indices`` and
    ``frames_timestamps``. Raises `ValueError` for an input that is unreadable, not a video or without frames.
    """
    if indices is None and sample_indices_fn is None:
        raise ValueError("Pass `indices` or `sample_indices_fn`.")
    frames, metadata, _ = _decode_video(source, indices, sample_indices_fn, stats, progress, tolerant)
    return frames, metadata


def _decode_video(source, indices=None, sample_indices_fn=None, stats=None, progress=False, tolerant=False,
                  scan=None):
    """`decode_video_pyav`, also returning its demux pass ``(frame index, metadata)``, which a later call on the same
    source takes as `scan` instead of demuxing again (that reads every packet of the file: 0.7 s for an hour of
    30 fps video, and the whole file from disk)."""
    container, name, reopen = _open_container(source)
    counts = {"decoded_packets": 0, "demuxed_packets": 0, "seeks": 0, "scanned_packets": 0}
    pictures = None
    try:
        if scan is None:
            stream, index, metadata = _demux(container, name, counts)
            scan = (index, copy.copy(metadata))
        else:
            stream, (index, metadata) = _video_stream(container, name), (scan[0], copy.copy(scan[1]))
        chosen = _check_indices(indices if indices is not None else sample_indices_fn(metadata), metadata, name)
        wanted = sorted(set(chosen))
        pictures = _Pictures(wanted, metadata.width, metadata.height, name if progress else None)
        container, missing = _decode_wanted(container, reopen, stream, index, wanted, pictures, counts)
        swap = _substitutes(missing, pictures.done, name, tolerant) if missing else {}
        used = [swap.get(i, i) for i in chosen]
        frames = pictures.array[[pictures.slot[i] for i in used]] if used != wanted else pictures.array
    except av.error.FFmpegError as err:
        raise ValueError(f"Could not decode video {name}: corrupt or unsupported ({err}).") from err
    finally:
        if pictures is not None:
            pictures.bar.close()
        container.close()
    if stats is not None:
        stats.update(counts)
    metadata.frames_indices = used
    if index is not None:
        time_base, origin = float(stream.time_base), index.pts[0]
        metadata.frames_timestamps = [(index.pts[i] - origin) * time_base for i in used]
    elif metadata.fps:
        metadata.frames_timestamps = [i / metadata.fps for i in used]
    metadata.height, metadata.width = frames.shape[1:3]
    metadata.rotation = pictures.rotation
    return frames, metadata, scan


# Frame transform (shared by the image and video processors) and input normalisation


def _size_hw(size) -> tuple[int, int]:
    if size is None:
        raise ValueError("`size` must be set, e.g. {'height': 384, 'width': 384}.")
    if isinstance(size, int):
        return size, size
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    height = size.get("height") if hasattr(size, "get") else getattr(size, "height", None)
    width = size.get("width") if hasattr(size, "get") else getattr(size, "width", None)
    if height is None or width is None:
        raise ValueError(f"`size` must give 'height' and 'width' (a squash resize), got {size!r}.")
    return int(height), int(width)


def _to_pil(frame) -> PIL.Image.Image:
    """One frame (PIL image, HWC/CHW uint8 array or tensor) -> PIL image in RGB."""
    if isinstance(frame, PIL.Image.Image):
        image = frame
    else:
        array = frame.detach().cpu().numpy() if isinstance(frame, torch.Tensor) else np.asarray(frame)
        if array.dtype != np.uint8:
            raise ValueError(f"Frames must be uint8 in [0, 255], got dtype {array.dtype}; convert with "
                             "`(x * 255).round().clip(0, 255).astype(np.uint8)` if they are scaled to [0, 1].")
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3:
            raise ValueError(f"A frame must be (H, W, C) or (C, H, W), got shape {tuple(array.shape)}.")
        if array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
            array = np.transpose(array, (1, 2, 0))
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        if array.shape[-1] not in (3, 4):
            raise ValueError(f"A frame must have 1, 3 or 4 channels, got shape {tuple(array.shape)}.")
        image = PIL.Image.fromarray(np.ascontiguousarray(array))
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def transform_frames(frames, size, resample=PIL.Image.Resampling.BICUBIC, do_resize: bool = True,
                     do_rescale: bool = True, rescale_factor: float = 1 / 255, do_normalize: bool = True,
                     image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """RGB -> squash resize to ``size`` with PIL -> rescale -> normalize: float32 ``(frames, 3, height, width)``, as
    the reference's ``Resize((384, 384), bicubic)`` on PIL images, ``ToTensor()``, ``Normalize(0.5, 0.5)``."""
    height, width = _size_hw(size)
    resample = PIL.Image.Resampling(int(resample if resample is not None else PIL.Image.Resampling.BICUBIC))
    tensors = []
    for frame in frames:
        image = _to_pil(frame)
        if do_resize and image.size != (width, height):
            image = image.resize((width, height), resample=resample)
        tensors.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
    if not tensors:
        raise ValueError("Got an empty list of frames.")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise ValueError(f"Frames have different sizes {sorted(shapes)}; set do_resize=True to batch them.")
    return rescale_and_normalize(torch.stack(tensors), do_rescale, rescale_factor, do_normalize, image_mean, image_std)


def rescale_and_normalize(pixels, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                          image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)) -> torch.Tensor:
    """uint8 (frames, 3, h, w) on any device -> float32 pixels, as `transform_frames` gives them."""
    pixels = pixels.to(torch.float32)
    if do_rescale:
        # Divide rather than multiply for the default factor, as ToTensor does (bit-exact).
        pixels = pixels / 255.0 if math.isclose(rescale_factor, 1 / 255) else pixels * rescale_factor
    if do_normalize:
        mean = torch.tensor(image_mean, dtype=torch.float32, device=pixels.device).reshape(-1, 1, 1)
        std = torch.tensor(image_std, dtype=torch.float32, device=pixels.device).reshape(-1, 1, 1)
        pixels = (pixels - mean) / std
    return pixels


def _is_frame(x) -> bool:
    return isinstance(x, PIL.Image.Image) or (isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3)


def _is_file(video) -> bool:
    return isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(video, "read")


def _flatten_videos(videos) -> list:
    """Flatten a video, a batch of videos, or nested per-sample lists of videos into a list of single videos."""
    if _is_file(videos) or isinstance(videos, dict):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
        raise ValueError(f"A video array must be (T, H, W, C) or (T, C, H, W) (or 5-D for a batch), got shape "
                         f"{tuple(videos.shape)}.")
    if isinstance(videos, (list, tuple)):
        if len(videos) == 0:
            raise ValueError("Got an empty list of frames/videos.")
        if all(_is_frame(x) for x in videos):
            return [list(videos)]  # one video given as a list of frames
        flat = []
        for item in videos:
            if _is_frame(item):
                raise ValueError("A list mixes single frames with whole videos; pass one list of frames per video.")
            if isinstance(item, (list, tuple)) and len(item) == 0:
                continue  # a sample without videos (e.g. from apply_chat_template)
            flat.extend(_flatten_videos(item))
        return flat
    raise TypeError(f"Unsupported video input {type(videos).__name__}: pass a path, bytes, a file object, a uint8 "
                    "array/tensor (T, H, W, 3) or (T, 3, H, W), a list of PIL images, or a list of those.")


def _load_image(source) -> PIL.Image.Image:
    """A path, URL or base64 string -> PIL image (base64 has no '.', so a string with one is a path or URL)."""
    source = os.fspath(source)
    if "://" not in source and not source.startswith("data:") and "." in source and not os.path.isfile(source):
        raise VideoFileNotFoundError(f"Image file not found: '{source}'.")
    return load_image(source)


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


# Video and image processors

_TRANSFORM_KEYS = ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean",
                   "image_std")


def _source_and_options(video) -> tuple:
    """``(source, sampling dict)`` of a video: a conversation's video item holds both; other inputs have no dict."""
    if not isinstance(video, dict):
        return video, {}
    source = next((video[key] for key in ("video", "path", "url") if video.get(key) is not None), None)
    if source is None:
        raise ValueError(f"A video dict needs a 'video', 'path' or 'url' entry, got keys {sorted(video)}.")
    return source, video


def _option(processor, kwargs: dict, key: str):
    """The call's kwarg over the processor's attribute."""
    return kwargs[key] if kwargs.get(key) is not None else getattr(processor, key)


def _transform_options(processor, kwargs: dict) -> dict:
    return {key: _option(processor, kwargs, key) for key in _TRANSFORM_KEYS}


class TimeViperVideoProcessorKwargs(VideosKwargs, total=False):
    """`VideosKwargs` (which has ``fps`` and ``num_frames``) with the other sampling options and ``progress`` (a
    progress bar while decoding each video)."""

    max_frames: int | None
    min_frames: int | None
    start: float | None
    end: float | None
    sampling: str | None
    progress: bool


class _FrameTransformDefaults:
    """The frame transform of both processors: the reference's squash resize to 384x384 (bicubic), pixels to [-1, 1]."""

    resample = PIL.Image.Resampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 384, "width": 384}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True


class TimeViperVideoProcessor(_FrameTransformDefaults, BaseVideoProcessor):
    r"""Decode, sample and normalise videos for TimeViper.

    Accepts, per video (a list of them is a batch): a path, raw bytes or a binary file object (decoded with PyAV); a
    uint8 array/tensor ``(T, H, W, 3)`` or ``(T, 3, H, W)``; a list of PIL images or HWC arrays; or a dict
    ``{"video"|"path"|"url": source, <sampling options>}`` whose options override the call's for that video. Decoded
    frames are sampled only with ``num_frames`` or a frame rate from ``video_metadata={"fps": ...}``, else all used.

    Returns a `BatchFeature` with ``pixel_values_videos`` (float32 ``(total frames of all videos, 3, H, W)``),
    ``video_num_frames`` (int64 ``(num_videos,)``) and ``video_metadata`` (`VideoMetadata` with the sampled
    ``frames_indices``; for decoded files, `TimeViperVideoMetadata` with the frames' real presentation times).
    """

    do_center_crop = False
    do_sample_frames = True
    fps = 1.0
    num_frames = None
    max_frames = 256
    min_frames = None
    start = None
    end = None
    sampling = "auto"
    progress = False
    valid_kwargs = TimeViperVideoProcessorKwargs
    model_input_names = ["pixel_values_videos"]

    def sampling_options(self, *levels: dict) -> dict:
        """This processor's sampling attributes with `levels` over them (`merge_sampling`)."""
        defaults = {key: getattr(self, key, None) for key in SAMPLING_KEYS}
        if defaults["num_frames"] is not None:  # a processor saved to sample a fixed count
            defaults["fps"] = None
        return merge_sampling(defaults, *levels)

    def sample_frames(self, metadata, **options) -> list[int]:
        """`BaseVideoProcessor` hook: a video's frame indices for its `metadata`, `options` over the attributes."""
        _check_known(options, SAMPLING_KEYS, "sampling options for sample_frames")
        return _metadata_indices(metadata, self.sampling_options(options))

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        """Decode/sample each video, then resize, rescale and normalise its frames (see the class docstring)."""
        _check_known(kwargs, self.valid_kwargs.__annotations__, f"{type(self).__name__} kwargs")
        transform = _transform_options(self, kwargs)
        do_sample_frames = bool(_option(self, kwargs, "do_sample_frames"))
        progress = bool(_option(self, kwargs, "progress"))
        call_sampling = merge_sampling(kwargs)
        video_list = _flatten_videos(videos)
        hints = kwargs.get("video_metadata")
        if hints is None or isinstance(hints, (dict, VideoMetadata)):
            hints = [hints] * len(video_list)
        elif len(hints) != len(video_list):
            raise ValueError(f"Got {len(hints)} `video_metadata` entries for {len(video_list)} videos.")

        pixel_values, metadata = [], []
        for video, hint in zip(video_list, hints):
            frames, meta = self._load_video(video, call_sampling, hint, do_sample_frames, progress)
            pixel_values.append(transform_frames(frames, **transform))
            metadata.append(meta)
        shapes = {tuple(p.shape[1:]) for p in pixel_values}
        if len(shapes) > 1:
            raise ValueError(f"Videos have different frame sizes {sorted(shapes)}; set do_resize=True.")
        num_frames = torch.tensor([len(m.frames_indices) for m in metadata], dtype=torch.int64)
        data = {"pixel_values_videos": torch.cat(pixel_values), "video_num_frames": num_frames,
                "video_metadata": metadata}
        return BatchFeature(data=data, skip_tensor_conversion=["video_metadata"])

    def _load_video(self, video, call_sampling: dict, hint, do_sample_frames: bool, progress: bool):
        """One video's sampled frames and metadata; a video dict's sampling keys override the call's."""
        video, item = _source_and_options(video)
        given = merge_sampling(call_sampling, item)
        options = self.sampling_options(given)
        if _is_file(video):
            def indices(meta):
                return _metadata_indices(meta, options) if do_sample_frames else list(range(meta.total_num_frames))

            return decode_video_pyav(video, sample_indices_fn=indices, progress=progress)
        return _sample_decoded_frames(video, options, given["fps"] is not None, hint, do_sample_frames)


def _sample_decoded_frames(video, options: dict, fps_given: bool, hint, do_sample_frames: bool):
    """Decoded frames are sampled by ``num_frames`` or their frame rate from `hint`, else taken as sampled."""
    if not isinstance(video, (list, tuple)) and video.ndim != 4:
        raise ValueError(f"A video array must be 4-D (T, H, W, C) or (T, C, H, W), got {tuple(video.shape)}.")
    total = len(video)
    if total == 0:
        raise ValueError("Got a video with no frames.")
    video_fps = dict(hint or {}).get("fps")
    if not do_sample_frames:
        indices = list(range(total))
    elif options["num_frames"] is not None or video_fps or options["sampling"] == "reference_eval":
        indices = sample_frame_indices(total, video_fps, **options)
    elif fps_given or options["start"] is not None or options["end"] is not None:
        raise ValueError("Sampling decoded frames with `fps` or `start`/`end` needs their frame rate: pass "
                         "`video_metadata={'fps': ...}`, or use `num_frames`.")
    else:
        indices = list(range(total))
    selected = [video[i] for i in indices]
    first = _to_pil(selected[0])
    return selected, VideoMetadata(total_num_frames=total, fps=video_fps, width=first.width, height=first.height,
                                   duration=total / video_fps if video_fps else None, video_backend=None,
                                   frames_indices=indices)


class TimeViperImageProcessor(_FrameTransformDefaults, BaseImageProcessor):
    """The frame transform of `TimeViperVideoProcessor` for PIL images, uint8 HWC/CHW arrays or tensors, paths/URLs,
    or (nested) lists of them: ``pixel_values`` float32 ``(num_images, 3, H, W)``."""

    valid_kwargs = ImagesKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # BaseImageProcessor leaves resolving the class defaults to the subclass (remote code written before it did).
        self._set_attributes(**kwargs)

    def fetch_images(self, images):
        # `preprocess` loads paths and URLs itself (naming a missing file, accepting `os.PathLike`).
        return images

    def preprocess(self, images, **kwargs) -> BatchFeature:
        _check_known(kwargs, self.valid_kwargs.__annotations__, f"{type(self).__name__} kwargs")
        flat = _flatten_images(images)
        if not flat:
            raise ValueError("Got an empty list of images.")
        loaded = [_load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in flat]
        return BatchFeature(data={"pixel_values": transform_frames(loaded, **_transform_options(self, kwargs))})


# Streaming video input: long videos read chunk by chunk, with host memory bounded whatever their length


class VideoStream:
    """A video file (a path, bytes, or a conversation's video dict) read lazily, `chunk_frames` sampled frames at a
    time, with `video_processor`'s sampling (`sampling` options over it), size and normalisation.

    Opening it decodes the first chunk and fixes the sampled frames (`num_frames`, `metadata`). Iterating yields
    uint8 (chunk, 3, height, width) tensors, decoded by a background thread at most `prefetch_chunks` ahead, so host
    memory is a few chunks whatever the video's length; `pixel_chunks` normalises them on the model's device. The
    file is demuxed once, when the stream opens; each later chunk reopens it and decodes only the groups of pictures
    that hold its frames.
    `resize_threads` resize a chunk (PIL releases the GIL; at 720p and up one thread is slower than the decoder).
    """

    def __init__(self, video, video_processor, chunk_frames: int = 64, prefetch_chunks: int = 2,
                 resize_threads: int = 4, **sampling):
        _check_known(sampling, SAMPLING_KEYS, "sampling options for VideoStream")
        if chunk_frames < 1 or prefetch_chunks < 1:
            raise ValueError(f"chunk_frames and prefetch_chunks must be >= 1, got {chunk_frames} and "
                             f"{prefetch_chunks}.")
        source, item = _source_and_options(video)
        if not isinstance(source, (str, os.PathLike, bytes)):
            raise TypeError(f"VideoStream reads a path or bytes (it reopens the file for each chunk), got "
                            f"{type(source).__name__}.")
        self.source, self.video_processor = source, video_processor
        self.chunk_frames, self.prefetch_chunks = chunk_frames, prefetch_chunks
        self.resize_threads = max(1, resize_threads)
        options = video_processor.sampling_options(sampling, item)
        sampled = []

        def first_chunk(metadata) -> list[int]:
            sampled.extend(_metadata_indices(metadata, options))
            return sampled[:chunk_frames]

        started = time.perf_counter()
        frames, self.metadata, self.scan = _decode_video(source, sample_indices_fn=first_chunk)
        self.first_chunk = self.resize(frames)
        self.decode_seconds = time.perf_counter() - started  # decoding and resizing (then in the background thread)
        self.indices = sampled
        # Only the first chunk has been decoded: its times would not cover the video, the frame rate does.
        self.metadata.frames_indices, self.metadata.frames_timestamps = sampled, None

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    def resize(self, frames: np.ndarray) -> torch.Tensor:
        """Decoded RGB frames -> uint8 (frames, 3, height, width) by the processor's resize, in `resize_threads`."""
        options = _transform_options(self.video_processor, {"do_rescale": False, "do_normalize": False})

        def resize_group(group):
            return transform_frames(group, **options).to(torch.uint8)  # whole numbers in [0, 255]: exact

        groups = [group for group in np.array_split(frames, self.resize_threads) if len(group)]
        if len(groups) == 1:
            return resize_group(groups[0])
        with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="timeviper-resize") as pool:
            return torch.cat(list(pool.map(resize_group, groups)))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        processor = self.video_processor
        return rescale_and_normalize(
            pixels, processor.do_rescale, processor.rescale_factor, processor.do_normalize, processor.image_mean,
            processor.image_std,
        )

    def __iter__(self):
        chunks = queue.Queue(maxsize=self.prefetch_chunks)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    chunks.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce():
            try:
                for start in range(self.chunk_frames, self.num_frames, self.chunk_frames):
                    started = time.perf_counter()
                    chunk = self.indices[start : start + self.chunk_frames]
                    frames, _, _ = _decode_video(self.source, chunk, scan=self.scan)
                    resized = self.resize(frames)
                    del frames
                    self.decode_seconds += time.perf_counter() - started
                    if not put(resized):
                        return
                put(None)
            except Exception as err:  # handed to the consumer, which raises it
                put(err)

        producer = threading.Thread(target=produce, name="timeviper-video-decode", daemon=True)
        producer.start()
        try:
            yield self.first_chunk
            while (item := chunks.get()) is not None:
                if isinstance(item, Exception):
                    raise ValueError(f"Decoding video {self.source!r} failed: {item}") from item
                yield item
        finally:
            stop.set()
            producer.join()

    def pixel_chunks(self, device=None, dtype=None):
        """Normalised pixels, chunk by chunk, on `device` in `dtype`: uint8 crosses to the device (a quarter of
        the float32 bytes) and is normalised there."""
        device = torch.device("cpu" if device is None else device)
        for chunk in self:
            if device.type == "cuda":
                chunk = chunk.pin_memory()
            pixels = self.normalize(chunk.to(device, non_blocking=device.type == "cuda"))
            yield pixels if dtype is None else pixels.to(dtype)

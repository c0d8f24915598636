# Copyright 2026 The TimeViper authors. Licensed under the Apache License, Version 2.0.
"""Processors for TimeViper: video/image preprocessing, seek-based PyAV decoding, prompts and labels.

This is a Hub remote-code file. It imports numpy, torch, PIL, transformers and (for its transformers version guard)
configuration_timeviper at module level; PyAV is optional and imported inside ``try``. Importing it registers
nothing; ``TimeViperProcessor.save_pretrained`` registers the processors for their Auto classes, so that every saved
folder has their ``auto_map`` and this file.

Data flow::

    video file / bytes / frames --decode_video_pyav--> uint8 frames (T, H, W, 3) + VideoMetadata
        --TimeViperVideoProcessor--> pixel_values_videos (sum T, 3, 384, 384), float32 in [-1, 1]
    text with one "<video>" per video --TimeViperProcessor--> "<video>" * (T * tokens_per_frame) --> input_ids

Frame sampling rules (all pure functions of the video's frame count and frame rate, see `sample_frame_indices`):

* ``fps`` (default 1.0): one frame at the start of every ``1/fps`` second segment, counted from ``start``
  (default 0): frame ``round((start + k / fps) * video_fps)`` for ``k = 0, 1, ...`` while the time is before
  ``end``. With ``start=0`` this is the reference's ``round(arange(0, total, video_fps / fps))``. An ``fps`` above
  the video's frame rate (the mean rate for a variable one) is capped at that rate with a warning: every frame once,
  not each frame repeated (``reference_eval`` keeps the reference's repeats, and warns). If more than
  ``max_frames`` (default 256) result, ``max_frames`` of them are kept by uniform subsampling; if fewer than
  ``min_frames`` (default: no minimum), ``min_frames`` uniform segment midpoints of the window are used instead.
* ``num_frames``: ``num_frames`` uniform segment midpoints of the window (the reference's ``uniform_indices``); all
  frames of the window when it holds fewer frames than that.
* ``sampling="reference_eval"``: the reference evaluation rule (its ``fps_indices``) exactly: indices
  ``round(arange(0, total, video_fps / fps))``, the first ``max_frames`` (256) kept, padded to a multiple of 4 by
  repeating the last index, replaced by 32 (``min_frames``) uniform segment midpoints if fewer remain.
* Variable frame rate (`decode_video_pyav` finds the real timestamps of every frame, ``metadata.frame_times``):
  ``fps``, ``start`` and ``end`` work on those times. The sample at time ``t = start + k / fps`` is the frame on
  screen at ``t`` (the last one with a presentation time ``<= t``), so a frame can repeat where the video is slower
  than ``fps``; the window holds the frames on screen during ``[start, end)``. ``num_frames`` (uniform over frame
  indices) and ``reference_eval`` (by index at the mean rate, as the reference) are unchanged.

Decoding (`decode_video_pyav`): one demux pass numbers the frames by presentation timestamp; then only the groups of
pictures that hold wanted frames are decoded (seeking over long stretches without one). Every decoded frame is
identified by its timestamp, so ``metadata.frames_indices`` and ``metadata.timestamps`` (seconds from the video
stream's first frame) describe exactly the frames returned; a wanted frame that cannot be decoded is an error (or,
with ``tolerant=True``, replaced by the nearest decoded one with a warning). Frames come out as displayed (sample
aspect ratio and display-matrix rotation applied).
"""

import bisect
import io
import math
import os
import queue
import re
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch

# First: the configuration's transformers version guard, before the imports an unsupported release may lack.
from .configuration_timeviper import check_transformers_version  # noqa: F401  isort: skip

from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ImagesKwargs, ProcessorMixin, VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata


try:
    import av
except ImportError:  # PyAV is only needed to decode video files; decoded frames work without it.
    av = None


__all__ = [
    "CHAT_TEMPLATES",
    "MCQ_ANSWER_PROMPT",
    "TimeViperImageProcessor",
    "TimeViperProcessor",
    "TimeViperVideoMetadata",
    "TimeViperVideoProcessor",
    "VideoDecodeError",
    "build_labels",
    "decode_video_pyav",
    "get_chat_template",
    "grounding_preamble",
    "mcq_prompt",
    "reference_eval_indices",
    "sample_frame_indices",
    "uniform_indices",
]

IGNORE_INDEX = -100

# ----------------------------------------------------------------------------------------------------------------
# Prompts (the reference implementation's templates and evaluation prompts)
# ----------------------------------------------------------------------------------------------------------------

MCQ_ANSWER_PROMPT = "Best Option: ("
MCQ_INSTRUCTION = "Please provide your answer by stating the letter followed by the full option."
GROUNDING_PREAMBLE = "The video lasts for {} seconds, and {} frames are uniformly sampled from it."

# Content items render in order with no separator: a video item is the single placeholder "<video>" (the processor
# expands it to frames x tokens_per_frame), an image item is "<image>", a text item is its text.
_RENDER_CONTENT_MACRO = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'video' -%}{{ '<video>' }}"
    "{%- elif item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- else -%}{{ raise_exception('Unsupported content type: ' ~ item['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

# Nemotron-Nano base (`nano_base`):
#   <SPECIAL_10>System\n{system}<SPECIAL_12>\n<SPECIAL_11>User\n{user}\n<SPECIAL_12>
#   <SPECIAL_11>Assistant\n{answer}\n<SPECIAL_12>          (no newlines between the lines shown here)
NEMOTRON_H_CHAT_TEMPLATE = (
    _RENDER_CONTENT_MACRO
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render_content(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_text = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ '<SPECIAL_10>System\\n' ~ system_text ~ '<SPECIAL_12>\\n' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ '<SPECIAL_11>User\\n' ~ render_content(message['content']) ~ '\\n<SPECIAL_12>' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<SPECIAL_11>Assistant\\n' ~ render_content(message['content']) ~ '\\n<SPECIAL_12>' }}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<SPECIAL_11>Assistant\\n' }}{%- endif -%}"
)

# Qwen2 (`qwen2`/`default`); turns are joined by "\n", and there is no newline after the last turn:
#   <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>
#   \n<|im_start|>assistant\n{answer}<|im_end|>          (no newlines between the lines shown here)
QWEN2_CHAT_TEMPLATE = (
    _RENDER_CONTENT_MACRO
    + "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_text = render_content(messages[0]['content']) -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_text = 'You are a helpful assistant.' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{ '<|im_start|>system\\n' ~ system_text ~ '<|im_end|>' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] in ['user', 'assistant'] -%}"
    "{{ '\\n<|im_start|>' ~ message['role'] ~ '\\n' ~ render_content(message['content']) ~ '<|im_end|>' }}"
    "{%- else -%}{{ raise_exception('Unsupported role: ' ~ message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\n<|im_start|>assistant\\n' }}{%- endif -%}"
)

CHAT_TEMPLATES = {"nemotron_h": NEMOTRON_H_CHAT_TEMPLATE, "qwen2": QWEN2_CHAT_TEMPLATE}

# Token that closes every turn (as in the reference's label builder), and the text that starts a supervised
# assistant span.
_TURN_SEPARATORS = {"nemotron_h": "<SPECIAL_12>", "qwen2": "<|im_end|>"}
_ASSISTANT_HEADERS = {"<SPECIAL_12>": "<SPECIAL_11>Assistant\n", "<|im_end|>": "\n<|im_start|>assistant\n"}


def get_chat_template(backbone: str) -> str:
    """Return the chat template of a language backbone: ``"nemotron_h"`` (Nemotron-Nano base) or ``"qwen2"``."""
    if backbone not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown backbone {backbone!r}; expected one of {sorted(CHAT_TEMPLATES)}.")
    return CHAT_TEMPLATES[backbone]


def mcq_prompt(question: str, options: list[str], add_letters: bool | None = None) -> str:
    """Build the reference multiple-choice question text.

    Returns ``question + "\\n" + "\\n".join(options) + "\\nPlease provide your answer by stating the letter followed
    by the full option."``. Options are prefixed with ``"A. "``, ``"B. "``, ... when ``add_letters`` is True; with
    the default ``None`` they are prefixed unless every option already starts with its letter and a dot (VideoMME
    style). Use it as the user text after the video, and start the answer with `MCQ_ANSWER_PROMPT`.
    """
    if not options:
        raise ValueError("mcq_prompt needs at least one option.")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    if add_letters is None:
        add_letters = not all(opt.startswith(f"{letter}.") for letter, opt in zip(letters, options))
    if add_letters:
        options = [f"{letter}. {opt}" for letter, opt in zip(letters, options)]
    return "\n".join([question, "\n".join(options), MCQ_INSTRUCTION])


def grounding_preamble(duration: float, num_frames: int) -> str:
    """The reference's time sentence for grounding / dense-captioning prompts.

    ``"The video lasts for {duration} seconds, and {num_frames} frames are uniformly sampled from it."``, with
    ``duration`` formatted by ``str.format`` exactly as given (``12.5`` -> ``"12.5"``, ``12`` -> ``"12"``), as the
    reference formats the dataset's duration field. Round it yourself if you want fewer digits. Eval prompts follow it
    with a space and the instruction; the reference's training data concatenates without the space.
    """
    return GROUNDING_PREAMBLE.format(duration, num_frames)


# ----------------------------------------------------------------------------------------------------------------
# Frame sampling (pure functions)
# ----------------------------------------------------------------------------------------------------------------

_SAMPLING_KEYS = ("fps", "num_frames", "max_frames", "min_frames", "start", "end", "sampling")
_SAMPLING_MODES = ("auto", "reference_eval")


def uniform_indices(num_frames: int, total_frames: int) -> list[int]:
    """Midpoints of ``num_frames`` equal segments of ``range(total_frames)`` (the reference's ``uniform_indices``).

    Returns every frame when ``num_frames >= total_frames``. Example: ``uniform_indices(4, 10) == [1, 3, 6, 8]``.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}.")
    if num_frames >= total_frames:
        return list(range(total_frames))
    splits = torch.linspace(0, total_frames, num_frames + 1, dtype=torch.int64)
    return ((splits[:-1] + splits[1:]) // 2).tolist()


def reference_eval_indices(
    total_frames: int, video_fps: float, fps: float = 1.0, max_frames: int = 256, min_frames: int = 32
) -> list[int]:
    """The reference evaluation sampling rule (the reference's ``fps_indices``), reproduced exactly.

    ``round(arange(0, total, video_fps / fps))`` (float32, round half to even) without indices >= total; the first
    ``max_frames`` kept (truncation, not subsampling); padded to a multiple of 4 by repeating the last index; replaced
    by ``uniform_indices(min_frames, total)`` when fewer than ``min_frames`` remain.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}.")
    if not video_fps or video_fps <= 0:
        raise ValueError(f"reference_eval sampling needs the video's frame rate, got video_fps={video_fps}.")
    if fps is None or fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}.")
    delta = video_fps / fps
    indices = torch.arange(0, total_frames, delta, dtype=torch.float32).round().to(torch.int64).tolist()
    indices = [i for i in indices if i < total_frames]
    if max_frames is not None and 0 < max_frames < len(indices):
        indices = indices[:max_frames]
    if len(indices) % 4 != 0:
        indices = indices + [indices[-1]] * (4 - len(indices) % 4)
    if min_frames is not None and len(indices) < min_frames:
        indices = uniform_indices(min_frames, total_frames)
    return indices


def sample_frame_indices(
    total_frames: int,
    video_fps: float | None = None,
    *,
    fps: float | None = None,
    num_frames: int | None = None,
    max_frames: int | None = None,
    min_frames: int | None = None,
    start: float | None = None,
    end: float | None = None,
    sampling: str | None = None,
    frame_times=None,
    video_duration: float | None = None,
) -> list[int]:
    """Choose the frame indices to decode for one video (see the module docstring for the rules).

    Args:
        total_frames: Number of frames in the video.
        video_fps: The video's frame rate. Needed for ``fps``, ``start``/``end`` and ``reference_eval``.
        fps: Frames per second to sample (segment starts, counted from ``start``). Excludes ``num_frames``.
        num_frames: Number of uniformly spaced frames (segment midpoints). Excludes ``fps``.
        max_frames: Cap for the fps rule (uniform subsampling of its frames); the reference_eval rule truncates.
        min_frames: Floor for the fps rule (falls back to uniform midpoints).
        start, end: Window in seconds (``end`` defaults to the video's duration). Not used by reference_eval.
        sampling: ``None``/``"auto"`` or ``"reference_eval"``.
        frame_times: For a variable frame rate: the presentation time in seconds of every frame (ascending,
            ``total_frames`` of them; `TimeViperVideoMetadata.frame_times`). ``fps``, ``start`` and ``end`` then
            work on these times: the sample at time ``t`` is the frame on screen at ``t`` (the last one with time
            ``<= t``), and the window holds the frames on screen during ``[start, end)``. ``video_fps`` is not
            needed. ``num_frames`` stays uniform over frame indices, and ``reference_eval`` (by index, as the
            reference) ignores the times.
        video_duration: With ``frame_times``: the video's duration in seconds (default: the last frame's time plus
            the mean frame interval).

    With neither ``fps`` nor ``num_frames``, every frame of the window is returned (then capped by ``max_frames``).
    """
    sampling = sampling or "auto"
    if sampling not in _SAMPLING_MODES:
        raise ValueError(f"Unknown sampling {sampling!r}; expected one of {_SAMPLING_MODES}.")
    if total_frames is None or total_frames < 1:
        raise ValueError(f"The video has no frames (total_frames={total_frames}).")
    if fps is not None and num_frames is not None:
        raise ValueError(
            f"`fps` ({fps}) and `num_frames` ({num_frames}) are mutually exclusive: pass `fps` to sample at a rate "
            "or `num_frames` for a fixed number of uniformly spaced frames, not both."
        )
    if num_frames is not None and (not isinstance(num_frames, (int, np.integer)) or num_frames < 1):
        raise ValueError(f"`num_frames` must be an integer >= 1, got {num_frames!r}.")
    if fps is not None and not fps > 0:
        raise ValueError(f"`fps` must be > 0, got {fps!r}.")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"`max_frames` must be >= 1, got {max_frames!r}.")
    if min_frames is not None and min_frames < 1:
        raise ValueError(f"`min_frames` must be >= 1, got {min_frames!r}.")
    if max_frames is not None and min_frames is not None and min_frames > max_frames:
        raise ValueError(f"`min_frames` ({min_frames}) must not exceed `max_frames` ({max_frames}).")

    if fps is not None and video_fps and fps > video_fps:
        fps = _capped_fps(fps, video_fps, sampling)

    if sampling == "reference_eval":
        if num_frames is not None:
            raise ValueError("sampling='reference_eval' samples at `fps`; it does not take `num_frames`.")
        if start is not None or end is not None:
            raise ValueError(
                "sampling='reference_eval' reproduces the reference, which always samples the whole video; "
                "it does not take `start`/`end`. Use the default sampling for a window."
            )
        return reference_eval_indices(
            total_frames,
            video_fps,
            fps=1.0 if fps is None else fps,
            max_frames=256 if max_frames is None else max_frames,
            min_frames=32 if min_frames is None else min_frames,
        )

    if frame_times is not None:
        return _sample_by_times(
            total_frames, frame_times, video_duration, video_fps, fps=fps, num_frames=num_frames,
            max_frames=max_frames, min_frames=min_frames, start=start, end=end,
        )

    has_rate = video_fps is not None and video_fps > 0
    if (start is not None or end is not None or fps is not None) and not has_rate:
        raise ValueError(
            "Sampling with `fps` or `start`/`end` needs the video's frame rate; for decoded frames pass "
            "`video_metadata={'fps': ...}`, or use `num_frames`."
        )
    first, stop = 0, total_frames  # window of frame indices [first, stop)
    if start is not None or end is not None:
        start_s, end_s = _window_seconds(start, end, total_frames / video_fps)
        # Frame i shows [i / video_fps, (i + 1) / video_fps); keep the frames on screen during [start, end): from
        # the one on screen at `start` (as for a variable rate) to the last that starts before `end`.
        first = min(total_frames - 1, math.floor(start_s * video_fps + 1e-6))
        stop = min(total_frames, max(first + 1, math.ceil(end_s * video_fps - 1e-6)))
    window = stop - first

    if num_frames is not None:
        return [first + i for i in uniform_indices(int(num_frames), window)]

    if fps is None or fps >= video_fps:  # every frame (rounding a step of one frame could repeat one)
        indices = list(range(first, stop))
    else:
        begin = 0.0 if start is None else float(start) * video_fps
        finish = float(total_frames) if end is None else min(float(end) * video_fps, float(total_frames))
        positions = np.rint(np.arange(begin, finish, video_fps / fps))  # round half to even, like torch.round
        indices = [int(p) for p in positions if first <= p < stop]
        if not indices:  # a window shorter than one frame
            indices = [first]
    if max_frames is not None and len(indices) > max_frames:
        indices = [indices[i] for i in uniform_indices(max_frames, len(indices))]
    if min_frames is not None and len(indices) < min_frames:
        indices = [first + i for i in uniform_indices(min_frames, window)]
    return indices


def _capped_fps(fps: float, video_fps: float, sampling: str) -> float:
    """``fps`` above the video's frame rate would only repeat frames: sample every frame once instead (a warning
    says so). ``reference_eval`` keeps the reference's rule, repeats included, and warns."""
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


def _sample_by_times(
    total_frames, frame_times, video_duration, video_fps, *, fps, num_frames, max_frames, min_frames, start, end
) -> list[int]:
    """`sample_frame_indices` for a variable frame rate: the rules on the frames' real presentation times."""
    times = np.asarray(frame_times, dtype=np.float64)
    if times.ndim != 1 or len(times) != total_frames:
        raise ValueError(f"`frame_times` must hold one time per frame ({total_frames}), got {times.shape}.")
    if np.any(np.diff(times) < 0):
        raise ValueError("`frame_times` must be in presentation order (ascending).")
    if total_frames > 1:
        mean_gap = (times[-1] - times[0]) / (total_frames - 1)
    else:
        mean_gap = 1.0 / video_fps if video_fps else 1.0
    duration = float(times[-1] + mean_gap)
    if video_duration is not None and video_duration > times[-1]:
        duration = float(video_duration)
    eps = 1e-6  # seconds: timestamps are rationals printed as floats

    start_s, end_s = _window_seconds(start, end, duration) if (start is not None or end is not None) \
        else (0.0, duration)
    first = max(0, int(np.searchsorted(times, start_s + eps, side="right")) - 1)  # the frame on screen at `start`
    stop = min(total_frames, max(first + 1, int(np.searchsorted(times, end_s - eps, side="left"))))
    window = stop - first

    if num_frames is not None:
        return [first + i for i in uniform_indices(int(num_frames), window)]
    if fps is None:
        indices = list(range(first, stop))
    else:
        count = max(1, math.ceil((end_s - start_s) * fps - 1e-9))
        sample_times = start_s + np.arange(count, dtype=np.float64) / fps
        sample_times = sample_times[sample_times < end_s - eps] if count > 1 else sample_times
        positions = np.searchsorted(times, sample_times + eps, side="right") - 1
        indices = np.clip(positions, first, stop - 1).astype(int).tolist()
    if max_frames is not None and len(indices) > max_frames:
        indices = [indices[i] for i in uniform_indices(max_frames, len(indices))]
    if min_frames is not None and len(indices) < min_frames:
        indices = [first + i for i in uniform_indices(min_frames, window)]
    return indices


# ----------------------------------------------------------------------------------------------------------------
# Decoding with PyAV: a frame index from one demux pass, then seek/skip/decode per group of pictures
# ----------------------------------------------------------------------------------------------------------------


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
    """``(container, name, reopen)`` for a path, bytes or a file object; `reopen` opens the input again from its
    start."""
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
    """`VideoMetadata` with the real presentation times of the frames.

    Extra fields:
        frames_timestamps: Presentation time in seconds (from the video stream's first frame) of each returned
            frame; ``timestamps`` returns it. Set by `decode_video_pyav`.
        frame_times: Presentation time in seconds of every frame of the video (presentation order) for a video with
            a variable frame rate; ``None`` for a constant one (frame ``i`` is at ``i / fps``). ``fps`` is then the
            mean frame rate. Sampling by ``fps`` / ``start`` / ``end`` uses these times.
        rotation: The display matrix's rotation in degrees, counter-clockwise (FFmpeg's convention, as
            ``ffprobe`` prints it), already applied to the returned frames; ``width``/``height`` are theirs.
    """

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
    """Every frame of a video stream from one demux pass (no decoding).

    Frame ``i`` is the one with the ``i``-th smallest presentation timestamp ``pts[i]`` (stream time base).
    ``keyframes`` lists the frame indices of the keyframes (ascending) and ``seek_targets`` the timestamp to seek to
    for each: its decoding timestamp, since demuxers index and seek by it (MPEG-TS, MP4), else its pts.
    """

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
    """Demux the video stream once. Returns ``(index, number of frames)``; the index is ``None`` when the
    timestamps cannot number the frames (a packet without pts, or two with the same one)."""
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
    for rate in candidates:
        if np.all(np.abs(seconds * rate - np.arange(len(seconds))) < 0.25):
            return rate
    return None


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


def _stream_metadata(stream, name: str) -> TimeViperVideoMetadata:
    """The stream header's view: frame rate, display size (sample aspect ratio and rotation applied)."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    width, height = stream.codec_context.width or None, stream.codec_context.height or None
    sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
    if width and sar and sar > 0 and sar != 1:  # non-square pixels: scale the width to the display aspect ratio
        width = max(1, int(round(width * float(sar))))
    return TimeViperVideoMetadata(
        total_num_frames=int(stream.frames or 0),
        fps=float(rate) if rate else None,
        width=width,
        height=height,
        video_backend="pyav",
    )


class _Pictures:
    """Converts decoded frames to display RGB (sample aspect ratio, display-matrix rotation) into one preallocated
    array of the wanted frames, so memory stays at the size of the result."""

    def __init__(self, wanted: list[int], width: int | None, height: int | None, label: str | None):
        self.width, self.height = width, height
        self.slot = {index: k for k, index in enumerate(wanted)}
        self.array = None
        self.rotation = 0
        self.done: set[int] = set()
        self.bar = None
        if label is not None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(wanted), desc=f"decoding {label}", unit="frame", leave=False)

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
        if self.bar is not None and index not in self.done:
            self.bar.update(1)
        self.done.add(index)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _TimestampMismatch(Exception):
    """A decoded frame's pts is not one of the demuxed packets' (the frame cannot be numbered by timestamp)."""


class _SeekLandedLate(Exception):
    """Seeking even to the first keyframe landed after it (a demuxer that cannot seek back to the start)."""


class _IndexedDecode:
    """Decode the `wanted` frames (sorted, unique) of a stream numbered by its `_FrameIndex`.

    Packets are read forward. Decoding starts at the keyframe at or before the next wanted frame and continues while
    a wanted frame is still to come from the packets fed so far; then the packets up to the keyframe of the next
    wanted frame are skipped (demuxed, not decoded), or, when more than `_SEEK_GOPS` groups of pictures lie
    between, the demuxer seeks there. Every decoded frame is numbered by its pts, so where a seek lands does not
    matter: a seek that lands after its keyframe is retried further back (MPEG-TS seeks by decoding timestamps, which
    the index only approximates), and frames before the keyframe decoding started from (the leading pictures of an
    open GOP, which need the previous one) are dropped. A wanted frame that never comes out is reported in
    `missing`. With `skip_nonref`, unwanted non-reference frames are not decoded.
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
        raise VideoDecodeError(
            f"Could not decode frame(s) {shown} of video {name} ({len(missing)} of the frames wanted): the file is "
            "damaged or truncated there. Pass `tolerant=True` to use the nearest decodable frames instead."
        )
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


def decode_video_pyav(
    source,
    indices: list[int] | None = None,
    sample_indices_fn=None,
    stats: dict | None = None,
    progress: bool = False,
    tolerant: bool = False,
) -> tuple[np.ndarray, TimeViperVideoMetadata]:
    """Decode selected frames of a video with PyAV.

    Frame ``i`` is the ``i``-th frame in presentation order. One demux pass (no decoding) lists every frame's
    presentation timestamp and the keyframes; it gives the frame count, the frame rate (constant when every frame
    lies on one rate's grid, else ``metadata.frame_times`` holds the real times and ``fps`` the mean rate) and the
    duration, all of the video stream (not the container, whose duration may be an audio stream's). Then the wanted
    frames are decoded group of pictures by group of pictures (`_IndexedDecode`): seeking where a long stretch holds
    no wanted frame, skipping the rest, and numbering every decoded frame by its timestamp, so the metadata always
    describes the frames returned. Streams whose timestamps cannot number the frames (raw elementary streams) are
    decoded from the start, numbering frames as they come. Frames are returned as displayed: pixels scaled to the
    sample aspect ratio and turned by the display matrix's rotation. Non-seekable file objects are read into memory.

    Args:
        source: A path (str or `os.PathLike`), raw bytes, or a binary file object.
        indices: Frame indices to return (any order, repeats allowed).
        sample_indices_fn: Alternatively, a function ``TimeViperVideoMetadata -> list[int]`` called once the video's
            frame count and frame rate (and, for a variable frame rate, ``frame_times``) are known.
        stats: Optional dict that receives counts: ``scanned_packets`` (the demux pass), ``demuxed_packets``,
            ``decoded_packets`` (sent to the decoder, which drops unwanted non-reference ones), ``seeks``.
        progress: Show a progress bar over the frames to decode (for long videos).
        tolerant: A wanted frame that cannot be decoded (damaged or truncated file) is replaced by the nearest
            decoded one, with a warning naming the file and the frames (wanted -> used); the metadata then lists the
            frames used. Default: a `VideoDecodeError`. Meant for training data, where one damaged second should not
            drop a sample.

    Returns:
        ``(frames, metadata)``: uint8 RGB frames of shape ``(len(indices), height, width, 3)`` and a
        `TimeViperVideoMetadata` with ``frames_indices`` and ``frames_timestamps`` (seconds from the first frame)
        of the frames returned.

    Raises:
        ValueError: the path is missing (`VideoFileNotFoundError`) or a directory (`VideoIsADirectoryError`); the
            input is unreadable, not a video (text, still image, audio only), or has no frames; an index is out of
            range; a wanted frame cannot be decoded (`VideoDecodeError`, unless ``tolerant``).
    """
    if indices is None and sample_indices_fn is None:
        raise ValueError("Pass `indices` or `sample_indices_fn`.")
    container, name, reopen = _open_container(source)
    counts = {"decoded_packets": 0, "demuxed_packets": 0, "seeks": 0, "scanned_packets": 0}
    pictures = None
    try:
        stream = _video_stream(container, name)
        metadata = _stream_metadata(stream, name)
        index, count = _scan_frame_index(container, stream, counts, name)
        if count == 0:
            raise ValueError(f"Video {name} has no frames: its video stream holds no packets (empty or truncated).")
        _warn_if_cut(stream, count, counts, name)
        if index is not None:
            _index_metadata(stream, index, metadata)
        else:
            metadata.total_num_frames = count
            metadata.duration = count / metadata.fps if metadata.fps else None
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
            pictures.close()
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
    return frames, metadata


def _warn_if_cut(stream, count: int, counts: dict, name: str) -> None:
    """A container header that lists more frames than the file holds (a cut download), or a damaged container."""
    if "demux_error" in counts:
        warnings.warn(f"Video {name} is damaged: {counts['demux_error']}; using the {count} frames before it.",
                      stacklevel=3)
    elif stream.frames and stream.frames > count:
        warnings.warn(f"Video {name} is truncated: its header lists {stream.frames} frames, the file holds {count}; "
                      "using those.", stacklevel=3)


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


# ----------------------------------------------------------------------------------------------------------------
# Frame transform (shared by the image and video processors)
# ----------------------------------------------------------------------------------------------------------------


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
            raise ValueError(
                f"Frames must be uint8 in [0, 255], got dtype {array.dtype}; convert with "
                "`(x * 255).round().clip(0, 255).astype(np.uint8)` if they are scaled to [0, 1]."
            )
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


def transform_frames(
    frames,
    size,
    resample=PIL.Image.Resampling.BICUBIC,
    do_resize: bool = True,
    do_rescale: bool = True,
    rescale_factor: float = 1 / 255,
    do_normalize: bool = True,
    image_mean=(0.5, 0.5, 0.5),
    image_std=(0.5, 0.5, 0.5),
) -> torch.Tensor:
    """RGB -> squash resize to ``size`` with PIL (bicubic by default) -> rescale -> normalize.

    This matches the reference transform ``Resize((384, 384), bicubic)`` on PIL images, ``ToTensor()``,
    ``Normalize(0.5, 0.5)``. Returns float32 ``(num_frames, 3, height, width)``.
    """
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
    if isinstance(x, PIL.Image.Image):
        return True
    return isinstance(x, (np.ndarray, torch.Tensor)) and x.ndim == 3


def _is_video_source(x) -> bool:
    return isinstance(x, (str, os.PathLike, bytes, bytearray, memoryview, dict)) or hasattr(x, "read")


def _flatten_videos(videos) -> list:
    """Flatten a video, a batch of videos, or nested per-sample lists of videos into a list of single videos."""
    if _is_video_source(videos):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim == 4:
            return [videos]
        if videos.ndim == 5:
            return list(videos)
        raise ValueError(
            "A video array must be (T, H, W, C) or (T, C, H, W) (or 5-D for a batch), got shape "
            f"{tuple(videos.shape)}."
        )
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
    raise TypeError(
        f"Unsupported video input {type(videos).__name__}: pass a path, bytes, a file object, a uint8 array/tensor "
        "(T, H, W, 3) or (T, 3, H, W), a list of PIL images, or a list of those."
    )


def _load_image(source) -> PIL.Image.Image:
    """A path, URL or base64 string -> PIL image (base64 has no '.', so a string with one is a path or URL)."""
    source = os.fspath(source)
    if "://" not in source and not source.startswith("data:") and "." in source and not os.path.isfile(source):
        raise VideoFileNotFoundError(f"Image file not found: '{source}'.")
    return load_image(source)


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        flat = []
        for item in images:
            flat.extend(_flatten_images(item))
        return flat
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


# ----------------------------------------------------------------------------------------------------------------
# Image and video processors
# ----------------------------------------------------------------------------------------------------------------


def _indices_for(metadata, options: dict) -> list[int]:
    """`sample_frame_indices` for a video's metadata (with its frame times when the frame rate is variable)."""
    def get(key):
        if isinstance(metadata, dict):
            return metadata.get(key)
        return getattr(metadata, key, None)

    frame_times = get("frame_times")
    return sample_frame_indices(
        get("total_num_frames"), get("fps"), frame_times=frame_times,
        video_duration=get("duration") if frame_times is not None else None, **options,
    )


class TimeViperVideoProcessorKwargs(VideosKwargs, total=False):
    """Video kwargs of `TimeViperVideoProcessor` (on top of transformers' `VideosKwargs`).

    fps (`float`): frames per second to sample (default 1.0), one frame at the start of each segment; capped at the
        video's frame rate (with a warning).
    num_frames (`int`): sample this many uniformly spaced frames instead (segment midpoints).
    max_frames (`int`): cap for the fps rule (default 256, uniform subsampling; reference_eval truncates).
    min_frames (`int`): floor for the fps rule (default none; reference_eval uses 32).
    start, end (`float`): window in seconds.
    sampling (`str`): "auto" (default) or "reference_eval" (the reference's evaluation rule).
    progress (`bool`): show a progress bar while decoding each video (default False).
    """

    max_frames: int | None
    min_frames: int | None
    start: float | None
    end: float | None
    sampling: str | None
    progress: bool


class TimeViperVideoProcessor(BaseVideoProcessor):
    r"""Decode, sample and normalise videos for TimeViper.

    Accepts, per video: a path, raw bytes or a binary file object (decoded with PyAV, seeking to the sampled frames);
    a uint8 array/tensor ``(T, H, W, 3)`` or ``(T, 3, H, W)``; a list of PIL images or HWC arrays; or a dict
    ``{"video"|"path"|"url": source, "fps"|"num_frames"|"max_frames"|"min_frames"|"start"|"end"|"sampling": ...}``
    whose keys override the call's sampling kwargs for that video. A list of these is a batch.

    Decoded frames (arrays, PIL lists) are sampled only when ``num_frames`` is given, or when their frame rate is
    known from ``video_metadata={"fps": ...}``; otherwise all of them are used as they are.

    Returns a `BatchFeature` with ``pixel_values_videos`` (float32 ``(total frames of all videos, 3, H, W)``, videos
    concatenated in order), ``video_num_frames`` (int64 ``(num_videos,)``) and ``video_metadata`` (a list of
    `VideoMetadata` with the sampled ``frames_indices``; ``timestamps`` gives their times in seconds: for decoded
    files, `TimeViperVideoMetadata` with the frames' real presentation times, also for a variable frame rate).
    """

    resample = PIL.Image.Resampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 384, "width": 384}
    do_resize = True
    do_center_crop = False
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    do_sample_frames = True
    fps = 1.0
    num_frames = None
    max_frames = 256
    min_frames = None
    start = None
    end = None
    sampling = "auto"
    progress = False  # a progress bar while decoding each video
    valid_kwargs = TimeViperVideoProcessorKwargs
    model_input_names = ["pixel_values_videos"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def _sampling_options(self, call_kwargs: dict, item: dict) -> tuple[dict, bool]:
        """Merge sampling options: instance defaults < call kwargs < per-video dict. Returns (options, fps_given).

        A level that sets ``num_frames`` drops the ``fps`` of lower levels and vice versa; one level setting both
        is an error.
        """
        options = {key: getattr(self, key, None) for key in _SAMPLING_KEYS}
        if options["num_frames"] is not None:
            options["fps"] = None
        fps_given = False
        for level_name, level in (("call", call_kwargs), ("video", item)):
            level = {k: v for k, v in level.items() if k in _SAMPLING_KEYS and v is not None}
            if "fps" in level and "num_frames" in level:
                where = "in the call" if level_name == "call" else "for one video"
                raise ValueError(
                    f"`fps` ({level['fps']}) and `num_frames` ({level['num_frames']}) were both given {where}; "
                    "they are mutually exclusive."
                )
            if "num_frames" in level:
                options["fps"] = None
            if "fps" in level:
                options["num_frames"] = None
                fps_given = True
            options.update(level)
        return options, fps_given

    def _load_one(self, video, call_kwargs: dict, metadata_hint, do_sample_frames: bool):
        item = {}
        if isinstance(video, dict):
            item = video
            sources = [video[key] for key in ("video", "path", "url") if video.get(key) is not None]
            if not sources:
                raise ValueError(f"A video dict needs a 'video', 'path' or 'url' entry, got keys {sorted(video)}.")
            video = sources[0]
        options, fps_given = self._sampling_options(call_kwargs, item)
        if options["num_frames"] is not None and (
            not isinstance(options["num_frames"], (int, np.integer)) or options["num_frames"] < 1
        ):
            raise ValueError(f"`num_frames` must be an integer >= 1, got {options['num_frames']!r}.")

        if isinstance(video, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(video, "read"):
            progress = bool(call_kwargs.get("progress", self.progress))
            if do_sample_frames:
                return decode_video_pyav(video, sample_indices_fn=lambda meta: _indices_for(meta, options), progress=progress)
            return decode_video_pyav(
                video, sample_indices_fn=lambda meta: list(range(meta.total_num_frames)), progress=progress
            )

        # Decoded frames.
        if isinstance(video, (list, tuple)):
            if len(video) == 0:
                raise ValueError("Got an empty list of frames.")
            frames = list(video)
            total = len(frames)
        else:
            if video.ndim != 4:
                raise ValueError(f"A video array must be 4-D (T, H, W, C) or (T, C, H, W), got {tuple(video.shape)}.")
            frames = video
            total = int(video.shape[0])
        if total == 0:
            raise ValueError("Got a video with no frames.")
        hint = dict(metadata_hint or {})
        video_fps = hint.get("fps")
        if not do_sample_frames:
            indices = list(range(total))
        elif options["num_frames"] is not None or video_fps or options["sampling"] == "reference_eval":
            indices = sample_frame_indices(total, video_fps, **options)
        elif fps_given or options["start"] is not None or options["end"] is not None:
            raise ValueError(
                "Sampling decoded frames with `fps` or `start`/`end` needs their frame rate: pass "
                "`video_metadata={'fps': ...}`, or use `num_frames`."
            )
        else:
            indices = list(range(total))  # already-sampled frames
        selected = [frames[i] for i in indices]
        first = _to_pil(selected[0])
        metadata = VideoMetadata(
            total_num_frames=total,
            fps=video_fps,
            width=first.width,
            height=first.height,
            duration=total / video_fps if video_fps else None,
            video_backend=None,
            frames_indices=indices,
        )
        return selected, metadata

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        """Decode/sample each video, then resize, rescale and normalise its frames (see the class docstring)."""
        unknown = set(kwargs) - set(self.valid_kwargs.__annotations__) - {"return_tensors"}
        if unknown:
            raise TypeError(
                f"Unexpected video processor kwargs {sorted(unknown)}; valid: "
                f"{sorted(self.valid_kwargs.__annotations__)}."
            )
        option = {key: (kwargs[key] if kwargs.get(key) is not None else getattr(self, key, None))
                  for key in ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                              "image_mean", "image_std", "do_sample_frames")}
        call_sampling = {key: kwargs[key] for key in (*_SAMPLING_KEYS, "progress") if kwargs.get(key) is not None}
        if call_sampling.get("fps") is not None and call_sampling.get("num_frames") is not None:
            raise ValueError(
                f"`fps` ({call_sampling['fps']}) and `num_frames` ({call_sampling['num_frames']}) are mutually "
                "exclusive: pass one of them."
            )
        video_list = _flatten_videos(videos)
        hints = kwargs.get("video_metadata")
        if hints is None or isinstance(hints, (dict, VideoMetadata)):
            hints = [hints] * len(video_list)
        elif len(hints) != len(video_list):
            raise ValueError(f"Got {len(hints)} `video_metadata` entries for {len(video_list)} videos.")

        pixel_values, counts, metadata = [], [], []
        for video, hint in zip(video_list, hints):
            frames, meta = self._load_one(video, call_sampling, hint, bool(option["do_sample_frames"]))
            pixel_values.append(
                transform_frames(
                    frames,
                    size=option["size"],
                    resample=option["resample"],
                    do_resize=option["do_resize"],
                    do_rescale=option["do_rescale"],
                    rescale_factor=option["rescale_factor"],
                    do_normalize=option["do_normalize"],
                    image_mean=option["image_mean"],
                    image_std=option["image_std"],
                )
            )
            counts.append(len(meta.frames_indices))
            metadata.append(meta)
        shapes = {tuple(p.shape[1:]) for p in pixel_values}
        if len(shapes) > 1:
            raise ValueError(f"Videos have different frame sizes {sorted(shapes)}; set do_resize=True.")
        data = {
            "pixel_values_videos": torch.cat(pixel_values),
            "video_num_frames": torch.tensor(counts, dtype=torch.int64),
            "video_metadata": metadata,
        }
        return BatchFeature(data=data, skip_tensor_conversion=["video_metadata"])

    def sample_frames(self, metadata: VideoMetadata, num_frames: int | None = None, fps: float | None = None,
                      **kwargs) -> list[int]:
        """`BaseVideoProcessor` hook: frame indices for `metadata` under this processor's sampling rules."""
        options, _ = self._sampling_options({"fps": fps, "num_frames": num_frames, **kwargs}, {})
        return _indices_for(metadata, options)


class TimeViperImageProcessor(BaseImageProcessor):
    """Images for TimeViper: the frame transform of `TimeViperVideoProcessor` applied to single images.

    Accepts PIL images, uint8 HWC/CHW arrays or tensors, paths/URLs, or (nested) lists of them. Returns
    ``pixel_values`` float32 ``(num_images, 3, H, W)``.
    """

    resample = PIL.Image.Resampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"height": 384, "width": 384}
    do_resize = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    do_convert_rgb = True
    valid_kwargs = ImagesKwargs
    model_input_names = ["pixel_values"]

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._set_attributes(**kwargs)

    def preprocess(self, images, **kwargs) -> BatchFeature:
        unknown = set(kwargs) - set(self.valid_kwargs.__annotations__) - {"return_tensors"}
        if unknown:
            raise TypeError(f"Unexpected image processor kwargs {sorted(unknown)}.")
        option = {key: (kwargs[key] if kwargs.get(key) is not None else getattr(self, key, None))
                  for key in ("do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize",
                              "image_mean", "image_std")}
        flat = _flatten_images(images)
        if not flat:
            raise ValueError("Got an empty list of images.")
        loaded = [_load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in flat]
        pixel_values = transform_frames(loaded, **option)
        return BatchFeature(data={"pixel_values": pixel_values})


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


def build_labels(
    input_ids,
    separator_id: int,
    attention_mask=None,
    ignore_ids=(),
    ignore_index: int = IGNORE_INDEX,
):
    """Labels that supervise only assistant turns (the reference's ``_create_labels``).

    The sequence is expected to be a chat-template render: a system turn, then alternating user and assistant turns,
    each closed by the separator token (``<SPECIAL_12>`` for Nemotron-H, ``<|im_end|>`` for Qwen2). With separator
    positions ``s_0, s_1, ...`` the tokens ``(s_i, s_{i+1}]`` for odd ``i`` are supervised: for Nemotron-H that is
    ``<SPECIAL_11>Assistant\\n{answer}\\n<SPECIAL_12>``, for Qwen2 ``\\n<|im_start|>assistant\\n{answer}<|im_end|>``.
    Everything else is ``ignore_index``, as are padding (``attention_mask == 0``) and any token in ``ignore_ids``
    (placeholders). An unfinished assistant turn (a generation prompt) is not supervised.

    Args:
        input_ids: One sequence (list or 1-D tensor) or a batch (list of lists or 2-D tensor).
        separator_id: Id of the turn separator token.
        attention_mask: Same shape as ``input_ids``; positions with 0 are ignored (padding).
        ignore_ids: Token ids never supervised (e.g. the ``<video>``/``<image>`` placeholder ids).
        ignore_index: Label of unsupervised positions.

    Returns:
        Labels with the type and shape of ``input_ids`` (a tensor for tensor input, else lists).
    """
    as_tensor = isinstance(input_ids, torch.Tensor)
    ids = input_ids.tolist() if as_tensor else input_ids
    mask = attention_mask.tolist() if isinstance(attention_mask, torch.Tensor) else attention_mask
    single = len(ids) == 0 or not isinstance(ids[0], (list, tuple))
    rows = [list(ids)] if single else [list(r) for r in ids]
    masks = [None] * len(rows) if mask is None else ([list(mask)] if single else [list(m) for m in mask])
    ignore = set(int(i) for i in ignore_ids if i is not None)
    labels = []
    for row, row_mask in zip(rows, masks):
        valid = [True] * len(row) if row_mask is None else [bool(m) for m in row_mask]
        seps = [p for p, (tok, ok) in enumerate(zip(row, valid)) if ok and tok == separator_id]
        row_labels = [ignore_index] * len(row)
        for i in range(1, len(seps) - 1, 2):
            for p in range(seps[i] + 1, seps[i + 1] + 1):
                if valid[p] and row[p] not in ignore:
                    row_labels[p] = row[p]
        labels.append(row_labels)
    labels = labels[0] if single else labels
    return torch.tensor(labels, dtype=torch.long) if as_tensor else labels


# ----------------------------------------------------------------------------------------------------------------
# Processor
# ----------------------------------------------------------------------------------------------------------------

_TEXT_KWARGS = {
    "padding", "padding_side", "truncation", "max_length", "pad_to_multiple_of", "return_attention_mask",
    "add_special_tokens", "return_tensors", "return_token_type_ids", "return_length", "verbose", "stride",
    "is_split_into_words", "return_overflowing_tokens", "return_special_tokens_mask", "return_offsets_mapping",
}
_PROCESSOR_KWARGS = {"return_labels", "return_metadata", "text_kwargs", "videos_kwargs", "images_kwargs"}


class TimeViperProcessor(ProcessorMixin):
    r"""TimeViper processor: tokenizer + `TimeViperVideoProcessor` + `TimeViperImageProcessor` + chat template.

    Each ``<video>`` in the text stands for one video and is expanded to ``num_frames * tokens_per_frame`` copies of
    ``<video>``; each ``<image>`` to ``tokens_per_frame`` copies of ``<image>``. The model replaces every placeholder
    token with one vision embedding (``tokens_per_frame`` per frame after token merging).

    Args:
        image_processor: Defaults to a `TimeViperImageProcessor` with the video processor's size.
        video_processor: Defaults to `TimeViperVideoProcessor()` (384x384, 1 fps, at most 256 frames).
        tokenizer: Must know ``video_token`` and ``image_token`` as tokens.
        chat_template: `NEMOTRON_H_CHAT_TEMPLATE` or `QWEN2_CHAT_TEMPLATE` (see `get_chat_template`).
        tokens_per_frame: Vision embeddings per frame (16 for TimeViper's ToMe projector).
        video_token, image_token: Placeholder strings.
        turn_separator: Token closing each turn, for labels; inferred from the chat template when None.
    """

    def __init__(
        self,
        image_processor=None,
        video_processor=None,
        tokenizer=None,
        chat_template=None,
        tokens_per_frame: int = 16,
        video_token: str = "<video>",
        image_token: str = "<image>",
        turn_separator: str | None = None,
        **kwargs,
    ):
        if video_processor is None:
            video_processor = TimeViperVideoProcessor()
        if image_processor is None:
            size = _size_hw(video_processor.size)
            image_processor = TimeViperImageProcessor(size={"height": size[0], "width": size[1]})
        if not isinstance(tokens_per_frame, int) or tokens_per_frame < 1:
            raise ValueError(f"tokens_per_frame must be a positive integer, got {tokens_per_frame!r}.")
        self.tokens_per_frame = tokens_per_frame
        self.video_token = video_token
        self.image_token = image_token
        if turn_separator is None and isinstance(chat_template, str):
            turn_separator = next((sep for sep in _ASSISTANT_HEADERS if sep in chat_template), None)
        self.turn_separator = turn_separator
        super().__init__(image_processor, video_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.video_token_id = self._token_id(video_token)
        self.image_token_id = self._token_id(image_token)

    def check_argument_for_proper_class(self, argument_name, argument):
        # Without torchvision, `transformers.BaseVideoProcessor` is a dummy placeholder class, so the base check would
        # reject every video processor; check against the real base class instead.
        if argument_name == "video_processor":
            if not isinstance(argument, BaseVideoProcessor):
                raise TypeError(f"video_processor must be a BaseVideoProcessor, got {type(argument).__name__}.")
            return BaseVideoProcessor
        return super().check_argument_for_proper_class(argument_name, argument)

    def _token_id(self, token: str) -> int | None:
        if self.tokenizer is None:
            return None
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise ValueError(
                f"The tokenizer has no token {token!r}; add it with "
                f"`tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}})` before building the "
                "processor (and size the model's embeddings accordingly)."
            )
        return token_id

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        # Every saved processor names its Auto classes and carries this file (transformers writes both only for
        # registered classes), as every saved TimeViper model does.
        type(self).register_for_auto_class()
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoProcessor"):
        """Register for `AutoProcessor`, and the image/video processors for their auto classes (save_pretrained)."""
        super().register_for_auto_class(auto_class)
        TimeViperVideoProcessor.register_for_auto_class()
        TimeViperImageProcessor.register_for_auto_class()

    # -- placeholder expansion (transformers' ProcessorMixin hooks) --------------------------------------------------

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        num_frames = int(video_inputs["video_num_frames"][video_idx])
        return self.video_token * (num_frames * self.tokens_per_frame)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.tokens_per_frame

    def _expand_placeholders(self, texts: list[str], video_inputs, image_inputs) -> list[str]:
        num_videos = 0 if video_inputs is None else len(video_inputs["video_num_frames"])
        num_images = 0 if image_inputs is None else len(image_inputs["pixel_values"])
        counts = {
            "video": sum(t.count(self.video_token) for t in texts),
            "image": sum(t.count(self.image_token) for t in texts),
        }
        for kind, given in (("video", num_videos), ("image", num_images)):
            token = self.video_token if kind == "video" else self.image_token
            if counts[kind] != given:
                raise ValueError(
                    f"The text has {counts[kind]} {token} placeholder(s) but {given} {kind}(s) were given; put "
                    f"exactly one {token} in the text per {kind} (they are matched in order across the batch)."
                )
        if num_videos == 0 and num_images == 0:
            return texts
        pattern = re.compile("|".join(re.escape(t) for t in (self.video_token, self.image_token)))
        counter = {"video": 0, "image": 0}

        def expand(match):
            if match.group(0) == self.video_token:
                counter["video"] += 1
                return self.replace_video_token(video_inputs, counter["video"] - 1)
            counter["image"] += 1
            return self.replace_image_token(image_inputs, counter["image"] - 1)

        return [pattern.sub(expand, text) for text in texts]

    # -- main entry --------------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        r"""Process text with ``<video>``/``<image>`` placeholders together with the videos and images they stand for.

        Args:
            images: Images (see `TimeViperImageProcessor`), one per ``<image>`` in the text, in order.
            text: A string or a list of strings (a batch).
            videos: Videos (see `TimeViperVideoProcessor`), one per ``<video>`` in the text, in order across the
                batch; nested per-sample lists (as from `apply_chat_template`) are flattened.
            **kwargs:
                Video kwargs (``fps``, ``num_frames``, ``max_frames``, ``min_frames``, ``start``, ``end``,
                ``sampling``, ``size``, ``video_metadata``, ...) go to the video processor, ``size``/``resample``/...
                also to the image processor; tokenizer kwargs (``padding``, ``padding_side`` ("left" for generation),
                ``truncation``, ``max_length``, ``pad_to_multiple_of``, ``return_tensors``, ``add_special_tokens``
                (default False: no BOS, as the reference)); or pass them grouped as ``text_kwargs``,
                ``videos_kwargs``, ``images_kwargs`` dicts.
                ``return_labels=True`` adds ``labels`` (see `build_labels`; padding and placeholders are -100).
                ``return_metadata=True`` adds ``video_metadata`` (list of `VideoMetadata`) and ``video_num_frames``.

        Returns:
            `BatchFeature` with ``input_ids``, ``attention_mask`` (when text is given), ``pixel_values_videos``
            float32 (total frames, 3, H, W) when videos are given, ``pixel_values`` (num images, 3, H, W) when
            images are given, and ``labels`` / ``video_metadata`` / ``video_num_frames`` on request.
        """
        if text is None and isinstance(images, str) and "://" not in images and not os.path.isfile(images):
            images, text = None, images  # processor("some text"): a positional string is text, not an image
        if images is None and text is None and videos is None:
            raise ValueError("Pass at least one of `text`, `videos` or `images`.")

        text_kwargs = dict(kwargs.pop("text_kwargs", None) or {})
        videos_kwargs = dict(kwargs.pop("videos_kwargs", None) or {})
        images_kwargs = dict(kwargs.pop("images_kwargs", None) or {})
        return_labels = bool(kwargs.pop("return_labels", False))
        return_metadata = bool(kwargs.pop("return_metadata", False))
        video_keys = set(self.video_processor.valid_kwargs.__annotations__)
        image_keys = set(self.image_processor.valid_kwargs.__annotations__)
        unknown = []
        for key, value in kwargs.items():
            routed = False
            if key in _TEXT_KWARGS:
                text_kwargs.setdefault(key, value)
                routed = True
            if key in video_keys and key not in ("return_tensors", "return_metadata"):
                videos_kwargs.setdefault(key, value)
                routed = True
            if key in image_keys and key not in ("return_tensors",):
                images_kwargs.setdefault(key, value)
                routed = True
            if not routed:
                unknown.append(key)
        if unknown:
            raise TypeError(
                f"Unexpected keyword argument(s) {sorted(unknown)} for {type(self).__name__}.__call__; see its "
                "docstring for the video, image and tokenizer kwargs."
            )
        return_tensors = text_kwargs.pop("return_tensors", None)
        videos_kwargs.pop("return_metadata", None)
        videos_kwargs.pop("return_tensors", None)
        images_kwargs.pop("return_tensors", None)

        data: dict[str, Any] = {}
        video_inputs = image_inputs = None
        if videos is not None:
            video_inputs = self.video_processor(videos, **videos_kwargs)
            data["pixel_values_videos"] = video_inputs["pixel_values_videos"]
            if return_metadata:
                data["video_num_frames"] = video_inputs["video_num_frames"]
                data["video_metadata"] = video_inputs["video_metadata"]
        if images is not None:
            image_inputs = self.image_processor(images, **images_kwargs)
            data["pixel_values"] = image_inputs["pixel_values"]

        if text is None:
            if return_labels:
                raise ValueError("`return_labels=True` needs `text`.")
            return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])
        if self.tokenizer is None:
            raise ValueError("This processor has no tokenizer; it cannot process `text`.")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("`text` must be a string or a list of strings.")
        texts = self._expand_placeholders(texts, video_inputs, image_inputs)
        data.update(self._tokenize(texts, text_kwargs, return_labels, video_inputs, image_inputs))
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["video_metadata"])

    def _tokenize(self, texts, text_kwargs, return_labels, video_inputs, image_inputs) -> dict:
        padding = text_kwargs.pop("padding", False)
        padding_side = text_kwargs.pop("padding_side", None) or self.tokenizer.padding_side
        max_length = text_kwargs.get("max_length")
        pad_to_multiple_of = text_kwargs.pop("pad_to_multiple_of", None)
        return_attention_mask = text_kwargs.pop("return_attention_mask", True)
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}.")
        text_kwargs.setdefault("add_special_tokens", False)
        text_kwargs.setdefault("return_token_type_ids", False)
        encoded = self.tokenizer(texts, padding=False, **text_kwargs)
        rows = [list(r) for r in encoded["input_ids"]]

        # The placeholders must survive tokenisation (truncation would silently drop vision positions).
        for kind, token_id, inputs in (("video", self.video_token_id, video_inputs),
                                       ("image", self.image_token_id, image_inputs)):
            if inputs is None or token_id is None:
                continue
            expected = (int(inputs["video_num_frames"].sum()) if kind == "video" else len(inputs["pixel_values"])) \
                * self.tokens_per_frame
            found = sum(r.count(token_id) for r in rows)
            if found != expected:
                raise ValueError(
                    f"Expected {expected} {kind} placeholder tokens after tokenisation, found {found}; truncation "
                    "(`max_length`) probably cut them. Raise `max_length` or sample fewer frames."
                )

        labels = None
        if return_labels:
            labels = [self.build_labels(r) for r in rows]
            for i, row_labels in enumerate(labels):
                if all(label == IGNORE_INDEX for label in row_labels):
                    raise ValueError(
                        f"Sample {i} has no complete assistant turn to supervise (labels requested). Add the "
                        "assistant answer to the conversation, render without add_generation_prompt, and check that "
                        "truncation did not cut it."
                    )

        # Padding (done here so that labels stay aligned with input_ids).
        lengths = [len(r) for r in rows]
        if padding in (True, "longest"):
            target = max(lengths)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs `max_length`.")
            target = max(max_length, max(lengths))
        elif padding in (False, None, "do_not_pad"):
            target = None
        else:
            raise ValueError(f"Unsupported padding {padding!r}; use True/'longest', 'max_length' or False.")
        if target is not None and pad_to_multiple_of:
            target = int(math.ceil(target / pad_to_multiple_of) * pad_to_multiple_of)
        masks = [[1] * n for n in lengths]
        if target is not None and any(n != target for n in lengths):
            pad_id = self.tokenizer.pad_token_id
            if pad_id is None:
                raise ValueError("Padding needs a tokenizer pad token; set `tokenizer.pad_token`.")

            def pad(seq, value):
                filler = [value] * (target - len(seq))
                return filler + seq if padding_side == "left" else seq + filler

            rows = [pad(r, pad_id) for r in rows]
            masks = [pad(m, 0) for m in masks]
            if labels is not None:
                labels = [pad(l, IGNORE_INDEX) for l in labels]
        out = {"input_ids": rows}
        if return_attention_mask:
            out["attention_mask"] = masks
        if labels is not None:
            out["labels"] = labels
        for key in encoded.keys():  # extra tokenizer outputs asked for (lengths, offsets, ...), unpadded
            if key not in ("input_ids", "attention_mask"):
                out[key] = encoded[key]
        return out

    # -- labels ------------------------------------------------------------------------------------------------------

    def build_labels(self, input_ids, attention_mask=None):
        """Labels supervising only the assistant turns of chat-template renders (see module-level `build_labels`).

        Uses this processor's ``turn_separator`` and ignores the ``<video>``/``<image>`` placeholders. Also checks
        that every supervised span starts with the assistant header (``<SPECIAL_11>Assistant\\n`` or
        ``\\n<|im_start|>assistant\\n``) and raises ``ValueError`` otherwise (e.g. text rendered without the system
        turn). Accepts one sequence or a batch, as lists or tensors.
        """
        if self.turn_separator is None:
            raise ValueError(
                "Labels need the turn separator; build the processor with a TimeViper chat template or pass "
                "`turn_separator` ('<SPECIAL_12>' for Nemotron-H, '<|im_end|>' for Qwen2)."
            )
        separator_id = self._token_id(self.turn_separator)
        labels = build_labels(
            input_ids, separator_id, attention_mask=attention_mask,
            ignore_ids=(self.video_token_id, self.image_token_id),
        )
        header = _ASSISTANT_HEADERS.get(self.turn_separator)
        if header is not None:
            label_rows = labels.tolist() if isinstance(labels, torch.Tensor) else labels
            id_rows = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else input_ids
            if label_rows and not isinstance(label_rows[0], list):
                label_rows, id_rows = [label_rows], [id_rows]
            for row_ids, row_labels in zip(id_rows, label_rows):
                spans, current = [], []
                for token, label in zip(row_ids, row_labels):
                    if label != IGNORE_INDEX or (current and token in (self.video_token_id, self.image_token_id)):
                        current.append(token)
                    elif current:
                        spans.append(current)
                        current = []
                if current:
                    spans.append(current)
                for span in spans:
                    span_text = self.tokenizer.decode(span, skip_special_tokens=False)
                    if not span_text.startswith(header):
                        raise ValueError(
                            f"A supervised span starts with {span_text[:40]!r} instead of the assistant header "
                            f"{header!r}: labels expect the chat-template layout (system turn, then alternating "
                            "user/assistant turns)."
                        )
        return labels

    # -- chat template ----------------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors=None,
        processor_kwargs: dict | None = None,
        return_labels: bool = False,
        **kwargs,
    ):
        """Render conversations with the chat template and, with ``tokenize=True``, process them.

        Content items: ``{"type": "text", "text": ...}``, ``{"type": "video", "video"|"path"|"url": ...}`` (a path,
        bytes, frames, ...; per-item ``fps``, ``num_frames``, ``max_frames``, ``min_frames``, ``start``, ``end``,
        ``sampling`` override the call's), ``{"type": "image", "image"|"path"|"url": ...}``. Videos are decoded with
        this file's PyAV decoder. Processor kwargs go in ``processor_kwargs`` or directly as keyword arguments
        (``fps=2``, ``padding=True``, ...); other keyword arguments are passed to the template.
        ``return_labels=True`` adds ``labels`` for training (the conversation must end with an assistant answer).
        Returns the rendered text (``tokenize=False``), ``input_ids`` (``tokenize=True``), or the whole
        `BatchFeature` (``return_dict=True``).
        """
        if kwargs.get("return_assistant_tokens_mask"):
            raise ValueError("Use `return_labels=True` for assistant-only labels with TimeViper templates.")
        processor_kwargs = dict(processor_kwargs or {})
        processor_keys = (_TEXT_KWARGS | _PROCESSOR_KWARGS | set(self.video_processor.valid_kwargs.__annotations__)
                          | set(self.image_processor.valid_kwargs.__annotations__))
        for key in list(kwargs):
            if key in processor_keys:
                processor_kwargs[key] = kwargs.pop(key)
        if return_labels:
            processor_kwargs["return_labels"] = True
        if return_tensors is not None:
            processor_kwargs["return_tensors"] = return_tensors

        # Same batching rule as ProcessorMixin.apply_chat_template.
        is_batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "content")
        )
        conversations = conversation if is_batched else [conversation]
        prompt = super().apply_chat_template(
            conversation,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tokenize=False,
            **kwargs,
        )
        if not tokenize:
            return prompt

        videos, images = [], []
        for conv in conversations:
            messages = conv.messages if hasattr(conv, "messages") else conv
            for message in messages:
                content = message.get("content")
                if not isinstance(content, (list, tuple)):
                    continue
                for item in content:
                    if not isinstance(item, dict):
                        continue
                    if item.get("type") == "video":
                        if not any(item.get(k) is not None for k in ("video", "path", "url")):
                            raise ValueError("A video item needs a 'video', 'path' or 'url' entry to be tokenized.")
                        videos.append(item)
                    elif item.get("type") == "image":
                        source = next((item[k] for k in ("image", "path", "url", "base64") if item.get(k) is not None),
                                      None)
                        if source is None:
                            raise ValueError("An image item needs an 'image', 'path' or 'url' entry to be tokenized.")
                        images.append(source)
        out = self(
            text=prompt if is_batched else [prompt],
            videos=videos or None,
            images=images or None,
            **processor_kwargs,
        )
        return out if return_dict else out["input_ids"]

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values_videos", "pixel_values"]


__all__ += ["NEMOTRON_H_CHAT_TEMPLATE", "QWEN2_CHAT_TEMPLATE", "TimeViperVideoProcessorKwargs", "transform_frames"]


# ----------------------------------------------------------------------------------------------------------------
# Streaming video input: long videos read chunk by chunk, with host memory bounded whatever their length
# ----------------------------------------------------------------------------------------------------------------


class VideoStream:
    """One video file read lazily, `chunk_frames` sampled frames at a time (for `TimeViperModel.encode_video`).

    Opening it decodes the first chunk, which fixes the sampled frames (`num_frames`, `metadata`: the same indices
    the video processor samples with the same options). Iterating yields the frames as uint8 tensors (chunk, 3,
    height, width), already resized to the processor's size, produced by a background thread that decodes at most
    `prefetch_chunks` chunks ahead while the caller encodes; `pixel_chunks` moves them to the model's device and
    normalises them there. Host memory is a few chunks, whatever the video's length. Each chunk is one
    `decode_video_pyav` call, seeking to the keyframe before its first frame (containers without a frame count,
    e.g. Matroska, are demuxed once per chunk to find the frames; prefer larger chunks for those).

    Args:
        video: a path or raw bytes, or a dict ``{"video"|"path"|"url": source, <sampling overrides>}`` as in a
            conversation's video item.
        video_processor: the `TimeViperVideoProcessor` whose sampling defaults, size and normalisation apply.
        chunk_frames: sampled frames per decoded chunk.
        prefetch_chunks: chunks decoded ahead of the consumer.
        resize_threads: threads that resize a chunk's frames (PIL releases the GIL while resizing; at 720p and up,
            one thread resizing is slower than the decoder).
        **sampling: ``fps``, ``num_frames``, ``max_frames``, ``min_frames``, ``start``, ``end``, ``sampling``.
    """

    def __init__(self, video, video_processor, chunk_frames: int = 64, prefetch_chunks: int = 2,
                 resize_threads: int = 4, **sampling):
        unknown = set(sampling) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(
                f"Unexpected sampling kwargs {sorted(unknown)} for VideoStream; valid: {list(_SAMPLING_KEYS)}."
            )
        if chunk_frames < 1 or prefetch_chunks < 1:
            raise ValueError(
                f"chunk_frames and prefetch_chunks must be >= 1, got {chunk_frames} and {prefetch_chunks}."
            )
        item = video if isinstance(video, dict) else {}
        source = video
        if item:
            source = next((item[key] for key in ("video", "path", "url") if item.get(key) is not None), None)
        if not isinstance(source, (str, os.PathLike, bytes)):
            raise TypeError(
                f"VideoStream reads a path or bytes (it decodes the file once per chunk), got {type(source).__name__}."
            )
        self.source, self.video_processor = source, video_processor
        self.chunk_frames, self.prefetch_chunks = chunk_frames, prefetch_chunks
        self.resize_threads = max(1, resize_threads)
        self.decode_seconds = 0.0  # time spent decoding and resizing (in the background thread after the first chunk)
        options, _ = video_processor._sampling_options(sampling, item)
        sampled = []

        def first_chunk(metadata) -> list[int]:
            sampled.extend(_indices_for(metadata, options))
            return sampled[:chunk_frames]

        started = time.perf_counter()
        frames, self.metadata = decode_video_pyav(source, sample_indices_fn=first_chunk)
        self.first_chunk = self.resize(frames)
        self.decode_seconds += time.perf_counter() - started
        self.indices = sampled
        # Only the first chunk has been decoded: its times would not cover the video, the frame rate does.
        self.metadata.frames_indices, self.metadata.frames_timestamps = sampled, None

    @property
    def num_frames(self) -> int:
        return len(self.indices)

    def resize(self, frames: np.ndarray) -> torch.Tensor:
        """Decoded RGB frames -> uint8 (frames, 3, height, width) at the processor's size (the processor's resize,
        on `resize_threads` groups of frames at once)."""
        processor = self.video_processor

        def resize_group(group):
            pixels = transform_frames(
                group, size=processor.size, resample=processor.resample, do_resize=processor.do_resize,
                do_rescale=False, do_normalize=False,
            )
            return pixels.to(torch.uint8)  # (whole numbers in [0, 255]: exact)

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
                    frames, _ = decode_video_pyav(self.source, indices=self.indices[start : start + self.chunk_frames])
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
        device = torch.device(device) if device is not None else torch.device("cpu")
        for chunk in self:
            if device.type == "cuda":
                chunk = chunk.pin_memory().to(device, non_blocking=True)
            else:
                chunk = chunk.to(device)
            pixels = self.normalize(chunk)
            yield pixels if dtype is None else pixels.to(dtype)


def streaming_chat_inputs(processor, conversation, chunk_frames: int = 64, prefetch_chunks: int = 2,
                          add_generation_prompt: bool = True, **kwargs):
    """`processor.apply_chat_template(..., tokenize=True)` for long videos: the prompt's ``input_ids`` and
    ``attention_mask`` (``return_tensors="pt"``), with the videos opened as `VideoStream`s instead of decoded.

    Feed each stream to `model.encode_video` and the features to ``generate(video_features=...)``. Keyword
    arguments: the sampling options (``fps``, ``max_frames``, ...) and the tokenizer options (``padding``,
    ``padding_side``) of the processor; a conversation's video item may override the sampling as usual.
    Returns ``(inputs, streams)``, the streams in the order of the videos in the batch.
    """
    sampling = {key: kwargs.pop(key) for key in list(kwargs) if key in _SAMPLING_KEYS}
    text_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in _TEXT_KWARGS}
    if kwargs:
        raise TypeError(f"Unexpected keyword argument(s) {sorted(kwargs)} for streaming_chat_inputs.")
    is_batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 and isinstance(
        conversation[0], (list, tuple)
    )
    conversations = conversation if is_batched else [conversation]
    prompts = [processor.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in conversations]
    streams = []
    for conv in conversations:
        for message in conv:
            content = message.get("content")
            for item in content if isinstance(content, (list, tuple)) else ():
                if isinstance(item, dict) and item.get("type") == "image":
                    raise ValueError("streaming_chat_inputs streams videos; pass images through the processor.")
                if isinstance(item, dict) and item.get("type") == "video":
                    stream = VideoStream(item, processor.video_processor, chunk_frames, prefetch_chunks, **sampling)
                    streams.append(stream)
    video_inputs = {"video_num_frames": torch.tensor([stream.num_frames for stream in streams], dtype=torch.int64)}
    texts = processor._expand_placeholders(prompts, video_inputs if streams else None, None)
    data = processor._tokenize(texts, text_kwargs, False, video_inputs if streams else None, None)
    return BatchFeature(data=data, tensor_type="pt"), streams


__all__ += ["VideoStream", "rescale_and_normalize", "streaming_chat_inputs"]
